"""SD-FSMIS's UNet (two input convolutions, SII) saves and loads through diffusers' own save_pretrained/from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from monai_sdfsmis.networks.sdfsmis import SDFSMIS, TINY_CONFIG_DIR
from monai_sdfsmis.networks.sqi import SUPPORT_FEATURES_KEY, SUPPORT_STORE_KEY, SupportQueryAttnProcessor, sii_blocks
from monai_sdfsmis.networks.support_query_unet import DualConvIn, SupportQueryUNet

SETTINGS = {"use_qe": True, "use_sii": True, "shared_conv_in": False, "sii_mode": "sii"}


def _sd_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(json.loads((TINY_CONFIG_DIR / "unet.json").read_text()))


def _trained_looking(unet: SupportQueryUNet, seed: int = 1) -> SupportQueryUNet:
    """Move the parts that start at zero or as copies away from it, as training does, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in sii_blocks(unet):
            out = block.attn_sq.attn.to_out[0]
            out.weight.copy_(torch.randn(out.weight.shape, generator=g) * 0.2)
        unet.conv_in.support.weight.add_(0.1)
    return unet


def _both_passes(unet: SupportQueryUNet, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The support pass and the query pass that consumes its features, on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    support, query = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 8, 8, 8, generator=g)
    condition = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=g)
    features: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        support_out = unet.run_branch(support, 999, condition, "support", {SUPPORT_STORE_KEY: features})
        query_out = unet.run_branch(query, 999, condition, "query", {SUPPORT_FEATURES_KEY: features})
    return support_out, query_out


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_save_pretrained_and_from_pretrained_restore_every_module_and_output(tmp_path, low_cpu_mem_usage):
    unet = _trained_looking(SDFSMIS.tiny(seed=0).unet).eval()
    unet.save_pretrained(tmp_path / "unet")

    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "SupportQueryUNet" and config["support_query"] == SETTINGS
    assert config["in_channels"] == 4  # SD's latent width; the 8-channel convolutions are built from it

    loaded = SupportQueryUNet.from_pretrained(tmp_path / "unet", low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(loaded.conv_in, DualConvIn) and loaded.conv_in.support.in_channels == 8
    blocks = sii_blocks(loaded)
    assert len(blocks) == 7 and all(isinstance(b.attn1.processor, SupportQueryAttnProcessor) for _, b in blocks)
    expected, got = unet.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for a, b in zip(_both_passes(unet), _both_passes(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_plain_config_loads_as_sd_and_sd_weights_load_into_it(tmp_path):
    """SD's own UNet folder (no support_query key) loads as SD's UNet; from_unet then adds SD-FSMIS's modules."""
    sd = _sd_unet()
    sd.save_pretrained(tmp_path / "sd_unet")
    plain = SupportQueryUNet.from_pretrained(tmp_path / "sd_unet")
    assert plain.config.support_query is None and isinstance(plain.conv_in, torch.nn.Conv2d) and plain.new_modules == []
    converted = SupportQueryUNet.from_unet(plain, SETTINGS)
    for name, weight in sd.state_dict().items():
        if not name.startswith("conv_in."):
            assert torch.equal(converted.state_dict()[name], weight), name
    assert not any(t.is_meta for t in converted.state_dict().values())
    assert len(converted.new_modules) == 1 + 7  # the input convolutions and one attn_sq per transformer block


def test_from_unet_shares_sd_weights_and_keeps_the_global_rng():
    sd = _sd_unet()
    state = torch.random.get_rng_state()
    converted = SupportQueryUNet.from_unet(sd, SETTINGS)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert converted.conv_out.weight.data_ptr() == sd.conv_out.weight.data_ptr()  # assigned, not copied
    expected = torch.cat([sd.conv_in.weight, sd.conv_in.weight], dim=1) / 2  # Marigold, from SD's kernel
    assert torch.equal(converted.conv_in.query.weight, expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({**SETTINGS, "shared_conv_in": True, "use_qe": False}, "shared_conv_in=True needs use_qe=True"),
        ({**SETTINGS, "sii_mode": "concat"}, "sii_mode must be one of"),
        ({"use_qe": True}, "missing ['use_sii', 'shared_conv_in', 'sii_mode']"),
    ],
)
def test_bad_support_query_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SupportQueryUNet.from_unet(_sd_unet(), settings)


def test_a_converted_unet_is_not_converted_twice():
    converted = SupportQueryUNet.from_unet(_sd_unet(), SETTINGS)
    with pytest.raises(ValueError, match="already wrapped"):
        SupportQueryUNet.from_unet(converted, SETTINGS)
