"""No-prior mode: SD-FSMIS built from scratch on the user's own scans, without any pretrained weights.

The mechanism is SD-FSMIS's (:class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS`: frozen KL autoencoder,
UNet with SII or kv_concat, QE, one-step x0 prediction); what changes is where the weights come from:

* the autoencoder is stage 1 (``monai_sdfsmis.networks.autoencoder``, trained on slices and supervoxel
  masks, frozen, latent scale measured on the data);
* the UNet has SD-1.5's layout at reduced width and is trained from scratch on supervoxel episodes;
* VTCT has no DINOv2: it falls back to a **learned condition embedding** ``[1, 77, D]``
  (:class:`~monai_sdfsmis.networks.vtct.VisualToTextualConditionTranslator` with ``image_encoder=None``),
  i.e. one trained "prompt" shared by all supports; support-specific information reaches the UNet
  through SII and QE only.

Width and throughput (why the defaults)
---------------------------------------
Measured anchors (one H100 80GB, randomly initialised SD-1.5-sized models, 256x256 input): UNet 171.6 GFLOP per
4x32x32 forward, VAE encoder 270.6 GFLOP per image; one training episode (4 VAE encodes, support +
query UNet passes, backward) took 28.5 ms in bf16 at batch 8, i.e. about 2.1 TFLOP per episode.

Counted with ``torch.utils.flop_counter`` for the no-prior widths:

============  ============================  ========  ===================  ======================
part          width                         params    GFLOP (one forward)  vs SD-1.5
============  ============================  ========  ===================  ======================
UNet default  (128, 256, 256, 256), 8 heads  52.1 M    19.3 (4x32x32)       8.9x cheaper
UNet small    (64, 128, 256, 256), 4 heads   35.0 M     6.9                 25x cheaper
UNet compact  (32, 64, 128, 128), 4 heads    8.8 M     not counted         -
AE default    (64, 128, 256, 256)            20.9 M    67.8 enc / 155 dec   4x cheaper
============  ============================  ========  ===================  ======================

One stage-2 episode is then about 4 x 68 (frozen encoder) + 3 x 2 x 19.3 (two UNet passes, forward
and backward) = about 390 GFLOP, 5.4x less than the SD path, so at the SD path's measured efficiency
about 5 ms per episode: some 70k episodes in a 6-minute stage-2 budget, several times the paper's
15k. The frozen encoder is already ~70% of that cost, so a narrower UNet would barely speed training
up, while a much wider one (``(128, 256, 512, 512)``, 27.8 GFLOP, ``"wide"``) adds only ~12% per
episode but converges slower from scratch in a fixed time; ``default`` sits between. The UNet
attends at the three finest levels (SD's layout), 8 heads of 16-32 channels; the cross-attention
width is that of the deepest level (256), enough for a single learned condition.
"""

from __future__ import annotations

__all__ = ["UNET_WIDTHS", "build_no_prior_unet", "build_no_prior_sdfsmis", "frozen_autoencoder", "build_seeded"]

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from monai_sdfsmis.networks.autoencoder import downsampling_factor, load_autoencoder
from monai_sdfsmis.networks.sdfsmis import SDFSMIS

T = TypeVar("T")

#: Named UNet widths for the no-prior mode (see the module docstring for the reasoning).
UNET_WIDTHS: dict[str, dict[str, Any]] = {
    "wide": {"block_out_channels": (128, 256, 512, 512), "attention_head_dim": 8, "cross_attention_dim": 512,
             "layers_per_block": 2, "norm_num_groups": 32},
    "default": {"block_out_channels": (128, 256, 256, 256), "attention_head_dim": 8, "cross_attention_dim": 256,
                "layers_per_block": 2, "norm_num_groups": 32},
    "small": {"block_out_channels": (64, 128, 256, 256), "attention_head_dim": 4, "cross_attention_dim": 256,
              "layers_per_block": 2, "norm_num_groups": 32},
    "compact": {"block_out_channels": (32, 64, 128, 128), "attention_head_dim": 4, "cross_attention_dim": 128,
                "layers_per_block": 2, "norm_num_groups": 32},
    "tiny": {"block_out_channels": (16, 32, 32, 32), "attention_head_dim": 2, "cross_attention_dim": 32,
             "layers_per_block": 1, "norm_num_groups": 8},
}


def build_no_prior_unet(
    block_out_channels: Sequence[int] | str = "default",
    cross_attention_dim: int | None = None,
    layers_per_block: int | None = None,
    attention_head_dim: int | Sequence[int] | None = None,
    norm_num_groups: int | None = None,
    latent_channels: int = 4,
    sample_size: int = 32,
) -> UNet2DConditionModel:
    """A randomly initialised ``UNet2DConditionModel`` with SD-1.5's layout at reduced width.

    SD's layout: cross-attention down blocks at every level but the coarsest (``DownBlock2D``), a
    cross-attention mid block, the mirror image on the way up; 4-channel ``conv_in``/``conv_out``
    (:class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` replaces ``conv_in`` with its 8-channel pair).

    Parameters
    ----------
    block_out_channels
        Channels per level (SD-1.5: ``(320, 640, 1280, 1280)``), or a name of :data:`UNET_WIDTHS`
        (``"default"``, ``"wide"``, ``"small"``, ``"compact"``, ``"tiny"``), which also provides the other settings
        unless they are given.
    cross_attention_dim
        Width ``D`` of the condition tokens (VTCT's learned condition is ``[1, 77, D]``).
    layers_per_block
        ResNet/transformer layers per level (SD: 2).
    attention_head_dim
        As diffusers' SD configs use it: the **number of heads** per level (SD-1.5: 8).
    norm_num_groups
        GroupNorm groups; must divide every level's channels.
    latent_channels
        Channels of the autoencoder's latent (input and output of the UNet).
    sample_size
        Latent side (image side over the autoencoder's downsampling).

    Returns
    -------
    UNet2DConditionModel
        ``[B, latent_channels, h, w]``, timestep, condition ``[B, T, D]`` -> ``[B, latent_channels, h, w]``.
    """
    preset: dict[str, Any] = {}
    if isinstance(block_out_channels, str):
        if block_out_channels not in UNET_WIDTHS:
            raise ValueError(
                f"Unknown UNet width '{block_out_channels}'; choose one of {sorted(UNET_WIDTHS)} or give channel counts."
            )
        preset = UNET_WIDTHS[block_out_channels]
        block_out_channels = preset["block_out_channels"]
    channels = tuple(int(c) for c in block_out_channels)
    cross_attention_dim = int(cross_attention_dim or preset.get("cross_attention_dim", max(channels)))
    layers_per_block = int(layers_per_block or preset.get("layers_per_block", 2))
    heads = attention_head_dim if attention_head_dim is not None else preset.get("attention_head_dim", 8)
    norm_num_groups = int(norm_num_groups or preset.get("norm_num_groups", 32))
    if len(channels) < 2:
        raise ValueError(f"block_out_channels needs at least 2 levels, got {channels}.")
    if any(c <= 0 for c in channels) or cross_attention_dim <= 0 or layers_per_block <= 0 or latent_channels <= 0:
        raise ValueError(
            f"UNet sizes must be positive: block_out_channels={channels}, cross_attention_dim={cross_attention_dim}, "
            f"layers_per_block={layers_per_block}, latent_channels={latent_channels}."
        )
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels {channels}.")
    head_list = [int(heads)] * len(channels) if isinstance(heads, int) else [int(h) for h in heads]
    if len(head_list) != len(channels) or any(h <= 0 or c % h for h, c in zip(head_list, channels)):
        raise ValueError(
            f"attention_head_dim (heads per level) {heads} must be positive and divide block_out_channels {channels}."
        )
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=int(sample_size),
        in_channels=int(latent_channels),
        out_channels=int(latent_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_list[0] if isinstance(heads, int) else tuple(head_list),
    )


def build_no_prior_sdfsmis(
    autoencoder: AutoencoderKL | str | PathLike,
    unet_channels: Sequence[int] | str = "default",
    *,
    cross_attention_dim: int | None = None,
    layers_per_block: int | None = None,
    attention_head_dim: int | Sequence[int] | None = None,
    norm_num_groups: int | None = None,
    seed: int | None = None,
    require_calibration: bool = True,
    **sdfsmis_settings: Any,
) -> SDFSMIS:
    """SD-FSMIS with a stage-1 autoencoder, a from-scratch UNet and VTCT's learned condition.

    Parameters
    ----------
    autoencoder
        The frozen stage-1 autoencoder, or its diffusers folder (loaded with
        :func:`~monai_sdfsmis.networks.autoencoder.load_autoencoder`). Its ``config.scaling_factor``
        must be the data-derived one (``freeze_and_calibrate``).
    unet_channels
        UNet width: a name of :data:`UNET_WIDTHS` or channels per level.
    cross_attention_dim, layers_per_block, attention_head_dim, norm_num_groups
        Override the width preset (:func:`build_no_prior_unet`).
    seed
        Seed of the UNet and VTCT initialisation (the global RNG is left untouched); ``None`` uses it.
    require_calibration
        When ``autoencoder`` is a folder: refuse one without a data-derived scaling factor.
    sdfsmis_settings
        Keyword arguments of :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` (``use_sii``, ``use_qe``,
        ``use_vtct``, ``sii_mode``, ``timestep``, ...). ``image_encoder`` is always ``None``: VTCT
        uses its learned condition embedding. When a constant "empty prompt" is needed
        (``use_vtct=False`` or ``support_condition="empty"``) it is an all-zero ``[1, 77, D]`` tensor,
        since there is no text encoder. ``vae_sample_in_training`` defaults to ``False`` here (posterior
        means in training too, see below); when it is set, calibrate the autoencoder on posterior
        samples as well (``freeze_and_calibrate(..., sample_posterior=True)``).

    Returns
    -------
    SDFSMIS
        On the autoencoder's device, UNet in float32.
    """
    # Posterior means everywhere: a from-scratch autoencoder's posterior sigma is a large share of its latent std, so a
    # posterior sample puts noise into the inputs and the target that no model can predict.
    sdfsmis_settings.setdefault("vae_sample_in_training", False)
    for key in ("image_encoder", "empty_prompt_embedding", "vae", "unet"):
        if key in sdfsmis_settings:
            raise ValueError(f"build_no_prior_sdfsmis builds '{key}' itself; do not pass it.")
    vae, sample_size, device = frozen_autoencoder(autoencoder, require_calibration)

    def build() -> SDFSMIS:
        unet = build_no_prior_unet(
            unet_channels,
            cross_attention_dim=cross_attention_dim,
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            latent_channels=int(vae.config.latent_channels),
            sample_size=sample_size,
        ).to(device)
        tokens = int(sdfsmis_settings.get("vtct_tokens", 77))
        needs_constant = not sdfsmis_settings.get("use_vtct", True) or sdfsmis_settings.get("support_condition") == "empty"
        empty = torch.zeros(1, tokens, int(unet.config.cross_attention_dim), device=device) if needs_constant else None
        return SDFSMIS(vae, unet, None, empty, **sdfsmis_settings).to(device)

    return build_seeded(build, seed, device)


def frozen_autoencoder(
    autoencoder: AutoencoderKL | str | PathLike, require_calibration: bool = True
) -> tuple[AutoencoderKL, int, torch.device]:
    """The stage-1 autoencoder (given, or loaded from its folder), the UNet's latent side and the device."""
    if isinstance(autoencoder, AutoencoderKL):
        vae = autoencoder
    elif isinstance(autoencoder, (str, PathLike)):
        vae = load_autoencoder(autoencoder, require_calibration=require_calibration)
    else:
        raise ValueError(f"autoencoder must be an AutoencoderKL or a folder path, got {type(autoencoder).__name__}.")
    sample_size = int(vae.config.sample_size) // downsampling_factor(vae) if vae.config.sample_size else 32
    return vae, sample_size, next(vae.parameters()).device


def build_seeded(build: Callable[[], T], seed: int | None, device: torch.device) -> T:
    """``build()`` with the torch RNG seeded by ``seed`` and restored afterwards (``None``: the current RNG)."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        return build()
