"""A Stable-Diffusion-layout KL autoencoder trained from scratch: the first stage of the no-prior mode.

SD-FSMIS encodes images and masks (3 channels, in [-1, 1]) with SD-1.5's frozen VAE. Without
pretrained weights, the same role is played by a diffusers :class:`~diffusers.AutoencoderKL` of
SD's layout (four ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` levels, so 8x downsampling and a
4x32x32 latent for a 256x256 slice) at reduced width, trained on the user's own slices and on
supervoxel masks (as MONAI's generative bundles train ``train_autoencoder.json`` before the
diffusion model), then frozen. Its latent scaling factor is measured on the data
(:func:`estimate_scaling_factor`) instead of SD's 0.18215.
"""

from __future__ import annotations

__all__ = [
    "AUTOENCODER_WIDTHS",
    "DOWNSAMPLING_FACTORS",
    "build_autoencoder",
    "downsampling_factor",
    "autoencoder_loss",
    "estimate_scaling_factor",
    "reconstruction_metrics",
    "iter_image_batches",
    "save_autoencoder",
    "load_autoencoder",
    "CALIBRATION_FILE",
]

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from monai.metrics import MSEMetric, PSNRMetric, compute_dice

from monai_sdfsmis.utils import atomic_folder

#: Named widths: ``block_out_channels`` and ``norm_num_groups`` of the four levels.
#: ``default`` is SD-1.5's VAE (128, 256, 512, 512) at half width (about 1/4 of its FLOPs);
#: ``light`` is ``small`` with one ResNet block per level: the frozen encoder runs four times per stage-2 episode
#: (both images, both masks), so its cost bounds the episodes a CPU budget buys.
#: ``tiny`` is for CPU tests and smoke runs only.
AUTOENCODER_WIDTHS: dict[str, dict[str, object]] = {
    "default": {"block_out_channels": (64, 128, 256, 256), "norm_num_groups": 32, "layers_per_block": 2},
    "small": {"block_out_channels": (32, 64, 128, 128), "norm_num_groups": 32, "layers_per_block": 2},
    "light": {"block_out_channels": (32, 64, 128, 128), "norm_num_groups": 32, "layers_per_block": 1},
    "tiny": {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4, "layers_per_block": 1},
}

#: Downsampling factors the autoencoder can have: SD's 8x (four levels, 256x256 slice -> 32x32 latent) or 4x (the
#: first three levels): on a small CPU budget, 64x64 slices at 4x keep a 16x16 latent at a quarter of the cost.
DOWNSAMPLING_FACTORS: tuple[int, ...] = (4, 8)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Image side over latent side of ``vae`` (8 for SD's layout): one halving per level but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _resolve_widths(
    block_out_channels: Sequence[int] | str, layers_per_block: int | None, norm_num_groups: int | None, downsampling: int
) -> tuple[tuple[int, ...], int, int]:
    """``(block_out_channels, layers_per_block, norm_num_groups)`` for :func:`build_autoencoder`.

    A width name is looked up in :data:`AUTOENCODER_WIDTHS` and cut to the levels of ``downsampling``; values left
    ``None`` come from that preset, else from SD (2 blocks, 32 groups). The channels are checked for one entry per
    level and for positive counts; ``downsampling`` must already be one of :data:`DOWNSAMPLING_FACTORS`.
    """
    levels = int(math.log2(downsampling)) + 1
    if isinstance(block_out_channels, str):
        if block_out_channels not in AUTOENCODER_WIDTHS:
            raise ValueError(
                f"Unknown autoencoder width '{block_out_channels}'; choose one of {sorted(AUTOENCODER_WIDTHS)} "
                "or give four channel counts."
            )
        preset = AUTOENCODER_WIDTHS[block_out_channels]
        block_out_channels = preset["block_out_channels"][:levels]  # type: ignore[index]
        layers_per_block = preset["layers_per_block"] if layers_per_block is None else layers_per_block  # type: ignore
        norm_num_groups = preset["norm_num_groups"] if norm_num_groups is None else norm_num_groups  # type: ignore
    layers_per_block = 2 if layers_per_block is None else layers_per_block
    norm_num_groups = 32 if norm_num_groups is None else norm_num_groups
    channels = tuple(int(c) for c in block_out_channels)  # type: ignore[union-attr]
    if len(channels) != levels:
        raise ValueError(
            f"block_out_channels must have {levels} entries for {downsampling}x downsampling (one halving per level but "
            f"the last), got {channels}."
        )
    if any(c <= 0 for c in channels):
        raise ValueError(f"block_out_channels must be positive, got {channels}.")
    return channels, layers_per_block, norm_num_groups


def build_autoencoder(
    block_out_channels: Sequence[int] | str = (64, 128, 256, 256),
    latent_channels: int = 4,
    layers_per_block: int | None = None,
    norm_num_groups: int | None = None,
    sample_size: int = 256,
    in_channels: int = 3,
    downsampling: int = 8,
) -> AutoencoderKL:
    """A randomly initialised :class:`~diffusers.AutoencoderKL` with Stable Diffusion's layout.

    Parameters
    ----------
    block_out_channels
        Channels of the four encoder levels (the decoder mirrors them), or a name from
        :data:`AUTOENCODER_WIDTHS` (``"default"``, ``"small"``, ``"light"``, ``"tiny"``), which also sets
        ``layers_per_block`` and ``norm_num_groups`` unless they are given. With ``downsampling=4`` the
        first three levels of a named width are used (three given channel counts also mean 4x).
    latent_channels
        Channels of the latent (4 as in SD; SD-FSMIS concatenates two latents into 8 channels).
    layers_per_block
        ResNet blocks per encoder level (the decoder has one more, as in diffusers). Default 2 (SD).
    norm_num_groups
        GroupNorm groups; must divide every entry of ``block_out_channels``. Default 32 (SD).
    sample_size
        Nominal image size stored in the config (256 in SD-FSMIS); the network itself accepts any
        size divisible by 8.
    in_channels
        Image channels (3: slices and masks are replicated to RGB as for SD).
    downsampling
        Image side over latent side, one of :data:`DOWNSAMPLING_FACTORS`: 8 (SD) or 4.

    Returns
    -------
    AutoencoderKL
        Input ``[B, in_channels, H, W]`` in [-1, 1] -> latent ``[B, latent_channels, H/f, W/f]``, ``f = downsampling``.
        Its ``config.scaling_factor`` is 1.0 until :func:`estimate_scaling_factor` is run on data
        and written with ``vae.register_to_config(scaling_factor=...)``
        (``monai_sdfsmis.engines.autoencoder.freeze_and_calibrate`` does both).

    Raises
    ------
    ValueError
        Unknown width name, a level count that does not match ``downsampling``, non-positive sizes, or groups that
        do not divide the channels.
    """
    if downsampling not in DOWNSAMPLING_FACTORS:
        raise ValueError(f"downsampling must be one of {DOWNSAMPLING_FACTORS}, got {downsampling!r}.")
    channels, layers_per_block, norm_num_groups = _resolve_widths(
        block_out_channels, layers_per_block, norm_num_groups, downsampling
    )
    levels = len(channels)
    for name, value in (("latent_channels", latent_channels), ("layers_per_block", layers_per_block),
                        ("norm_num_groups", norm_num_groups), ("in_channels", in_channels)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels {channels}.")
    if sample_size <= 0 or sample_size % downsampling:
        raise ValueError(
            f"sample_size must be a positive multiple of {downsampling} (the downsampling), got {sample_size}."
        )
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=int(layers_per_block),
        act_fn="silu",
        latent_channels=int(latent_channels),
        norm_num_groups=int(norm_num_groups),
        sample_size=int(sample_size),
        # 1.0 marks "not calibrated yet": the data-derived factor replaces it after training.
        scaling_factor=1.0,
    )


def _check_images(images: torch.Tensor, name: str = "images", channels: int | None = 3) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}.")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(images.shape)}.")
    if images.shape[-1] % 8 or images.shape[-2] % 8:
        raise ValueError(f"{name} height and width must be multiples of 8 (8x VAE), got {tuple(images.shape)}.")


def autoencoder_loss(
    vae: AutoencoderKL,
    images: torch.Tensor,
    kl_weight: float = 1e-6,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 objective: L1 reconstruction plus a small KL term (as MONAI's generative bundles).

    Parameters
    ----------
    vae
        The autoencoder being trained.
    images
        ``[B, 3, H, W]`` in [-1, 1]: image slices and/or masks mapped to {-1, 1}.
    kl_weight
        Weight of the KL divergence to N(0, I). The KL is summed over latent elements and averaged
        over the batch, the L1 term is a per-pixel mean (MONAI's ``brats_mri_generative_diffusion``
        convention), so 1e-6 keeps the latent close to deterministic while bounding its scale.
    sample_posterior
        Decode a posterior sample (how SD's VAE encodes in training) instead of the mean.
    generator
        Random generator for the posterior sample.

    Returns
    -------
    loss
        Scalar tensor ``l1 + kl_weight * kl``.
    parts
        ``{"l1": ..., "kl": ..., "recon": [B, 3, H, W]}``: detached scalars and the reconstruction.
    """
    _check_images(images, channels=vae.config.in_channels)
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
    recon = vae.decode(latents).sample
    l1 = F.l1_loss(recon.float(), images.float())
    # The KL sums thousands of elements per image: compute it in float32 even under bf16 autocast.
    kl = DiagonalGaussianDistribution(posterior.parameters.float()).kl().mean()
    loss = l1 + kl_weight * kl
    return loss, {"l1": l1.detach(), "kl": kl.detach(), "recon": recon.detach()}


def iter_image_batches(
    data: torch.Tensor | Iterable, batch_size: int = 16, key: str = "image", max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield ``[B, C, H, W]`` tensors from a tensor, a data loader of tensors, or of dicts holding ``key``."""
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}.")
    if isinstance(data, torch.Tensor):
        batches: Iterable = data.split(batch_size)
    else:
        batches = data
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            return
        if isinstance(batch, Mapping):
            if key not in batch:
                raise ValueError(f"Batch dictionaries must hold '{key}', got keys {sorted(batch)}.")
            batch = batch[key]
        elif isinstance(batch, (list, tuple)):
            batch = batch[0]
        yield torch.as_tensor(batch)


@torch.no_grad()
def estimate_scaling_factor(
    vae: AutoencoderKL,
    data: torch.Tensor | Iterable,
    max_batches: int | None = None,
    batch_size: int = 16,
    key: str = "image",
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
) -> float:
    """Latent scaling factor measured on data: ``1 / std`` of the posterior-mean (or sampled) latents.

    SD's 0.18215 is this quantity for SD's VAE on its training images; a VAE trained from scratch
    has its own latent scale, and the UNet's target (the mask latent, regressed with MSE) should have
    unit variance for the one-step regression to be well conditioned.

    Parameters
    ----------
    vae
        Trained autoencoder (put in eval mode here).
    data
        ``[N, 3, H, W]`` tensor in [-1, 1], or an iterable of such batches or of dicts with ``key``
        (e.g. a DataLoader over :class:`~monai_sdfsmis.data.slices.SliceDataset`).
    max_batches
        Use at most this many batches.
    batch_size
        Batch size when ``data`` is a tensor.
    key
        Dictionary key of the images.
    sample_posterior
        Measure posterior samples instead of means: use the quantity stage 2 trains on
        (``vae_sample_in_training``), so that its inputs and target have unit variance.
    generator
        Random generator of the samples.

    Returns
    -------
    float
        ``1 / std`` over every element of every latent (population std about the global mean).
    """
    vae.eval()
    param = next(vae.parameters())
    count, total, total_sq = 0, 0.0, 0.0
    for batch in iter_image_batches(data, batch_size=batch_size, key=key, max_batches=max_batches):
        _check_images(batch, "calibration images", channels=vae.config.in_channels)
        posterior = vae.encode(batch.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = (posterior.sample(generator=generator) if sample_posterior else posterior.mean).double()
        count += latents.numel()
        total += latents.sum().item()
        total_sq += latents.square().sum().item()
    if count < 2:
        raise ValueError("No calibration data: the data given to estimate_scaling_factor yielded no images.")
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    std = math.sqrt(variance)
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"Latent std is {std}; the autoencoder produced constant or non-finite latents.")
    return 1.0 / std


def _masks_to_vae(masks: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` in {0, 1} -> ``[N, 3, H, W]`` in {-1, 1} (the convention of ARCHITECTURE.md)."""
    return (masks.float() * 2 - 1).expand(-1, 3, -1, -1)


@torch.no_grad()
def reconstruction_metrics(
    vae: AutoencoderKL,
    images: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Reconstruction quality of the autoencoder (cf. [P] Supp. Tab. 5 for SD's VAE).

    Latents are posterior means (the evaluation-time encoding); outputs are clipped to [-1, 1]. PSNR, MSE and
    Dice are MONAI's (``PSNRMetric``, ``MSEMetric``, ``compute_dice``).

    Parameters
    ----------
    vae
        The autoencoder (put in eval mode here).
    images
        ``[N, 3, H, W]`` image slices in [-1, 1], or ``None``.
    masks
        ``[N, 1, H, W]`` binary masks in {0, 1} (mapped to {-1, 1} and 3 channels here), or ``None``.
    batch_size
        Slices per forward pass.

    Returns
    -------
    dict
        ``image_psnr`` (dB, data range 2, mean over slices of the per-slice PSNR, capped at 100), ``image_mse``
        (on [-1, 1]), ``mask_psnr``, ``mask_mse``, ``mask_dice`` (decoded mask binarised as the
        network does: channel mean > 0; Dice pooled over all slices, 1.0 if both are empty),
        ``num_images``, ``num_masks``. Keys of a missing input are absent.
    """
    if images is None and masks is None:
        raise ValueError("reconstruction_metrics needs images, masks or both.")
    vae.eval()
    param = next(vae.parameters())

    def reconstruct(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device=param.device, dtype=param.dtype)
        latents = vae.encode(batch).latent_dist.mean
        return vae.decode(latents).sample.float().clamp(-1, 1)

    def psnr_and_mse(recons: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, int]:
        """Mean over slices of MONAI's per-slice PSNR (data range 2 for [-1, 1]) and MSE, and the slice count."""
        psnr, mse = PSNRMetric(max_val=2.0, reduction="none"), MSEMetric(reduction="none")
        for recon, target in recons:
            psnr(y_pred=recon, y=target)
            mse(y_pred=recon, y=target)
        # A perfect slice has an infinite PSNR: cap it at 100 dB so that one slice cannot make the mean inf.
        per_slice = psnr.get_buffer().clamp_max(100.0)
        return float(per_slice.mean()), float(mse.get_buffer().mean()), int(per_slice.numel())

    out: dict[str, float] = {}
    if images is not None:
        _check_images(images, "images", channels=vae.config.in_channels)
        pairs = ((reconstruct(batch), batch.to(param.device).float()) for batch in images.split(batch_size))
        image_psnr, image_mse, count = psnr_and_mse(pairs)
        out.update(image_psnr=image_psnr, image_mse=image_mse, num_images=float(count))
    if masks is not None:
        _check_images(masks, "masks", channels=1)
        if not torch.all((masks == 0) | (masks == 1)):
            raise ValueError("masks must be binary {0, 1} [N, 1, H, W] tensors.")
        predicted: list[torch.Tensor] = []

        def mask_pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in masks.split(batch_size):
                target = _masks_to_vae(batch).to(param.device)
                recon = reconstruct(target)
                predicted.append((recon.mean(dim=1, keepdim=True) > 0).cpu())  # the network's binarisation
                yield recon, target

        mask_psnr, mask_mse, count = psnr_and_mse(mask_pairs())
        # Dice pooled over all slices (not a mean of per-slice Dice): MONAI's Dice of the slices stacked into
        # one [1, 1, N, H, W] volume; ignore_empty=False gives 1 when both are empty.
        stack = torch.cat(predicted).permute(1, 0, 2, 3)[None].float()
        truth = (masks > 0.5).permute(1, 0, 2, 3)[None].float()
        dice = compute_dice(stack, truth, include_background=True, ignore_empty=False)
        out.update(mask_dice=float(dice), mask_psnr=mask_psnr, mask_mse=mask_mse, num_masks=float(count))
    return out


#: Written beside ``config.json`` by :func:`save_autoencoder`: how the scaling factor was obtained.
CALIBRATION_FILE = "calibration.json"


def save_autoencoder(vae: AutoencoderKL, folder: str | PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save the autoencoder as a diffusers folder (``config.json`` + safetensors), atomically.

    The folder is written under a temporary name beside ``folder`` and renamed into place, so a
    reader never sees a half-written model; an existing ``folder`` is replaced. Stage 2 loads it with
    :func:`load_autoencoder` or plain ``AutoencoderKL.from_pretrained(folder)``.

    Parameters
    ----------
    vae
        The (calibrated) autoencoder.
    folder
        Destination folder.
    metadata
        Extra JSON-serialisable facts (training iterations, data, metrics) stored in
        ``calibration.json`` together with ``vae.sdfsmis_calibration`` (set by
        ``monai_sdfsmis.engines.autoencoder.freeze_and_calibrate``).

    Returns
    -------
    Path
        ``folder``.
    """
    record: dict[str, Any] = {"scaling_factor": float(vae.config.scaling_factor)}
    calibration = getattr(vae, "sdfsmis_calibration", None)
    record["calibrated"] = calibration is not None
    if calibration is not None:
        record.update(calibration)
    if metadata:
        record["metadata"] = dict(metadata)
    target = Path(folder).expanduser()
    with atomic_folder(target) as tmp:  # refuses a target that is a file
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / CALIBRATION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return target


def load_autoencoder(
    folder: str | PathLike, device: str | torch.device | None = None, require_calibration: bool = True
) -> AutoencoderKL:
    """Load a frozen autoencoder saved by :func:`save_autoencoder` (any diffusers AutoencoderKL folder).

    Parameters
    ----------
    folder
        Diffusers folder with ``config.json`` and weights.
    device
        Where to put it (default: CPU).
    require_calibration
        Refuse a folder whose ``calibration.json`` is missing or does not record a data-derived scaling
        factor (a stage-1 run that skipped ``freeze_and_calibrate``). Set ``False`` for other VAEs
        (e.g. SD's, whose factor 0.18215 is in its config).

    Returns
    -------
    AutoencoderKL
        In eval mode, gradients off; ``sdfsmis_calibration`` holds the calibration record when present.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Autoencoder folder '{root}' does not exist.")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"Autoencoder folder '{root}' has no config.json (expected a diffusers save_pretrained folder).")
    if not any(root.glob("diffusion_pytorch_model*")):
        raise FileNotFoundError(f"Autoencoder folder '{root}' has no diffusion_pytorch_model weights file.")
    record: dict[str, Any] | None = None
    calibration_path = root / CALIBRATION_FILE
    if calibration_path.is_file():
        try:
            record = json.loads(calibration_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"Calibration file '{calibration_path}' is not valid JSON: {err}") from err
    if require_calibration and not (record and record.get("calibrated")):
        raise ValueError(
            f"Autoencoder folder '{root}' has no data-derived latent scaling factor ('{CALIBRATION_FILE}' missing or "
            "not calibrated); run monai_sdfsmis.engines.autoencoder.freeze_and_calibrate before saving, or pass "
            "require_calibration=False."
        )
    vae = AutoencoderKL.from_pretrained(root, low_cpu_mem_usage=False)  # no accelerate notice; the model is small
    if record and record.get("calibrated") and not math.isclose(
        float(record["scaling_factor"]), float(vae.config.scaling_factor), rel_tol=1e-6
    ):
        raise ValueError(
            f"Autoencoder folder '{root}': config.json scaling_factor {vae.config.scaling_factor} differs from the "
            f"calibrated {record['scaling_factor']} in '{calibration_path}'."
        )
    vae.requires_grad_(False).eval()
    if device is not None:
        vae.to(device)
    if record and record.get("calibrated"):
        vae.sdfsmis_calibration = {k: v for k, v in record.items() if k not in ("metadata", "calibrated")}
    return vae
