from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from monai_sdfsmis.networks.sdfsmis import TINY_CONFIG_DIR
from monai_sdfsmis.networks.vtct import IMAGENET_MEAN, IMAGENET_STD, VisualToTextualConditionTranslator

D, T = 24, 77


def _encoder(seed: int = 0) -> Dinov2Model:
    config = json.loads((TINY_CONFIG_DIR / "dinov2.json").read_text())
    config.pop("model_type")
    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**config))


def _support(batch: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 4: size // 2, size // 8: size // 2] = 1
    return image, mask


def test_add_mode_shapes_and_zero_gate_gives_empty_prompt():
    vtct = VisualToTextualConditionTranslator(_encoder(), cross_attention_dim=D, num_tokens=T)
    empty = torch.randn(1, T, D)
    image, mask = _support()
    cond = vtct(image, mask, empty)
    assert cond.shape == (2, T, D) and cond.dtype == torch.float32
    assert torch.equal(cond, empty.expand(2, -1, -1))  # tanh(0) = 0: SD's empty prompt at step 0
    with torch.no_grad():
        vtct.gate.fill_(0.5)
    cond = vtct(image, mask, empty)
    other = mask.clone()
    other[:, :, 40:60, 40:60] = 1
    assert not torch.allclose(cond, empty.expand(2, -1, -1))
    assert not torch.allclose(cond, vtct(image, other, empty))  # the mask steers the condition


def test_encoder_frozen_and_kept_in_eval():
    encoder = _encoder()
    vtct = VisualToTextualConditionTranslator(encoder, cross_attention_dim=D, num_tokens=T)
    vtct.train()
    assert vtct.training and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    trainable = {n for n, p in vtct.named_parameters() if p.requires_grad}
    assert trainable == {"gate", "positional_embedding", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert isinstance(vtct.mlp[1], torch.nn.GELU)
    assert vtct.mlp[0].in_features == 32 and vtct.mlp[2].out_features == D
    assert torch.count_nonzero(vtct.gate) == 0
    assert 0.005 < vtct.positional_embedding.std().item() < 0.05  # trunc-normal std 0.02


def test_visual_prototype_matches_manual_masked_average():
    encoder = _encoder()
    vtct = VisualToTextualConditionTranslator(encoder, cross_attention_dim=D, num_tokens=T)
    image, mask = _support(batch=1, size=256)
    mask[:, :, 100:110, 200:230] = 1
    x = ((image + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        tokens = encoder(pixel_values=x).last_hidden_state[0, 1:]  # drop CLS
        assert tokens.shape == (256, 32)  # 16 x 16 patches of 14
        weights = F.interpolate(mask, size=(16, 16), mode="area").flatten()
        expected = (tokens * weights[:, None]).sum(0) / weights.sum()
        got = vtct.visual_prototype(image, mask)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_replace_mode_ignores_empty_prompt():
    vtct = VisualToTextualConditionTranslator(_encoder(), cross_attention_dim=D, num_tokens=8, mode="replace")
    assert not hasattr(vtct, "gate")
    image, mask = _support()
    cond = vtct(image, mask, None)
    assert cond.shape == (2, 8, D)
    with torch.no_grad():
        expected = vtct.mlp(vtct.visual_prototype(image, mask))[:, None] + vtct.positional_embedding
    torch.testing.assert_close(cond, expected)


def test_no_prior_mode_uses_learned_condition():
    vtct = VisualToTextualConditionTranslator(None, cross_attention_dim=D, num_tokens=T)
    assert [n for n, _ in vtct.named_parameters()] == ["learned_condition"]
    image, mask = _support(batch=3)
    cond = vtct(image, mask, None)
    assert cond.shape == (3, T, D)
    assert torch.equal(cond[0], vtct.learned_condition[0]) and torch.equal(cond[2], cond[0])
    assert vtct(None, None, None).shape == (1, T, D)
    cond.sum().backward()
    assert vtct.learned_condition.grad is not None and vtct.learned_condition.grad.abs().sum() > 0


def test_register_tokens_are_dropped():
    config = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, num_register_tokens=4, patch_size=14
    )
    vtct = VisualToTextualConditionTranslator(Dinov2WithRegistersModel(config), cross_attention_dim=D, num_tokens=T)
    assert vtct.num_prefix_tokens == 5
    image, mask = _support(batch=1)
    assert vtct.visual_prototype(image, mask).shape == (1, 32)


def test_gradients_reach_gate_at_init_and_mlp_afterwards():
    vtct = VisualToTextualConditionTranslator(_encoder(), cross_attention_dim=D, num_tokens=T)
    empty = torch.randn(1, T, D)
    image, mask = _support()
    target = torch.randn(2, T, D)
    F.mse_loss(vtct(image, mask, empty), target).backward()
    assert vtct.gate.grad.abs().sum() > 0
    # tanh(0) = 0 blocks the MLP at init (ODISE's zero gate): its gradient is exactly zero at step 0
    assert vtct.mlp[0].weight.grad.abs().sum() == 0
    with torch.no_grad():
        vtct.gate.fill_(0.1)
    vtct.zero_grad()
    F.mse_loss(vtct(image, mask, empty), target).backward()
    for name, p in vtct.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name


def test_errors():
    vtct = VisualToTextualConditionTranslator(_encoder(), cross_attention_dim=D, num_tokens=T)
    image, mask = _support()
    mask[1] = 0
    with pytest.raises(ValueError, match="support mask is empty: VTCT needs at least one foreground pixel"):
        vtct(image, mask, torch.zeros(1, T, D))
    image, mask = _support()
    with pytest.raises(ValueError, match="empty-prompt embedding"):
        vtct(image, mask, None)
    with pytest.raises(ValueError, match="empty-prompt embedding"):
        vtct(image, mask, torch.zeros(1, 10, D))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vtct(image[:, :1], mask, torch.zeros(1, T, D))
    with pytest.raises(ValueError, match="VTCT mode"):
        VisualToTextualConditionTranslator(None, mode="concat")
    with pytest.raises(ValueError, match="patch size"):
        VisualToTextualConditionTranslator(_encoder(), cross_attention_dim=D, input_size=200)
