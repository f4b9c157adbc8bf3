"""The settings of :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS`: the paper's defaults and every ablation switch.

They live in one dataclass, checked once, so that the network reads ``self.config.timestep`` and
``model_config.json`` stores :meth:`SDFSMISSettings.as_dict` (the constructor takes the same keys back)::

    net = SDFSMIS(vae, unet, image_encoder, empty_prompt_embedding, use_qe=False, timestep=1)
    net.config.use_qe, net.settings["timestep"]          # False, 1
"""

from __future__ import annotations

__all__ = ["SDFSMISSettings", "SUPPORT_CONDITIONS"]

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from monai_sdfsmis.networks.latent_codec import LatentSegmenterSettings
from monai_sdfsmis.networks.support_query_unet import check_support_query

#: Condition of the support UNet pass: the query's (``"same"``) or the empty prompt (``"empty"``, DiffewS).
SUPPORT_CONDITIONS = ("same", "empty")


@dataclass
class SDFSMISSettings(LatentSegmenterSettings):
    """SD-FSMIS's settings (paper defaults), on top of :class:`~monai_sdfsmis.networks.latent_codec.LatentSegmenterSettings`
    (``timestep``, ``foreground_weight``, ``vae_sample_in_training``, ``binarize_mode``, ``relative_threshold``).

    Attributes
    ----------
    use_sii, use_qe, use_vtct
        The three components (ablation switches). ``use_sii=False`` drops the support UNet pass.
    sii_mode
        ``"sii"`` (new cross-attention per block) or ``"kv_concat"`` (DiffewS).
    shared_conv_in
        One 8-channel input convolution for both branches instead of one each (needs ``use_qe``).
    qe_threshold, qe_fallback_k, qe_mode, qe_spatial
        :class:`~monai_sdfsmis.networks.query_enhancement.QueryEnhancement` settings (``qe_spatial``: its
        ``spatial``, off in the paper).
    vtct_mode, vtct_tokens
        :class:`~monai_sdfsmis.networks.vtct.VisualToTextualConditionTranslator` settings.
    vae_sample_in_training
        ``True`` here (SD's VAE samples its posterior in training, as DiffewS).
    support_condition
        Condition of the support UNet pass: ``"same"`` as the query (VTCT output) or ``"empty"`` (the
        empty prompt, as DiffewS). Without VTCT both are the empty prompt.
    residual_from_support
        Predict the query's mask latent as the support's mask latent plus the one-step output
        (``x0 = z_sm - unet_output``) instead of the output alone (the paper). ``conv_out`` starts at zero, so an
        untrained network returns the support-mask copy and training edits it; a from-scratch UNet then never
        sits on the all-empty mean-latent plateau.
    decoded_dice_weight
        Training only: add this weight times the soft Dice loss of the decoded prediction against the query mask
        (:func:`~monai_sdfsmis.networks.latent_loss.decoded_dice_loss`, through the frozen decoder) to the latent MSE;
        0 (default) is the paper's loss alone.
    """

    use_sii: bool = True
    use_qe: bool = True
    use_vtct: bool = True
    sii_mode: str = "sii"
    shared_conv_in: bool = False
    qe_threshold: float = 0.7
    qe_fallback_k: int = 12
    qe_mode: str = "cosine"
    qe_spatial: bool = False
    vtct_mode: str = "add"
    vtct_tokens: int = 77
    vae_sample_in_training: bool = True
    support_condition: str = "same"
    residual_from_support: bool = False
    decoded_dice_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_support_query(self.support_query)
        if self.support_condition not in SUPPORT_CONDITIONS:
            raise ValueError(f"support_condition must be one of {SUPPORT_CONDITIONS}, got {self.support_condition!r}.")
        if not self.decoded_dice_weight >= 0:
            raise ValueError(f"decoded_dice_weight must be zero or positive, got {self.decoded_dice_weight}.")

    @property
    def support_query(self) -> dict[str, Any]:
        """The UNet's part (:class:`~monai_sdfsmis.networks.support_query_unet.SupportQueryUNet`'s ``support_query``)."""
        return {"use_qe": self.use_qe, "use_sii": self.use_sii, "shared_conv_in": self.shared_conv_in,
                "sii_mode": self.sii_mode}

    def check_components(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        image_encoder: nn.Module | None,
        empty_prompt_embedding: torch.Tensor | None,
    ) -> None:
        """``ValueError`` naming the first of SDFSMIS's modules that does not fit the others or these settings."""
        if int(unet.config.in_channels) != int(vae.config.latent_channels):
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} input channels, the autoencoder's latent has "
                f"{vae.config.latent_channels}: SDFSMIS needs SD's UNet, whose input is one latent."
            )
        cross_dim = int(unet.config.cross_attention_dim)
        needs_empty = (
            not self.use_vtct or (image_encoder is not None and self.vtct_mode == "add")
            or self.support_condition == "empty"
        )
        if empty_prompt_embedding is None and needs_empty:
            raise ValueError(
                "empty_prompt_embedding ([1, 77, D], SD's text-encoder output for '') is required unless VTCT runs "
                "without an image encoder or in 'replace' mode."
            )
        if empty_prompt_embedding is not None and (
            empty_prompt_embedding.ndim != 3 or empty_prompt_embedding.shape[0] != 1
            or empty_prompt_embedding.shape[2] != cross_dim
        ):
            raise ValueError(
                f"empty_prompt_embedding must be [1, T, {cross_dim}] (UNet cross_attention_dim), got "
                f"{tuple(empty_prompt_embedding.shape)}."
            )
