"""What every latent segmenter of this package shares: a frozen autoencoder that encodes slices and masks and decodes
predicted mask latents, and the rule that turns a decoded soft mask into a mask.

:class:`FrozenAutoencoderMixin` is the base of :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` (few-shot) and
:class:`~monai_sdfsmis.networks.supervised.SupervisedLatentSegmenter` (supervised). A subclass calls
:meth:`~FrozenAutoencoderMixin.adopt_frozen_autoencoder` in its constructor, keeps its settings as ``config`` (a
:class:`LatentSegmenterSettings`) and has a ``unet``.
"""

from __future__ import annotations

__all__ = ["BINARIZE_MODES", "FrozenAutoencoderMixin", "LatentSegmenterSettings"]

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from diffusers import AutoencoderKL, ModelMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

#: ``"zero"``: soft > 0; ``"relative"`` (DiffewS): ``(soft + 1) / 2`` above a fraction of its per-slice maximum.
BINARIZE_MODES = ("zero", "relative")

_SCALAR_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


@dataclass
class LatentSegmenterSettings:
    """The settings every latent segmenter shares, coerced to their types and checked on construction.

    Attributes
    ----------
    timestep
        UNet timestep of the one-step prediction (999 paper, 1 DiffewS code).
    foreground_weight
        Training only: weight of the latent cells the organ touches in the loss
        (:func:`~monai_sdfsmis.networks.latent_loss.latent_mse`); 1 is the paper's plain MSE.
    vae_sample_in_training
        Sample the autoencoder's posterior in ``train()`` mode (SD's VAE, as DiffewS); the posterior mean otherwise.
    binarize_mode, relative_threshold
        :meth:`FrozenAutoencoderMixin.binarize`: ``"zero"`` (soft > 0) or ``"relative"`` (DiffewS: ``(soft + 1) / 2``
        above ``relative_threshold`` times its per-slice maximum).
    """

    timestep: int = 999
    foreground_weight: float = 1.0
    vae_sample_in_training: bool = False
    binarize_mode: str = "zero"
    relative_threshold: float = 0.25

    def __post_init__(self) -> None:
        for field in fields(self):
            kind = _SCALAR_TYPES.get(str(field.type))
            if kind is not None:
                setattr(self, field.name, kind(getattr(self, field.name)))
        if not 0 <= self.timestep < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {self.timestep}.")
        if not self.foreground_weight > 0:
            raise ValueError(f"foreground_weight must be positive, got {self.foreground_weight}.")
        if self.binarize_mode not in BINARIZE_MODES:
            raise ValueError(f"binarize_mode must be one of {BINARIZE_MODES}, got {self.binarize_mode!r}.")
        if not 0.0 < self.relative_threshold < 1.0:
            raise ValueError(f"relative_threshold must be in (0, 1), got {self.relative_threshold}.")

    def as_dict(self) -> dict[str, Any]:
        """The settings by name, as ``model_config.json`` stores them and the constructor takes them back."""
        return asdict(self)


def _frozen_modules(module: nn.Module) -> dict[str, nn.Module]:
    """State-dict prefix -> frozen module: the autoencoder, and VTCT's image encoder where there is one."""
    frozen: dict[str, nn.Module] = {"vae.": module.vae}
    vtct = getattr(module, "vtct", None)
    if vtct is not None and vtct.image_encoder is not None:
        frozen["vtct.image_encoder."] = vtct.image_encoder
    return frozen


def _drop_frozen_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: the frozen autoencoder / image encoder come from their own source, not from us."""
    drop = tuple(prefix + p for p in _frozen_modules(module))
    for key in [k for k in state_dict if k.startswith(drop)]:
        del state_dict[key]


def _fill_frozen_state(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """``load_state_dict`` pre-hook: the frozen modules keep their weights (so strict loading of a trained-parts
    state dict works). ``state_dict`` here is ``load_state_dict``'s own copy, so the caller's dict is untouched."""
    for name, sub in _frozen_modules(module).items():
        for key, value in sub.state_dict(prefix=prefix + name).items():
            state_dict.setdefault(key, value)


class FrozenAutoencoderMixin(nn.Module):
    """A segmenter that works in the latent space of a frozen ``AutoencoderKL`` (``self.vae``).

    ``state_dict()`` holds only what training changes: the frozen autoencoder (and VTCT's image encoder) stay
    ordinary submodules, so ``.to()``, ``repr`` and ``apply`` reach them, but a state-dict hook drops their keys
    and a load pre-hook keeps their current weights, so ``load_state_dict(net.state_dict(), strict=True)`` works
    and ``model.pt`` is UNet-sized.
    """

    vae: AutoencoderKL
    unet: ModelMixin
    config: LatentSegmenterSettings

    @property
    def settings(self) -> dict[str, Any]:
        """The network's settings by name (``model_config.json``'s ``settings``)."""
        return self.config.as_dict()

    def adopt_frozen_autoencoder(self, vae: AutoencoderKL) -> None:
        """Freeze ``vae`` (no gradients, always ``eval``), keep it as ``self.vae`` and out of the state dict."""
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.register_load_state_dict_pre_hook(_fill_frozen_state)

    def unet_and_new_groups(
        self, new: Sequence[nn.Module | nn.Parameter], lr_unet: float, lr_new: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Two AdamW parameter groups: ``"new"`` (the trainable parameters of ``new``, at ``lr_new``) and ``"unet"``
        (every other trainable parameter of ``self.unet``, at ``lr_unet``).

        ``RuntimeError`` naming them when the segmenter has a trainable parameter in neither (it would not train).
        """
        new_params, seen = [], set()
        for item in new:
            for p in [item] if isinstance(item, nn.Parameter) else item.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    new_params.append(p)
        unet = [p for p in self.unet.parameters() if p.requires_grad and id(p) not in seen]
        covered = seen | {id(p) for p in unet}
        stray = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in covered]
        if stray:
            raise RuntimeError(f"trainable parameters outside the UNet and the new modules: {stray[:5]}")
        return [
            {"params": unet, "lr": lr_unet, "weight_decay": weight_decay, "name": "unet"},
            {"params": new_params, "lr": lr_new, "weight_decay": weight_decay, "name": "new"},
        ]

    def train(self, mode: bool = True) -> FrozenAutoencoderMixin:
        super().train(mode)
        self.vae.eval()  # frozen modules never switch to training behaviour
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @staticmethod
    def check_slice_pair(image: torch.Tensor, label: torch.Tensor | None, who: str) -> None:
        """``image [B, 3, H, W]`` (sides multiples of 8) and, if given, ``label [B, 1, H, W]``; ``who`` names them."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"{who}_image must be [B, 3, H, W] in [-1, 1], got {tuple(image.shape)}.")
        if image.shape[-1] % 8 or image.shape[-2] % 8:
            raise ValueError(f"{who}_image height/width must be multiples of 8 (VAE), got {tuple(image.shape[-2:])}.")
        if label is not None and (
            label.ndim != 4 or label.shape[1] != 1 or label.shape[0] != image.shape[0]
            or label.shape[-2:] != image.shape[-2:]
        ):
            raise ValueError(
                f"{who}_label must be [B, 1, H, W] matching {who}_image {tuple(image.shape)}, got {tuple(label.shape)}."
            )

    @staticmethod
    def mask_to_image(label: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` mask in ``{0, 1}`` -> ``[B, 3, H, W]`` in ``{-1, 1}`` (the VAE's image range)."""
        return (label.float() * 2.0 - 1.0).expand(-1, 3, -1, -1)

    def encode_posterior(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen VAE encoder: ``[B, 3, H, W]`` in ``[-1, 1]`` -> posterior parameters ``[B, 2C, h, w]`` (mean, log-variance).

        The unscaled output of the encoder (diffusers' ``DiagonalGaussianDistribution.parameters``); it does not
        depend on the training mode, so it is what a latent cache stores (:class:`~monai_sdfsmis.networks.latent_cache.LatentCache`).
        """
        with torch.no_grad():
            return self.vae.encode(images.to(self.vae.dtype)).latent_dist.parameters

    def encode_slice_pairs(
        self,
        pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        posteriors: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Posterior parameters of every image and mask of ``pairs`` (all of one shape), in one autoencoder call.

        Parameters
        ----------
        pairs
            Name (for errors, e.g. ``"support"``) -> ``(image [B, 3, H, W] in [-1, 1], label [B, 1, H, W] in {0, 1})``.
        posteriors
            The ``2 * len(pairs)`` posteriors already computed (:meth:`encode_posterior`, e.g. from a
            :class:`~monai_sdfsmis.networks.latent_cache.LatentCache`), in the order image, mask of each pair.

        Returns
        -------
        torch.Tensor
            ``[2 * len(pairs) * B, 2C, h, w]``: image, mask, image, mask, ... each ``B`` rows.
        """
        for who, (image, label) in pairs.items():
            self.check_slice_pair(image, label, who)
        (first, (first_image, _)), *others = pairs.items()
        for who, (image, _) in others:
            if image.shape != first_image.shape:
                raise ValueError(
                    f"{first}_image {tuple(first_image.shape)} and {who}_image {tuple(image.shape)} must match."
                )
        if posteriors is None:
            images = [side for image, label in pairs.values() for side in (image, self.mask_to_image(label))]
            return self.encode_posterior(torch.cat(images))
        if len(posteriors) != 2 * len(pairs):
            raise ValueError(f"posteriors must hold the {2 * len(pairs)} episode posteriors, got {len(posteriors)}.")
        return torch.cat(list(posteriors))

    def latents_from_posterior(self, parameters: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """Posterior parameters ``[B, 2C, h, w]`` -> scaled latent ``[B, C, h, w]``.

        Parameters
        ----------
        parameters
            From :meth:`encode_posterior`.
        sample
            Draw a posterior sample (``True``) or take the mean (``False``); ``None``: sample in ``train()``
            mode when ``config.vae_sample_in_training`` (SD's VAE: sample in training, mean in evaluation), mean
            otherwise.
        """
        if sample is None:
            sample = self.training and self.config.vae_sample_in_training
        dist = DiagonalGaussianDistribution(parameters)
        z = dist.sample() if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen VAE: ``[B, 3, H, W]`` in ``[-1, 1]`` -> scaled latent ``[B, 4, H/f, W/f]`` (``f`` its downsampling).

        Posterior sample in ``train()`` mode when ``config.vae_sample_in_training``, posterior mean otherwise.
        """
        return self.latents_from_posterior(self.encode_posterior(images))

    def decode_mask(self, latent: torch.Tensor) -> torch.Tensor:
        """Mask latent ``[B, 4, h, w]`` -> soft mask ``[B, 1, f h, f w]`` float32 in ``[-1, 1]`` (decode, clip, channel mean)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latent / self.vae.config.scaling_factor + shift
        image = self.vae.decode(z.to(self.vae.dtype)).sample
        return image.float().clamp(-1.0, 1.0).mean(dim=1, keepdim=True)

    def binarize(self, soft: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` soft mask in ``[-1, 1]`` -> bool mask.

        ``config.binarize_mode`` ``"zero"``: ``soft > 0``. ``"relative"`` (DiffewS): ``p = (soft + 1) / 2`` above
        ``config.relative_threshold * max(p)`` of each slice.
        """
        if soft.ndim != 4 or soft.shape[1] != 1:
            raise ValueError(f"soft mask must be [N, 1, H, W], got {tuple(soft.shape)}.")
        if self.config.binarize_mode == "zero":
            return soft > 0
        prob = (soft.float() + 1.0) / 2.0
        return prob > self.config.relative_threshold * prob.amax(dim=(1, 2, 3), keepdim=True)
