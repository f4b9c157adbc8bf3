"""Supervised mode (SDSeg): the one-step latent segmenter trained on ground-truth masks, without a support.

Once a user has labelled volumes of the target organs, the support is no longer needed: SDSeg (seed 004) trains a
latent diffusion segmenter that predicts the mask latent from the image latent in a single step. This is that
network built from SD-FSMIS's parts, so that it shares the autoencoder, the UNet family, the one-step prediction,
the training recipe and the model-folder format of the few-shot modes:

* the frozen autoencoder encodes the image slice: ``z_i [B, 4, h, w]``;
* SDSeg's latent fusion: the UNet input is ``z_i`` concatenated with the mask-latent input, an 8-channel
  ``conv_in`` (SD's 4-channel one widened as Marigold does). Under the one-step scheduler the noisy mask latent has
  weight ``sqrt(alphas_cumprod) = 0``: it is pure noise whose expectation, zero, is what is fed, so inference is
  deterministic;
* the organ is chosen by its condition: one learned ``[T, D]`` condition per organ (a learned "prompt" per class,
  through the UNet's cross-attention), so one network segments every organ it was trained on;
* ``x0 = -unet_output`` (:mod:`.one_step`), trained with the latent MSE against the organ mask's latent.

The inference interface is the few-shot one with the organ's condition in place of a support context, so the
:class:`~monai_sdfsmis.inferers.SlidingSupportInferer` runs it (``organ_id=`` instead of a support)::

    ctx = net.organ_context(organ_id)                 # [1, T, D]
    soft = net.segment(image[N, 3, H, W], ctx)        # [N, 1, H, W] in [-1, 1]
    mask = net.binarize(soft)
"""

from __future__ import annotations

__all__ = ["SupervisedLatentSegmenter", "SupervisedSettings", "build_supervised_segmenter"]

from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from monai_sdfsmis.networks.latent_codec import FrozenAutoencoderMixin, LatentSegmenterSettings
from monai_sdfsmis.networks.latent_loss import mask_latent_loss
from monai_sdfsmis.networks.one_step import one_step_scheduler, predict_original_sample
from monai_sdfsmis.networks.support_query_unet import DualConvIn


@dataclass
class SupervisedSettings(LatentSegmenterSettings):
    """The supervised segmenter's settings, on top of :class:`~monai_sdfsmis.networks.latent_codec.LatentSegmenterSettings`
    (``timestep``, ``foreground_weight``, ``vae_sample_in_training`` (``False``: posterior means, as
    :func:`~monai_sdfsmis.networks.no_prior.build_no_prior_sdfsmis`), ``binarize_mode``, ``relative_threshold``).

    Attributes
    ----------
    organ_ids
        Label ids of the organs, one learned condition each (CHAOS ``1, 2, 3, 4``).
    condition_tokens
        Tokens per organ condition.
    """

    organ_ids: list[int] = field(default_factory=list)
    condition_tokens: int = 77

    def __post_init__(self) -> None:
        super().__post_init__()
        ids = [int(v) for v in self.organ_ids]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"organ_ids must be one or more distinct label ids, got {list(self.organ_ids)}.")
        self.organ_ids = ids


class SupervisedLatentSegmenter(FrozenAutoencoderMixin):
    """One-step latent segmenter conditioned on an organ (SDSeg's latent fusion), trained on labelled slices.

    Parameters
    ----------
    vae
        The frozen autoencoder (``AutoencoderKL``; the no-prior stage-1 one or SD's).
    unet
        A ``UNet2DConditionModel`` with a ``latent_channels``-channel ``conv_in``; its ``conv_in`` is widened in place
        to twice that (image latent, mask-latent input).
    organ_ids
        Label ids of the organs, one learned condition each (CHAOS ``1, 2, 3, 4``).
    settings
        The other fields of :class:`SupervisedSettings` by name (``condition_tokens``, ``timestep``, ...), kept with
        ``organ_ids`` as :attr:`config`.
    """

    #: The inferer segments with :meth:`organ_context` instead of a support (no support volume is read).
    uses_support = False

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, organ_ids: Sequence[int], **settings: Any) -> None:
        super().__init__()
        self.config = SupervisedSettings(organ_ids=list(organ_ids), **settings)
        latent_channels = int(vae.config.latent_channels)
        conv_in = unet.conv_in
        if not isinstance(conv_in, nn.Conv2d) or conv_in.in_channels != latent_channels:
            raise ValueError(
                f"unet.conv_in must be a {latent_channels}-channel Conv2d (the autoencoder's latent), got {conv_in!r}."
            )
        self.adopt_frozen_autoencoder(vae)
        # A plain widened convolution, so that diffusers' own save_pretrained / from_pretrained keep it.
        unet.conv_in = DualConvIn.marigold(conv_in)
        unet.register_to_config(in_channels=2 * latent_channels)
        self.unet = unet
        width = int(unet.config.cross_attention_dim)
        self.organ_conditions = nn.Parameter(torch.empty(len(self.organ_ids), self.config.condition_tokens, width))
        nn.init.trunc_normal_(self.organ_conditions, std=0.02)
        self.scheduler = one_step_scheduler()

    @property
    def organ_ids(self) -> list[int]:
        """Label ids of the organs, in the order of :attr:`organ_conditions`."""
        return self.config.organ_ids

    def parameter_groups(
        self, lr_unet: float = 2e-4, lr_new: float = 2e-4, weight_decay: float = 1e-2
    ) -> list[dict[str, Any]]:
        """AdamW groups: the UNet (``lr_unet``) and the organ conditions (``lr_new``); the autoencoder is frozen."""
        return self.unet_and_new_groups([self.organ_conditions], lr_unet, lr_new, weight_decay)

    def organ_index(self, organ_id: int) -> int:
        """Position of label ``organ_id`` among the network's organs."""
        if int(organ_id) not in self.organ_ids:
            raise ValueError(f"this supervised model segments organ labels {self.organ_ids}; it has none for {organ_id}.")
        return self.organ_ids.index(int(organ_id))

    def organ_context(self, organ_id: int) -> torch.Tensor:
        """The condition ``[1, T, D]`` of organ label ``organ_id``: the context :meth:`segment` takes."""
        return self.organ_conditions[self.organ_index(organ_id)][None]

    def predict_mask_latent(self, image_latent: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Image latent ``[B, 4, h, w]`` and organ condition ``[B or 1, T, D]`` -> predicted mask latent ``[B, 4, h, w]``."""
        batch = image_latent.shape[0]
        if condition.shape[0] not in (1, batch):
            raise ValueError(f"condition batch {condition.shape[0]} must be 1 or the image batch {batch}.")
        sample = torch.cat([image_latent, torch.zeros_like(image_latent)], dim=1)
        timesteps = torch.full((batch,), self.config.timestep, dtype=torch.long, device=image_latent.device)
        dtype = self.unet.dtype
        output = self.unet(
            sample.to(dtype), timesteps, encoder_hidden_states=condition.expand(batch, -1, -1).to(dtype),
            return_dict=False,
        )[0]
        return predict_original_sample(self.scheduler, output, image_latent, self.config.timestep)

    def compute_loss(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        organ_index: torch.Tensor,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latent MSE between the prediction and the organ mask's latent.

        Parameters
        ----------
        image
            ``[B, 3, H, W]`` in ``[-1, 1]``.
        label
            ``[B, 1, H, W]`` in ``{0, 1}``: the mask of organ ``organ_ids[organ_index[b]]`` (may be empty).
        organ_index
            ``[B]`` integer positions in ``organ_ids``.
        return_parts
            Also return ``{"loss_mean_target": loss}`` (posterior means are used, so they are the same), as the
            few-shot network logs it.
        """
        posterior = self.encode_slice_pairs({"slice": (image, label)})
        index = torch.as_tensor(organ_index, device=image.device).long().flatten()
        if index.numel() != image.shape[0] or bool((index < 0).any()) or bool((index >= len(self.organ_ids)).any()):
            raise ValueError(
                f"organ_index must hold {image.shape[0]} positions in 0..{len(self.organ_ids) - 1}, got {index.tolist()}."
            )
        image_latent, mask_latent = self.latents_from_posterior(posterior).chunk(2)
        x0 = self.predict_mask_latent(image_latent, self.organ_conditions[index])
        loss, parts = mask_latent_loss(x0, mask_latent, label, self.config.foreground_weight)
        return (loss, parts) if return_parts else loss

    @torch.no_grad()
    def segment(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Soft masks ``[N, 1, H, W]`` in ``[-1, 1]`` of ``N`` slices ``[N, 3, H, W]`` for one organ's ``context``."""
        self.check_slice_pair(image, None, "query")
        return self.decode_mask(self.predict_mask_latent(self.encode_latents(image), context))

    def forward(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None = None,
        organ_index: torch.Tensor | None = None,
        *,
        mode: str = "segment",
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mode="loss"``: :meth:`compute_loss` (training goes through ``forward`` for DDP). ``mode="segment"``:
        soft masks of ``image`` for the organs at ``organ_index`` (``[N]``)."""
        if organ_index is None:
            raise ValueError("organ_index ([B] positions in organ_ids) is required.")
        if mode == "loss":
            if label is None:
                raise ValueError("mode='loss' needs label ([B, 1, H, W] in {0, 1}).")
            return self.compute_loss(image, label, organ_index, return_parts=return_parts)
        if mode != "segment":
            raise ValueError(f"mode must be 'segment' or 'loss', got {mode!r}.")
        index = torch.as_tensor(organ_index, device=image.device).long().flatten()
        return self.segment(image, self.organ_conditions[index])


def build_supervised_segmenter(
    autoencoder: AutoencoderKL | str | PathLike,
    organ_ids: Sequence[int],
    unet_channels: Sequence[int] | str = "small",
    *,
    seed: int | None = None,
    require_calibration: bool = True,
    **settings: Any,
) -> SupervisedLatentSegmenter:
    """The supervised segmenter on a stage-1 autoencoder with a from-scratch UNet of a no-prior width.

    Parameters
    ----------
    autoencoder
        The frozen autoencoder or its folder (:func:`~monai_sdfsmis.networks.autoencoder.load_autoencoder`).
    organ_ids
        Label ids of the organs it learns.
    unet_channels
        A name of :data:`~monai_sdfsmis.networks.no_prior.UNET_WIDTHS` or channels per level.
    seed
        Seed of the UNet and condition initialisation (the global RNG is left untouched).
    settings
        Keyword arguments of :class:`SupervisedLatentSegmenter`, and the width overrides of
        :func:`~monai_sdfsmis.networks.no_prior.build_no_prior_unet` (``cross_attention_dim``, ...).
    """
    from monai_sdfsmis.networks.no_prior import build_no_prior_unet, build_seeded, frozen_autoencoder

    vae, sample_size, device = frozen_autoencoder(autoencoder, require_calibration)

    unet_keys = ("cross_attention_dim", "layers_per_block", "attention_head_dim", "norm_num_groups")
    widths = {key: settings.pop(key) for key in unet_keys if key in settings}

    def build() -> SupervisedLatentSegmenter:
        unet = build_no_prior_unet(
            unet_channels, latent_channels=int(vae.config.latent_channels), sample_size=sample_size, **widths
        ).to(device)
        return SupervisedLatentSegmenter(vae, unet, organ_ids, **settings).to(device)

    return build_seeded(build, seed, device)
