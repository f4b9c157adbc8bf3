from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from monai_sdfsmis.networks.sdfsmis import TINY_CONFIG_DIR
from monai_sdfsmis.networks.sqi import (
    KVConcatAttnProcessor,
    SupportBank,
    SupportQueryAttention,
    SupportQueryAttnProcessor,
    install_sii,
    match_support_batch,
    sii_blocks,
)


def _unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(json.loads((TINY_CONFIG_DIR / "unet.json").read_text()))


def _inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 32, generator=g)


def _run(unet, x, cond):
    return unet(x, 999, encoder_hidden_states=cond).sample


def _randomize_sii(unet, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in sii_blocks(unet):
            out = block.attn_sq.attn.to_out[0]
            out.weight.copy_(torch.randn(out.weight.shape, generator=g) * 0.2)
            out.bias.copy_(torch.randn(out.bias.shape, generator=g) * 0.2)


def _mha(q, k, v, heads):
    """Plain multi-head attention: q [B, L, C], k/v [B, S, C]."""
    b, length, c = q.shape
    d = c // heads
    split = lambda t: t.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d**0.5, dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, length, c)


def test_install_registers_layers_copied_from_attn1():
    unet = _unet()
    plain = copy.deepcopy(unet)
    layers = install_sii(unet, SupportBank(), "sii")
    blocks = sii_blocks(unet)
    assert len(layers) == len(blocks) == 7  # 2 down + 1 mid + 4 up in the tiny config
    for (_, block), layer in zip(blocks, layers):
        assert block.attn_sq is layer and isinstance(layer, SupportQueryAttention)
        assert isinstance(block.attn1.processor, SupportQueryAttnProcessor)
        for proj in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(layer.attn, proj).weight, getattr(block.attn1, proj).weight)
            assert getattr(layer.attn, proj).weight.data_ptr() != getattr(block.attn1, proj).weight.data_ptr()
        assert torch.count_nonzero(layer.attn.to_out[0].weight) == 0
        assert torch.count_nonzero(layer.attn.to_out[0].bias) == 0
        assert torch.equal(layer.norm.weight, block.norm1.weight) and torch.equal(layer.norm.bias, block.norm1.bias)
    keys = set(unet.state_dict())
    assert keys - set(plain.state_dict()) == {
        k for k in keys if ".attn_sq." in k
    } and len([k for k in keys if ".attn_sq." in k]) == 7 * 7  # norm w/b, q, k, v, out w/b
    # installing again replaces, it does not stack
    install_sii(unet, SupportBank(), "sii")
    assert len([k for k in unet.state_dict() if ".attn_sq." in k]) == 49
    assert all(len(block._forward_pre_hooks) == 1 for _, block in sii_blocks(unet))


@pytest.mark.parametrize("mode", ["sii", "kv_concat"])
def test_off_and_store_modes_are_plain_sd(mode):
    unet = _unet()
    plain = copy.deepcopy(unet)
    bank = SupportBank()
    install_sii(unet, bank, mode)
    x, cond = _inputs(2, 0)
    expected = _run(plain, x, cond)
    assert torch.equal(_run(unet, x, cond), expected)
    with bank.storing() as features:
        out = _run(unet, x, cond)
    assert torch.equal(out, expected)
    names = [name for name, _ in sii_blocks(unet)]
    assert sorted(features) == sorted(names)
    # stored features are the blocks' normed hidden states (attn1's input), captured here by hooks on a plain copy
    seen = {}
    hooks = [
        dict(plain.named_modules())[name].norm1.register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o)
        )
        for name in names
    ]
    _run(plain, x, cond)
    for h in hooks:
        h.remove()
    for name in names:
        assert torch.equal(features[name], seen[name])
        assert features[name].shape[0] == 2 and features[name].ndim == 3


def test_sii_query_pass_equals_sd_at_init_and_differs_once_trained():
    unet = _unet()
    plain = copy.deepcopy(unet)
    bank = SupportBank()
    install_sii(unet, bank, "sii")
    xs, cond = _inputs(1, 0)
    xq, _ = _inputs(1, 1)
    with bank.storing() as features:
        _run(unet, xs, cond)
    with bank.using(features):
        assert torch.equal(_run(unet, xq, cond), _run(plain, xq, cond))
    _randomize_sii(unet)
    with bank.using(features):
        changed = _run(unet, xq, cond)
    assert not torch.allclose(changed, _run(plain, xq, cond), atol=1e-4)
    assert bank.mode == "off" and bank.features is features  # using(...) restores mode and contents


class _Holder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block


class _ReorderedBlock(BasicTransformerBlock):
    """A block whose forward takes ``cross_attention_kwargs`` second: what a diffusers release reordering the block's
    arguments would look like. SII must find the arguments by name, not by position."""

    def forward(self, hidden_states, cross_attention_kwargs=None, encoder_hidden_states=None, attention_mask=None):
        return super().forward(hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                               cross_attention_kwargs=cross_attention_kwargs)


def _block(seed: int = 0, block_type: type = BasicTransformerBlock) -> _Holder:
    torch.manual_seed(seed)
    block = block_type(16, 2, 8, cross_attention_dim=12)
    with torch.no_grad():  # non-trivial norms so that a wrong norm would show
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return _Holder(block)


def _sii_block(holder: _Holder, bank: SupportBank) -> tuple:
    """SII installed on the held block with a non-zero SQ attention, and support, query and condition tokens."""
    install_sii(holder, bank, "sii")
    block = holder.block
    with torch.no_grad():
        for p in block.attn_sq.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 10, 16, generator=g), torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 12, generator=g)
    return (block, *tokens)


def test_sii_block_follows_the_paper_order():
    holder = _block()
    bank = SupportBank()
    block, hs, hq, ctx = _sii_block(holder, bank)
    with torch.no_grad():
        with bank.storing() as features:
            block(hs, encoder_hidden_states=ctx)
        with bank.using(features):
            got = block(hq, encoder_hidden_states=ctx)

        a1, sq, a2 = block.attn1, block.attn_sq.attn, block.attn2
        f_s = block.norm1(hs)
        n = block.norm1(hq)
        h = hq + a1.to_out[0](_mha(a1.to_q(n), a1.to_k(n), a1.to_v(n), 2))  # SAttn(LN1 h)
        n = block.attn_sq.norm(h)
        h = h + sq.to_out[0](_mha(sq.to_q(n), sq.to_k(f_s), sq.to_v(f_s), 2))  # SQAttn(LN_sq h, f_s)
        n = block.norm2(h)
        h = h + a2.to_out[0](_mha(a2.to_q(n), a2.to_k(ctx), a2.to_v(ctx), 2))  # CAttn(LN2 h, E_t)
        expected = h + block.ff(block.norm3(h))  # FFN(LN3 h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kv_concat_attends_to_query_and_support_tokens():
    holder = _block()
    bank = SupportBank()
    assert install_sii(holder, bank, "kv_concat") == []
    block = holder.block
    assert isinstance(block.attn1.processor, KVConcatAttnProcessor) and "attn_sq" not in block._modules
    g = torch.Generator().manual_seed(1)
    hs, hq, ctx = torch.randn(1, 10, 16, generator=g), torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 12, generator=g)
    with torch.no_grad():
        with bank.storing() as features:
            block(hs, encoder_hidden_states=ctx)
        with bank.using(features):
            got = block.attn1(block.norm1(hq))
        a1 = block.attn1
        n, f_s = block.norm1(hq), block.norm1(hs)
        kv = torch.cat([n, f_s], dim=1)
        expected = a1.to_out[0](_mha(a1.to_q(n), a1.to_k(kv), a1.to_v(kv), 2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sii", "kv_concat"])
def test_support_batch_broadcast_and_pairing(mode):
    unet = _unet()
    bank = SupportBank()
    install_sii(unet, bank, mode)
    if mode == "sii":
        _randomize_sii(unet)
    xs, _ = _inputs(2, 0)
    xq, cond = _inputs(4, 1)
    with torch.no_grad():
        with bank.storing() as one:
            _run(unet, xs[:1], cond[:1])
        with bank.using(one):
            batched = _run(unet, xq, cond)
        for i in range(4):
            with bank.using(one):
                torch.testing.assert_close(batched[i:i + 1], _run(unet, xq[i:i + 1], cond[i:i + 1]), rtol=1e-4, atol=1e-5)
        # two supports, four queries: query i uses support i // 2, same as four explicit pairs
        with bank.storing() as two:
            _run(unet, xs, cond[:2])
        with bank.storing() as pairs:
            _run(unet, xs.repeat_interleave(2, dim=0), cond[:2].repeat_interleave(2, dim=0))
        with bank.using(two):
            grouped = _run(unet, xq, cond)
        with bank.using(pairs):
            torch.testing.assert_close(grouped, _run(unet, xq, cond), rtol=1e-4, atol=1e-5)
        with bank.using(two), pytest.raises(ValueError, match="multiple"):
            _run(unet, xq[:3], cond[:3])


def test_bank_errors_and_processor_replacement():
    unet = _unet()
    bank = SupportBank()
    install_sii(unet, bank, "sii")
    x, cond = _inputs(1, 0)
    with bank.using({}), pytest.raises(RuntimeError, match="run the support pass"):
        _run(unet, x, cond)
    with pytest.raises(ValueError, match="SII mode"):
        install_sii(unet, bank, "concat")
    with pytest.raises(ValueError, match="no BasicTransformerBlock"):
        install_sii(nn.Linear(2, 2), bank)
    with pytest.raises(ValueError, match="multiple"):
        match_support_batch(torch.zeros(2, 3), 5)
    assert match_support_batch(torch.zeros(1, 3), 4).shape == (4, 3)
    # set_attn_processor removes SII; the block hook then keeps no reference
    with bank.storing() as features:
        _run(unet, x, cond)
    unet.set_attn_processor(AttnProcessor2_0())
    with bank.using(features):
        _run(unet, x, cond)
    for _, block in sii_blocks(unet):
        assert not isinstance(block.attn1.processor, SupportQueryAttnProcessor)


def test_gradients_through_sii():
    unet = _unet()
    bank = SupportBank()
    install_sii(unet, bank, "sii")
    xs, cond = _inputs(1, 0)
    xq, _ = _inputs(1, 1)
    with bank.storing() as features:
        _run(unet, xs, cond)
    with bank.using(features):
        _run(unet, xq, cond).square().mean().backward()
    for _, block in sii_blocks(unet):
        # the zero output projection receives gradient; what lies before it gets exactly zero at step 0
        assert block.attn_sq.attn.to_out[0].weight.grad.abs().sum() > 0
        assert block.attn_sq.attn.to_q.weight.grad.abs().sum() == 0
    unet.zero_grad()
    _randomize_sii(unet)
    with bank.storing() as features:
        _run(unet, xs, cond)
    with bank.using(features):
        _run(unet, xq, cond).square().mean().backward()
    for _, block in sii_blocks(unet):
        for name, p in block.attn_sq.named_parameters():
            assert p.grad.abs().sum() > 0, name


def _paper_block_output(block, hs, hq, ctx):
    """The paper's four residual steps, recomputed by hand from the block's weights."""
    a1, sq, a2 = block.attn1, block.attn_sq.attn, block.attn2
    f_s = block.norm1(hs)
    n = block.norm1(hq)
    h = hq + a1.to_out[0](_mha(a1.to_q(n), a1.to_k(n), a1.to_v(n), 2))
    n = block.attn_sq.norm(h)
    h = h + sq.to_out[0](_mha(sq.to_q(n), sq.to_k(f_s), sq.to_v(f_s), 2))
    n = block.norm2(h)
    h = h + a2.to_out[0](_mha(a2.to_q(n), a2.to_k(ctx), a2.to_v(ctx), 2))
    return h + block.ff(block.norm3(h))


@pytest.mark.parametrize("positional", [False, True])
def test_explicit_support_kwargs_follow_the_paper_order_without_bank_state(positional, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)  # diffusers logs to its own handler
    holder = _block()
    bank = SupportBank()
    block, hs, hq, ctx = _sii_block(holder, bank)
    with torch.no_grad(), caplog.at_level("WARNING"):
        store: dict = {}
        if positional:  # how diffusers' gradient checkpointing calls a block
            block(hs, None, ctx, None, None, {"support_store": store}, None)
            got = block(hq, None, ctx, None, None, {"support_features": store}, None)
        else:
            block(hs, encoder_hidden_states=ctx, cross_attention_kwargs={"support_store": store})
            got = block(hq, encoder_hidden_states=ctx, cross_attention_kwargs={"support_features": store})
        expected = _paper_block_output(block, hs, hq, ctx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert list(store) == ["block"] and bank.mode == "off" and bank.features == {}
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]  # attn2 drops the support keys
    processor = block.attn1.processor
    assert not any(isinstance(v, torch.Tensor) for v in vars(processor).values())  # nothing kept between calls


@pytest.mark.parametrize("positional", [False, True])
def test_sii_binds_the_block_arguments_by_name_whatever_their_order(positional):
    block, hs, hq, ctx = _sii_block(_block(block_type=_ReorderedBlock), SupportBank())
    with torch.no_grad():
        store: dict = {}
        if positional:
            block(hs, {"support_store": store}, ctx)
            got = block(hq, {"support_features": store}, ctx)
        else:
            block(encoder_hidden_states=ctx, cross_attention_kwargs={"support_store": store}, hidden_states=hs)
            got = block(cross_attention_kwargs={"support_features": store}, hidden_states=hq, encoder_hidden_states=ctx)
        expected = _paper_block_output(block, hs, hq, ctx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sii", "kv_concat"])
def test_explicit_kwargs_equal_the_bank_path(mode):
    unet = _unet()
    bank = SupportBank()
    install_sii(unet, bank, mode)
    if mode == "sii":
        _randomize_sii(unet)
    xs, cond = _inputs(1, 0)
    xq, _ = _inputs(3, 1)
    with torch.no_grad():
        with bank.storing() as features:
            _run(unet, xs, cond)
        with bank.using(features):
            expected = _run(unet, xq, cond.expand(3, -1, -1))
        store: dict = {}
        unet(xs, 999, encoder_hidden_states=cond, cross_attention_kwargs={"support_store": store})
        got = unet(xq, 999, encoder_hidden_states=cond.expand(3, -1, -1), cross_attention_kwargs={"support_features": store}).sample
        plain = _run(unet, xq, cond.expand(3, -1, -1))
    assert sorted(store) == sorted(features) and all(torch.equal(store[k], features[k]) for k in store)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain, atol=1e-4)  # the support reached the query pass
    with pytest.raises(RuntimeError, match="run the support pass"):
        unet(xq, 999, encoder_hidden_states=cond.expand(3, -1, -1), cross_attention_kwargs={"support_features": {}})
