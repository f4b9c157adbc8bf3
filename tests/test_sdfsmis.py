from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from monai_sdfsmis.networks.sdfsmis import SDFSMIS, TINY_CONFIG_DIR, SDFSMISSettings, SupportContext
from monai_sdfsmis.networks.sqi import KVConcatAttnProcessor, SupportQueryAttnProcessor, sii_blocks
from monai_sdfsmis.networks.support_query_unet import DualConvIn
from tests import hand_reference

SIZE = 64  # latent 8x8: fast; the timing test uses the real 256


def _episode(batch: int = 1, size: int = SIZE, seed: int = 0):
    """Structured toy episode: a bright blob on noise, mask = blob; the query blob is shifted."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for shift in (0, size // 16):
        cy = size // 2 + shift + torch.randint(-2, 3, (batch, 1, 1), generator=g)
        cx = size // 2 - shift + torch.randint(-2, 3, (batch, 1, 1), generator=g)
        blob = (((yy - cy) ** 2 + (xx - cx) ** 2) < (size // 5) ** 2).float()[:, None]
        noise = torch.rand(batch, 1, size, size, generator=g) * 0.6 - 0.8
        images.append((noise + 1.2 * blob).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous())
        labels.append(blob)
    return images[0], labels[0], images[1], labels[1]


def _perturb(model: SDFSMIS, seed: int = 1) -> SDFSMIS:
    """Move the zero-initialised parts away from zero so that SII and VTCT influence the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in sii_blocks(model.unet):
            if "attn_sq" in block._modules:
                out = block.attn_sq.attn.to_out[0]
                out.weight.copy_(torch.randn(out.weight.shape, generator=g) * 0.2)
        if model.vtct is not None and hasattr(model.vtct, "gate"):
            model.vtct.gate.fill_(0.5)
    return model


def _names(model: SDFSMIS) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _count(params) -> int:
    return sum(p.numel() for p in params)


def test_tiny_shapes_dtypes_and_interface():
    model = SDFSMIS.tiny(seed=0)
    si, sl, qi, ql = _episode(batch=2)
    model.train()
    loss = model.compute_loss(si, sl, qi, ql)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    model.eval()
    ctx = model.encode_support(si[:1], sl[:1])
    assert isinstance(ctx, SupportContext) and ctx.batch_size == 1
    assert ctx.image_latent.shape == ctx.mask_latent.shape == (1, 4, 8, 8)
    assert ctx.prototype.shape == (1, 1, 4)
    assert ctx.condition.shape == (1, 77, 32)
    assert len(ctx.features) == 7 and all(f.shape[0] == 1 for f in ctx.features.values())
    soft = model.segment(qi, ctx)
    assert soft.shape == (2, 1, SIZE, SIZE) and soft.dtype == torch.float32
    assert soft.min() >= -1 and soft.max() <= 1 and not soft.requires_grad
    mask = model.binarize(soft)
    assert mask.dtype == torch.bool and mask.shape == soft.shape
    assert torch.equal(model(si[:1], sl[:1], qi), soft)


def test_input_convolutions_are_marigold_initialised():
    torch.manual_seed(0)
    sd_conv = UNet2DConditionModel.from_config(json.loads((TINY_CONFIG_DIR / "unet.json").read_text())).conv_in
    model = SDFSMIS.tiny(seed=0)
    conv = model.unet.conv_in
    assert isinstance(conv, DualConvIn)
    expected = torch.cat([sd_conv.weight, sd_conv.weight], dim=1) / 2
    for branch in (conv.query, conv.support):
        assert branch.in_channels == 8
        assert torch.equal(branch.weight, expected) and torch.equal(branch.bias, sd_conv.bias)
    assert conv.query.weight.data_ptr() != conv.support.weight.data_ptr()
    # Marigold's point: a duplicated input reproduces SD's activation
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(conv.query(torch.cat([x, x], 1)), sd_conv(x), rtol=1e-5, atol=1e-6)
    no_qe = SDFSMIS.tiny(seed=0, use_qe=False).unet.conv_in
    assert no_qe.query.in_channels == 4 and torch.equal(no_qe.query.weight, sd_conv.weight)
    assert no_qe.support.in_channels == 8
    shared = SDFSMIS.tiny(seed=0, shared_conv_in=True).unet.conv_in
    assert shared.shared and shared.support is None
    assert SDFSMIS.tiny(seed=0, use_sii=False).unet.conv_in.support is None


def test_query_pass_equals_plain_sd_at_init():
    model = SDFSMIS.tiny(seed=0).eval()
    torch.manual_seed(0)  # tiny() builds the UNet first from this seed
    plain = UNet2DConditionModel.from_config(json.loads((TINY_CONFIG_DIR / "unet.json").read_text()))
    plain.conv_in = copy.deepcopy(model.unet.conv_in.query)
    si, sl, qi, _ = _episode(batch=2)
    with torch.no_grad():
        ctx = model.encode_support(si[:1], sl[:1])
        z_q = model.encode_latents(qi)
        got = model.predict_mask_latent(z_q, ctx)
        sample = model.qe.enhance(z_q, ctx.prototype)
        empty = model.empty_prompt_embedding.expand(2, -1, -1)
        expected = -plain(sample, 999, encoder_hidden_states=empty).sample
    assert torch.equal(got, expected)
    assert torch.equal(ctx.condition, model.empty_prompt_embedding)  # zero VTCT gate


def test_switches_change_only_their_part():
    si, sl, _, _ = _episode()
    default = _perturb(SDFSMIS.tiny(seed=0)).eval()
    base = _names(default)
    sq = {n for n in base if ".attn_sq." in n}
    support_conv = {"unet.conv_in.support.weight", "unet.conv_in.support.bias"}
    assert len(sq) == 7 * 7 and support_conv <= base
    assert {n for n in base if n.startswith("vtct.")} == {
        "vtct.gate", "vtct.positional_embedding", "vtct.mlp.0.weight", "vtct.mlp.0.bias", "vtct.mlp.2.weight",
        "vtct.mlp.2.bias",
    }
    with torch.no_grad():
        ref = default.encode_support(si, sl)
    assert not torch.allclose(ref.condition, default.empty_prompt_embedding)

    def ctx_of(model):
        with torch.no_grad():
            return model.eval().encode_support(si, sl)

    def same_features(a, b):
        return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # use_vtct=False: the condition is the empty-prompt embedding; VTCT parameters are gone
    m = _perturb(SDFSMIS.tiny(seed=0, use_vtct=False, support_condition="empty"))
    assert _names(m) == {n for n in base if not n.startswith("vtct.")} and m.vtct is None
    c = ctx_of(m)
    assert torch.equal(c.condition, m.empty_prompt_embedding)
    assert torch.equal(c.prototype, ref.prototype)
    # use_qe=False: 4-channel query conv (same names), no prototype, support pass untouched
    m = _perturb(SDFSMIS.tiny(seed=0, use_qe=False))
    assert _names(m) == base and m.unet.conv_in.query.in_channels == 4
    c = ctx_of(m)
    assert c.prototype is None and same_features(c.features, ref.features) and torch.equal(c.condition, ref.condition)
    # use_sii=False: no SII layers, no support conv, no support pass
    m = _perturb(SDFSMIS.tiny(seed=0, use_sii=False))
    assert _names(m) == base - sq - support_conv
    assert not any(isinstance(b.attn1.processor, SupportQueryAttnProcessor) for _, b in sii_blocks(m.unet))
    c = ctx_of(m)
    assert c.features is None and torch.equal(c.prototype, ref.prototype) and torch.equal(c.condition, ref.condition)
    # kv_concat: no new weights, same cached support features
    m = _perturb(SDFSMIS.tiny(seed=0, sii_mode="kv_concat"))
    assert _names(m) == base - sq
    assert all(isinstance(b.attn1.processor, KVConcatAttnProcessor) for _, b in sii_blocks(m.unet))
    assert same_features(ctx_of(m).features, ref.features)
    # shared input conv
    assert _names(SDFSMIS.tiny(seed=0, shared_conv_in=True)) == base - support_conv
    # SSP-style QE: fg and bg prototypes
    m = SDFSMIS.tiny(seed=0, qe_mode="ssp")
    assert _names(m) == base and ctx_of(m).prototype.shape == (1, 2, 4)
    # VTCT replace: no gate, condition not tied to the empty prompt
    m = SDFSMIS.tiny(seed=0, vtct_mode="replace")
    assert _names(m) == base - {"vtct.gate"}
    assert not torch.allclose(ctx_of(m).condition, m.empty_prompt_embedding)
    # no image encoder: learned condition
    m = SDFSMIS.tiny(seed=0, with_image_encoder=False)
    assert {n for n in _names(m) if n.startswith("vtct.")} == {"vtct.learned_condition"}
    assert torch.equal(ctx_of(m).condition, m.vtct.learned_condition)
    # the timestep reaches the UNet
    _, _, qi, _ = _episode()
    with torch.no_grad():
        a = _perturb(SDFSMIS.tiny(seed=0)).eval().segment(qi, ref)
        b = _perturb(SDFSMIS.tiny(seed=0, timestep=1)).eval().segment(qi, ref)
    assert not torch.allclose(a, b)


def test_cached_support_equals_uncached_and_batched_equals_single():
    model = _perturb(SDFSMIS.tiny(seed=0)).eval()
    si, sl, _, _ = _episode(batch=1)
    queries = torch.cat([_episode(seed=s)[2] for s in range(3)])
    with torch.no_grad():
        ctx = model.encode_support(si, sl)
        batched = model.segment(queries, ctx)
        assert torch.equal(model.segment(queries, ctx), batched)  # the context is reusable
        moved = ctx.to(torch.float64)
        assert moved.condition.dtype == torch.float64 and all(f.dtype == torch.float64 for f in moved.features.values())
        assert ctx.condition.dtype == torch.float32  # .to returns a new context
        assert torch.equal(model(si, sl, queries), batched)
        for i in range(3):
            torch.testing.assert_close(model.segment(queries[i:i + 1], ctx), batched[i:i + 1], rtol=1e-4, atol=1e-5)
        # one support broadcast to 3 queries == 3 explicit (support, query) pairs, as in training
        z_q = model.encode_latents(queries)
        paired = model.encode_support(si.expand(3, -1, -1, -1), sl.expand(3, -1, -1, -1))
        torch.testing.assert_close(
            model.predict_mask_latent(z_q, ctx), model.predict_mask_latent(z_q, paired), rtol=1e-4, atol=1e-5
        )


# --------------------------------------------------------------------------------------------- method core, by hand
# The tests below recompute Eq. 5 and the decoder from the frozen VAE's own diffusers calls, the scheduler's
# alphas_cumprod and the UNet's recorded in- and outputs (tests/hand_reference.py): a swapped target (support-mask
# latent), a decoder reading one channel, or a query pass without QE fails them.
def _distinct_episode(batch: int = 2, size: int = SIZE, seed: int = 0):
    """Support blob small and upper left, query blob large and lower right: the two mask latents clearly differ."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for cy, cx, radius in ((0.30, 0.30, 1 / 7), (0.62, 0.66, 1 / 4)):
        jitter = (torch.rand(batch, 2, 1, 1, generator=g) - 0.5) * 4
        dist2 = (yy - cy * size - jitter[:, :1]) ** 2 + (xx - cx * size - jitter[:, 1:]) ** 2
        blob = (dist2 < (radius * size) ** 2).float()  # [B, 1, H, W]
        noise = torch.rand(batch, 1, size, size, generator=g) * 0.6 - 0.8
        images.append((noise + 1.2 * blob).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous())
        labels.append(blob)
    return images[0], labels[0], images[1], labels[1]


@pytest.mark.parametrize(
    "settings, mode",
    [
        ({"vae_sample_in_training": False}, "train"),  # posterior means in train mode
        ({}, "eval"),  # default sampling model, eval mode: means
        ({"use_qe": False, "vae_sample_in_training": False}, "train"),
        ({"use_sii": False, "vae_sample_in_training": False}, "train"),
        ({"sii_mode": "kv_concat", "timestep": 1, "vae_sample_in_training": False}, "train"),
    ],
    ids=["full-train", "full-eval", "no-qe", "no-sii", "kv_concat-t1"],
)
def test_loss_is_eq5_recomputed_by_hand(settings, mode):
    """loss == MSE(x0, z_qm): x0 from the recorded query-pass UNet output v by the v-prediction DDIM formula with the
    scheduler's alpha_bar (0 here: x0 = -v), z_qm the query mask encoded by hand; the target read back from the
    gradient is z_qm, far from the support-mask latent z_sm."""
    model = _perturb(SDFSMIS.tiny(seed=0, **settings))
    model.train(mode == "train")
    episode = _distinct_episode()
    with hand_reference.record_unet(model) as calls:
        loss = model.compute_loss(*episode)
    assert [c.branch for c in calls.calls] == (["support", "query"] if model.config.use_sii else ["query"])
    result = hand_reference.hand_loss_check(model, *episode, loss, calls, qe=model.config.use_qe)
    # The loss value alone already separates the query-mask target from the support-mask one by >> its tolerance
    # (measured 1.1-1.4 %), and the target recovered from the gradient by a factor ~1e6 (0.03 RMS vs ~1e-8).
    assert result["margin"] > 2e-3, result
    assert result["target_vs_support"] > 0.02 and result["target_error"] < 1e-6, result


def test_loss_mean_target_part_is_the_posterior_mean_mse_when_sampling():
    model = _perturb(SDFSMIS.tiny(seed=0)).train()  # vae_sample_in_training=True: sampled inputs and target
    si, sl, qi, ql = _distinct_episode()
    with hand_reference.record_unet(model) as calls:
        loss, parts = model.compute_loss(si, sl, qi, ql, return_parts=True)
    query = calls.only("query")
    alpha_bar = hand_reference.one_step_alpha_bar(model.scheduler, model.config.timestep)
    x0 = hand_reference.v_prediction_x0(query.output, query.sample[:, :4], alpha_bar)
    z_qm = hand_reference.scaled_mean_latent(model.vae, hand_reference.mask_image(ql))
    torch.testing.assert_close(parts["loss_mean_target"], ((x0 - z_qm) ** 2).mean())
    assert abs(float(loss.detach()) - float(parts["loss_mean_target"])) > 1e-4  # the loss itself used a sampled target
    # and the sampled query input is not the posterior mean
    assert not torch.allclose(query.sample[:, :4], hand_reference.scaled_mean_latent(model.vae, qi), atol=1e-3)


def test_segment_is_the_hand_decoded_channel_mean():
    """segment == channel mean of clamp(VAE.decode(x0 / scaling_factor)), x0 from the recorded query-pass output;
    binarize == (that > 0). The random tiny VAE decodes three clearly different channels, so a decoder that read
    one channel (or did not clip) would fail."""
    model = _perturb(SDFSMIS.tiny(seed=0)).eval()
    si, sl, qi, _ = _distinct_episode()
    ctx = model.encode_support(si[:1], sl[:1])
    with hand_reference.record_unet(model) as calls:
        soft = model.segment(qi, ctx)
    query = calls.only("query")
    z_si = hand_reference.scaled_mean_latent(model.vae, si[:1]).expand(2, -1, -1, -1)
    z_qi = hand_reference.scaled_mean_latent(model.vae, qi)
    expected_input = hand_reference.hand_query_enhancement(z_si, sl[:1].expand(2, -1, -1, -1), z_qi)
    torch.testing.assert_close(query.sample, expected_input, rtol=1e-5, atol=1e-6)
    x0 = hand_reference.v_prediction_x0(
        query.output, z_qi, hand_reference.one_step_alpha_bar(model.scheduler, model.config.timestep)
    )
    hand_soft, decoded = hand_reference.hand_decode(model.vae, x0)
    torch.testing.assert_close(soft, hand_soft)
    mask = model.binarize(soft)
    assert torch.equal(mask, hand_soft > 0)
    assert 0.05 < mask.float().mean() < 0.95  # both classes present: the threshold at 0 is exercised
    # The variants this pins down really differ on these inputs.
    first_channel = decoded[:, :1]
    assert (first_channel - hand_soft).abs().max() > 0.5 and (first_channel - hand_soft).abs().mean() > 0.05
    assert ((first_channel > 0) != mask).float().mean() > 0.01
    raw = model.vae.decode(x0 / model.vae.config.scaling_factor).sample
    assert (raw.abs() > 1).any()  # the clip matters too
    assert torch.equal(model.segment(qi, ctx), soft)  # and nothing is random in eval mode


_MOVES = 1e-3


def test_prediction_depends_on_the_support_and_nothing_else():
    si, sl, qi, _ = _distinct_episode(batch=1, seed=0)
    other_si, other_sl, _, _ = _distinct_episode(batch=1, seed=5)
    other_sl = other_sl.flip(-1)  # a support mask somewhere else
    other_si = other_si.flip(-1)

    def soft(model, image, label):
        return model.segment(qi, model.encode_support(image, label))

    def differs(a, b):
        return float((a - b).abs().max())

    # "Moves": a max change 1000x the float noise of these models (measured effects at seed 0: 0.015-0.46).
    # Untrained (zero SII output projections, zero VTCT gate): the support reaches the query pass through QE alone.
    plain = SDFSMIS.tiny(seed=0).eval()
    base = soft(plain, si, sl)
    assert differs(base, soft(plain, other_si, other_sl)) > _MOVES
    assert differs(base, soft(plain, si, other_sl)) > _MOVES  # the support *mask* alone moves the prediction
    no_qe = SDFSMIS.tiny(seed=0, use_qe=False).eval()
    assert differs(soft(no_qe, si, sl), soft(no_qe, other_si, other_sl)) < 1e-6  # ... nothing else does at init

    # Trained-like (perturbed) SII alone, and VTCT alone, each carry the support too.
    for settings in ({"use_qe": False}, {"use_qe": False, "use_sii": False}):
        model = _perturb(SDFSMIS.tiny(seed=0, **settings)).eval()
        a = soft(model, si, sl)
        assert differs(a, soft(model, other_si, other_sl)) > _MOVES, settings
        assert differs(a, soft(model, si, other_sl)) > _MOVES, settings

    # Nothing changes when nothing changes: same support twice, a rebuilt network with the same seed.
    model = _perturb(SDFSMIS.tiny(seed=0)).eval()
    a = soft(model, si, sl)
    assert torch.equal(a, soft(model, si, sl))
    assert torch.equal(a, soft(_perturb(SDFSMIS.tiny(seed=0)).eval(), si, sl))
    assert differs(a, soft(model, other_si, other_sl)) > _MOVES


def test_vae_posterior_sample_in_training_mean_in_eval():
    model = SDFSMIS.tiny(seed=0)
    x = _episode()[0]
    model.train()
    assert not torch.equal(model.encode_latents(x), model.encode_latents(x))
    model.eval()
    assert torch.equal(model.encode_latents(x), model.encode_latents(x))
    mean_model = SDFSMIS.tiny(seed=0, vae_sample_in_training=False).train()
    assert torch.equal(mean_model.encode_latents(x), model.encode_latents(x))


def test_frozen_modules_stay_in_eval_and_out_of_parameter_groups():
    model = SDFSMIS.tiny(seed=0).train()
    assert model.unet.training and not model.vae.training and not model.vtct.image_encoder.training
    groups = model.parameter_groups()
    assert [g["name"] for g in groups] == ["unet", "new"]
    assert [g["lr"] for g in groups] == [1e-5, 5e-5] and all(g["weight_decay"] == 1e-2 for g in groups)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert len(in_groups) == sum(len(g["params"]) for g in groups)  # no duplicates
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable
    frozen = list(model.vae.parameters()) + list(model.vtct.image_encoder.parameters())
    assert not any(p.requires_grad for p in frozen) and not in_groups & {id(p) for p in frozen}
    new = {id(p) for p in groups[1]["params"]}
    for module in [model.unet.conv_in, model.vtct.mlp] + [b.attn_sq for _, b in sii_blocks(model.unet)]:
        assert {id(p) for p in module.parameters()} <= new
    assert id(model.vtct.gate) in new and id(model.vtct.positional_embedding) in new
    # a parameter made trainable outside the UNet and the new modules would get no learning rate: refused, named
    model.vae.decoder.conv_out.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"outside the UNet and the new modules: \['vae\.decoder\.conv_out\.weight'"):
        model.parameter_groups()


def test_gradient_flow_and_one_adamw_step():
    model = SDFSMIS.tiny(seed=0).train()
    optimizer = torch.optim.AdamW(model.parameter_groups())
    frozen_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    frozen_before.update({f"enc.{k}": v.clone() for k, v in model.vtct.image_encoder.state_dict().items()})
    empty_before = model.empty_prompt_embedding.clone()
    episode = _episode(batch=1)

    model.compute_loss(*episode).backward()
    zero = {n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0}
    # exactly what sits behind a zero-initialised output (SII out projection, VTCT tanh gate) gets no gradient at step 0
    expected_zero = {
        n for n, _ in model.named_parameters()
        if (".attn_sq." in n and ".to_out." not in n) or n.startswith(("vtct.mlp.", "vtct.positional_embedding"))
        or n.startswith("unet.conv_in.support.")
    }
    assert zero == expected_zero
    optimizer.step()
    optimizer.zero_grad()

    model.compute_loss(*episode).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    after = dict(model.vae.state_dict())
    after.update({f"enc.{k}": v for k, v in model.vtct.image_encoder.state_dict().items()})
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert torch.equal(model.empty_prompt_embedding, empty_before)


def test_state_dict_holds_only_trained_parts_and_round_trips(tmp_path):
    model = _perturb(SDFSMIS.tiny(seed=0))
    opt = torch.optim.AdamW(model.parameter_groups(lr_unet=1e-3, lr_new=1e-3))
    model.train()
    model.compute_loss(*_episode()).backward()
    opt.step()
    model.eval()
    state = model.state_dict()
    assert not any(k.startswith(("vae.", "vtct.image_encoder.")) for k in state)
    assert "empty_prompt_embedding" in state and "vtct.gate" in state and "unet.conv_in.support.weight" in state
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(v.numel() for v in state.values()) == _count(trainable) + model.empty_prompt_embedding.numel()

    si, sl, qi, _ = _episode()
    expected = model(si, sl, qi)

    fresh = SDFSMIS.tiny(seed=0).eval()  # same frozen weights (they come from the pretrained source)
    assert not torch.allclose(fresh(si, sl, qi), expected)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(si, sl, qi), expected)

    # The one loader of trained weights (model folders, infer, the bundle) reads that state dict back strictly.
    from monai_sdfsmis.engines.model_folder import load_network_weights

    torch.save(state, tmp_path / "model.pt")
    loaded = load_network_weights(SDFSMIS.tiny(seed=0), tmp_path / "model.pt").eval()
    assert torch.equal(loaded(si, sl, qi), expected)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_network_weights(SDFSMIS.tiny(seed=0), tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="weights do not match"):
        load_network_weights(SDFSMIS.tiny(seed=0, sii_mode="kv_concat"), tmp_path / "model.pt")
    partial = {k: v for k, v in state.items() if k != "vtct.gate"}
    with pytest.raises(RuntimeError, match="vtct.gate"):
        SDFSMIS.tiny(seed=0).load_state_dict(partial, strict=True)


def test_binarize_modes():
    soft = torch.tensor([-1.0, -0.8, -0.5, 0.0, 0.1, 0.2]).view(1, 1, 2, 3)
    zero = SDFSMIS.tiny(seed=0)
    assert zero.binarize(soft).flatten().tolist() == [False, False, False, False, True, True]
    relative = SDFSMIS.tiny(seed=0, binarize_mode="relative", relative_threshold=0.25)
    # p = (soft + 1) / 2 = [0, .1, .25, .5, .55, .6]; threshold 0.25 * 0.6 = 0.15
    assert relative.binarize(soft).flatten().tolist() == [False, False, True, True, True, True]
    assert not relative.binarize(-torch.ones(2, 1, 4, 4)).any()  # an all-background slice stays empty


def test_bf16_autocast():
    model = _perturb(SDFSMIS.tiny(seed=0))
    si, sl, qi, ql = _episode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        loss = model.compute_loss(si, sl, qi, ql)
        model.eval()
        soft = model(si, sl, qi)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all()
    # bf16 weights (from_pretrained(torch_dtype=torch.bfloat16)) without autocast
    model = model.to(torch.bfloat16)
    loss = model.train().compute_loss(si, sl, qi, ql)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    soft = model.eval()(si, sl, qi)
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all()


def test_bad_inputs_raise_clear_errors():
    model = SDFSMIS.tiny(seed=0).eval()
    si, sl, qi, ql = _episode()
    with pytest.raises(ValueError, match="support mask is empty"):
        model.encode_support(si, torch.zeros_like(sl))
    with pytest.raises(ValueError, match="support mask is empty"):  # also without QE and VTCT
        SDFSMIS.tiny(seed=0, use_qe=False, use_vtct=False).compute_loss(si, torch.zeros_like(sl), qi, ql)
    with pytest.raises(ValueError, match=r"support_image must be \[B, 3, H, W\]"):
        model.encode_support(si[:, :1], sl)
    with pytest.raises(ValueError, match="support_label"):
        model.encode_support(si, sl[..., :32])
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode_support(si[..., :60, :60], sl[..., :60, :60])
    with pytest.raises(ValueError, match="must match"):
        model.compute_loss(si, sl, torch.cat([qi, qi]), torch.cat([ql, ql]))
    ctx = model.encode_support(si, sl)
    with pytest.raises(ValueError, match="support's size"):
        model.segment(torch.zeros(1, 3, 32, 32), ctx)
    with pytest.raises(ValueError, match="soft mask"):
        model.binarize(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="shared_conv_in"):
        SDFSMIS.tiny(seed=0, use_qe=False, shared_conv_in=True)
    with pytest.raises(ValueError, match="timestep"):
        SDFSMIS.tiny(seed=0, timestep=1000)
    with pytest.raises(ValueError, match="sii_mode"):
        SDFSMIS.tiny(seed=0, sii_mode="concat")
    with pytest.raises(ValueError, match="already wrapped"):
        SDFSMIS(model.vae, model.unet, None, model.empty_prompt_embedding)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((TINY_CONFIG_DIR / "unet.json").read_text()))
    with pytest.raises(ValueError, match="empty_prompt_embedding"):
        SDFSMIS(model.vae, unet, None, None, use_vtct=False)
    with pytest.raises(ValueError, match=r"\[1, T, 32\]"):
        SDFSMIS(model.vae, unet, None, torch.zeros(1, 77, 16), use_vtct=False)


def test_settings_are_coerced_checked_and_rebuild_the_same_network():
    settings = SDFSMISSettings(timestep="1", use_qe=0, qe_fallback_k=3.0, relative_threshold="0.5")
    assert (settings.timestep, settings.use_qe, settings.qe_fallback_k, settings.relative_threshold) == (1, False, 3, 0.5)
    assert type(settings.timestep) is int and type(settings.use_qe) is bool and type(settings.qe_fallback_k) is int
    assert settings.support_query == {"use_qe": False, "use_sii": True, "shared_conv_in": False, "sii_mode": "sii"}
    for bad, message in [
        ({"support_condition": "query"}, "support_condition"), ({"binarize_mode": "half"}, "binarize_mode"),
        ({"relative_threshold": 1.0}, "relative_threshold"), ({"foreground_weight": 0}, "foreground_weight"),
        ({"decoded_dice_weight": -1}, "decoded_dice_weight"), ({"timestep": -1}, "timestep"),
    ]:
        with pytest.raises(ValueError, match=message):
            SDFSMISSettings(**bad)
    with pytest.raises(TypeError, match="qe_treshold"):
        SDFSMIS.tiny(seed=0, qe_treshold=0.5)  # a misspelt setting is refused, not ignored
    # what model_config.json stores rebuilds the same network: every setting by name, VTCT's encoder on the side
    net = SDFSMIS.tiny(seed=0, with_image_encoder=False, timestep=1, qe_mode="ssp", binarize_mode="relative")
    stored = dict(net.settings)
    assert stored.pop("image_encoder") is False
    assert stored["timestep"] == 1 and stored["qe_mode"] == "ssp" and stored["binarize_mode"] == "relative"
    assert stored["vae_sample_in_training"] is True and stored["use_sii"] is True  # SDFSMIS's own defaults
    assert set(stored) == {f.name for f in dataclasses.fields(SDFSMISSettings)}
    again = SDFSMIS.tiny(seed=0, with_image_encoder=False, **json.loads(json.dumps(stored)))
    assert again.settings == net.settings and again.qe.mode == "ssp"
    # binarize follows the settings object: p = (soft + 1) / 2 = (0.05, 0.4, 0.8); relative cut 0.25 * 0.8 = 0.2
    soft = torch.tensor([-0.9, -0.2, 0.6]).view(1, 1, 1, 3)
    assert net.binarize(soft).flatten().tolist() == [False, True, True]
    net.config.binarize_mode = "zero"
    assert net.binarize(soft).flatten().tolist() == [False, False, True]


def test_tiny_training_step_time_at_256():
    """One full episode (4 VAE encodes, DINOv2, support + query UNet passes, backward, AdamW) must stay well under
    a second on CPU; asserted with margin against a loaded shared machine."""
    model = SDFSMIS.tiny(seed=0).train()
    optimizer = torch.optim.AdamW(model.parameter_groups())
    episode = _episode(batch=1, size=256)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        optimizer.zero_grad()
        model.compute_loss(*episode).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])  # the first step pays one-off allocations
    print(f"\ntiny SD-FSMIS training step at 256x256 on CPU, 1 thread: {step:.3f} s (median of 3)")
    assert step < 3.0


# Learning is checked by Dice on held-out episodes, not by a falling loss:
# tests/test_no_prior.py::test_no_prior_pipeline_learns_to_segment_held_out_phantoms (a tiny random VAE, as
# SDFSMIS.tiny has, cannot decode masks, so no Dice check is possible with it).


def test_full_size_architecture_on_meta():
    """SD-1.5 + DINOv2-small sizes, no weights: every one of SD's 16 transformer blocks gets its SII layer."""
    from monai_sdfsmis.networks.pretrained import build_dinov2_small, build_sd15_unet, build_sd15_vae

    model = SDFSMIS(build_sd15_vae(), build_sd15_unet(), build_dinov2_small(), torch.zeros(1, 77, 768))
    assert len([b for _, b in sii_blocks(model.unet) if "attn_sq" in b._modules]) == 16
    assert model.vtct.mlp[0].in_features == 384 and model.vtct.mlp[2].out_features == 768
    groups = {g["name"]: _count(g["params"]) for g in model.parameter_groups()}
    assert groups["unet"] == 859_509_124  # SD-1.5's UNet without conv_in (859.52 M with it)
    assert not any(k.startswith(("vae.", "vtct.image_encoder.")) for k in model.state_dict())


def test_from_pretrained_local_folders(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    reference = SDFSMIS.tiny(seed=3)
    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(json.loads((TINY_CONFIG_DIR / "unet.json").read_text()))
    unet.save_pretrained(tmp_path / "sd" / "unet")
    reference.vae.save_pretrained(tmp_path / "sd" / "vae")
    # SD-1.5's vocabulary size lets the loader use SD's fixed empty-prompt ids without a tokenizer folder
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32,
    ))
    text.save_pretrained(tmp_path / "sd" / "text_encoder")
    config = json.loads((TINY_CONFIG_DIR / "dinov2.json").read_text())
    config.pop("model_type")
    Dinov2Model(Dinov2Config(**config)).save_pretrained(tmp_path / "dino")

    model = SDFSMIS.from_pretrained(tmp_path / "sd", tmp_path / "dino", local_files_only=True, sii_mode="kv_concat")
    assert model.settings["sii_mode"] == "kv_concat"
    assert model.empty_prompt_embedding.shape == (1, 77, 32)
    assert torch.equal(model.unet.up_blocks[1].resnets[0].conv1.weight, reference.unet.up_blocks[1].resnets[0].conv1.weight)
    assert torch.equal(model.unet.conv_in.query.weight, reference.unet.conv_in.query.weight)
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.vtct.image_encoder.parameters())
    no_vtct = SDFSMIS.from_pretrained(tmp_path / "sd", tmp_path / "missing", local_files_only=True, use_vtct=False)
    assert no_vtct.vtct is None  # DINOv2 is not even looked for
    si, sl, qi, _ = _episode()
    assert model(si, sl, qi).shape == (1, 1, SIZE, SIZE)


def _loss_and_grads(model: SDFSMIS, episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model.compute_loss(*episode)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sii_mode", ["sii", "kv_concat"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(sii_mode):
    # The recomputation in the backward pass re-runs every transformer block: the support features must reach it
    # as an argument (a pass switch held in state would be "off" by then).
    eager = _perturb(SDFSMIS.tiny(seed=0, sii_mode=sii_mode, vae_sample_in_training=False)).train()
    checkpointed = copy.deepcopy(eager)
    checkpointed.unet.enable_gradient_checkpointing()
    episode = _episode(batch=2)
    loss, grads = _loss_and_grads(eager, episode)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, episode)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and any(".attn_sq." in n for n in grads) == (sii_mode == "sii")
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_unet_compiles_fullgraph_for_training():
    # aot_eager traces with dynamo and AOTAutograd (graph breaks, functionalised backward) without generating
    # code, which is the part this package controls; inductor's code generation is timed in benchmarks/speed.py.
    eager = _perturb(SDFSMIS.tiny(seed=0, vae_sample_in_training=False)).train()
    compiled = copy.deepcopy(eager)
    compiled.unet.compile(fullgraph=True, backend="aot_eager")  # in place: state-dict keys unchanged
    episode = _episode(batch=1)
    try:
        loss, grads = _loss_and_grads(compiled, episode)
        expected_loss, expected_grads = _loss_and_grads(eager, episode)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())


def _vae_mask_latent(vae, label: torch.Tensor) -> torch.Tensor:
    """A mask's scaled posterior-mean latent straight from diffusers' VAE (independent of SDFSMIS's helpers)."""
    image = (label * 2 - 1).repeat(1, 3, 1, 1)
    return vae.encode(image).latent_dist.mean * vae.config.scaling_factor


def test_residual_from_support_starts_from_the_support_copy_and_adds_the_paper_prediction():
    si, sl, qi, ql = _episode(batch=2)
    residual = SDFSMIS.tiny(seed=0, vae_sample_in_training=False, residual_from_support=True).eval()
    assert residual.settings["residual_from_support"] is True
    with torch.no_grad():
        z_sm, z_qm = _vae_mask_latent(residual.vae, sl), _vae_mask_latent(residual.vae, ql)
        # untrained: the prediction is the support's mask latent, decoded as diffusers decodes it
        context = residual.encode_support(si, sl)
        assert torch.allclose(residual.predict_mask_latent(residual.encode_latents(qi), context), z_sm, atol=1e-5)
        decoded = residual.vae.decode(z_sm / residual.vae.config.scaling_factor).sample.clamp(-1, 1).mean(1, keepdim=True)
        assert torch.allclose(residual.segment(qi, context), decoded, atol=1e-5)
        # the training loss at the start is the copy's latent error, by hand
        expected = ((z_sm - z_qm) ** 2).mean()
        assert residual.train().compute_loss(si, sl, qi, ql).item() == pytest.approx(expected.item(), rel=1e-5)
        residual.eval()

        # trained weights (conv_out moved off zero): the paper's prediction with the same weights, plus z_sm
        _perturb(residual)
        torch.nn.init.normal_(residual.unet.conv_out.weight, std=0.05, generator=torch.Generator().manual_seed(3))
        paper = SDFSMIS.tiny(seed=0, vae_sample_in_training=False).eval()
        paper.load_state_dict(residual.state_dict())
        qz = residual.encode_latents(qi)
        got = residual.predict_mask_latent(qz, residual.encode_support(si, sl))
        plain = paper.predict_mask_latent(qz, paper.encode_support(si, sl))
        assert plain.abs().amax() > 1e-3
        assert torch.allclose(got, plain + z_sm, atol=1e-5)
        # one support for many queries: each query is edited from that support's mask latent
        one = residual.encode_support(si[:1], sl[:1])
        many = residual.predict_mask_latent(qz, one)
        assert torch.allclose(many - paper.predict_mask_latent(qz, paper.encode_support(si[:1], sl[:1])),
                              z_sm[:1].expand(2, -1, -1, -1), atol=1e-5)


def test_qe_spatial_reaches_the_query_enhancement_and_the_stored_settings():
    net = SDFSMIS.tiny(seed=0, qe_spatial=True)
    assert net.qe.spatial and net.settings["qe_spatial"] is True
    assert not SDFSMIS.tiny(seed=0).qe.spatial and SDFSMIS.tiny(seed=0).settings["qe_spatial"] is False
