"""SD-FSMIS: Stable Diffusion adapted for one-shot medical image segmentation (model and one-step inference).

Composition of a frozen SD VAE, SD's UNet (fine-tuned) with two input convolutions (:class:`~monai_sdfsmis.networks.support_query_unet.DualConvIn`)
and support-query interaction (:mod:`.sqi`), query enhancement (:mod:`.query_enhancement`), the
visual-to-textual condition translator (:mod:`.vtct`, frozen DINOv2 + trained MLP) and the one-step
scheduler (:mod:`.one_step`). The support and query passes, and the :class:`SupportContext` that carries one to the
other, are in :mod:`.sdfsmis_passes`. The network interface used by inferers and engines (ARCHITECTURE.md)::

    loss = net.compute_loss(support_image, support_label, query_image, query_label)
    loss = net(support_image, support_label, query_image, query_label, mode="loss")       # the same, via forward (DDP)
    ctx = net.encode_support(support_image[1, 3, H, W], support_label[1, 1, H, W])   # once per support
    soft = net.segment(query_image[N, 3, H, W], ctx)                               # [N, 1, H, W] in [-1, 1]
    mask = net.binarize(soft)                                                      # [N, 1, H, W] bool
"""

from __future__ import annotations

__all__ = [
    "SDFSMIS",
    "SupportContext",
    "BINARIZE_MODES",
    "SDFSMISSettings",
    "SUPPORT_CONDITIONS",
    "FORWARD_MODES",
    "TINY_CONFIG_DIR",
]

import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from monai_sdfsmis.networks.autoencoder import downsampling_factor
from monai_sdfsmis.networks.latent_codec import BINARIZE_MODES, FrozenAutoencoderMixin
from monai_sdfsmis.networks.latent_loss import mask_latent_loss
from monai_sdfsmis.networks.one_step import one_step_scheduler
from monai_sdfsmis.networks.pretrained import TINY_CONFIG_DIR, build_tiny_components, load_pretrained_components
from monai_sdfsmis.networks.query_enhancement import QueryEnhancement
from monai_sdfsmis.networks.sdfsmis_passes import SupportContext, query_pass, support_pass
from monai_sdfsmis.networks.sdfsmis_settings import SUPPORT_CONDITIONS, SDFSMISSettings
from monai_sdfsmis.networks.support_query_unet import SupportQueryUNet
from monai_sdfsmis.networks.vtct import VisualToTextualConditionTranslator

FORWARD_MODES = ("segment", "loss")


def _check_forward_arguments(
    mode: str, query_label: torch.Tensor | None, posteriors: Sequence[torch.Tensor] | None, return_parts: bool
) -> None:
    """Refuse a :meth:`SDFSMIS.forward` call whose arguments do not fit its ``mode`` (one ``ValueError`` line)."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}.")
    if mode == "loss" and query_label is None:
        raise ValueError("mode='loss' needs query_label ([B, 1, H, W] in {0, 1}).")
    if mode == "segment" and (query_label is not None or posteriors is not None or return_parts):
        raise ValueError("query_label, posteriors and return_parts are training arguments: pass mode='loss'.")


class SDFSMIS(FrozenAutoencoderMixin):
    """SD-FSMIS network (1-way 1-shot; a batch holds independent episodes).

    Parameters
    ----------
    vae
        SD's ``AutoencoderKL``; frozen (``requires_grad=False``, always ``eval``).
    unet
        SD's ``UNet2DConditionModel`` with its original 4-channel ``conv_in``. Its weights become those of
        :attr:`unet`, a :class:`~monai_sdfsmis.networks.support_query_unet.SupportQueryUNet` (``conv_in`` ->
        :class:`~monai_sdfsmis.networks.support_query_unet.DualConvIn`, SII installed) that diffusers' ``save_pretrained`` / ``from_pretrained`` restore.
    image_encoder
        Frozen DINOv2 of VTCT (``Dinov2Model``); ``None`` -> VTCT uses a learned condition embedding
        (no-prior mode). Not used when ``use_vtct=False``.
    empty_prompt_embedding
        ``[1, 77, D]`` SD's CLIP text-encoder output for ``""``, stored as a buffer (inference needs no
        text encoder). Required unless ``use_vtct`` with no image encoder (or ``vtct_mode="replace"``).
    settings
        :class:`~monai_sdfsmis.networks.sdfsmis_settings.SDFSMISSettings`'s fields by name (the paper's defaults and
        the ablation switches: ``use_sii``, ``use_qe``, ``use_vtct``, ``sii_mode``, ``timestep``, ...), kept as
        :attr:`config`.

    Notes
    -----
    * Support and query run as two UNet calls (support first, its per-block features collected into
      :attr:`SupportContext.features` and handed to the query pass through ``cross_attention_kwargs``;
      :mod:`.sqi`), routed to their input convolution by ``DualConvIn``; this is what makes one
      support reusable for any number of queries. No pass state lives in the UNet, so
      ``unet.enable_gradient_checkpointing()`` and ``unet.compile(fullgraph=True)`` work.
    * ``state_dict()`` holds only what training changes plus the empty-prompt buffer
      (:class:`~monai_sdfsmis.networks.latent_codec.FrozenAutoencoderMixin`; DINOv2 is kept out like the VAE).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        image_encoder: nn.Module | None = None,
        empty_prompt_embedding: torch.Tensor | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        config = self.config = SDFSMISSettings(**settings)
        config.check_components(vae, unet, image_encoder, empty_prompt_embedding)
        self.adopt_frozen_autoencoder(vae)
        self.unet = SupportQueryUNet.from_unet(unet, config.support_query)
        self.bank = self.unet.support_bank
        if config.residual_from_support:
            # Zero output is "no edit": the first prediction is the support's mask latent, the copy baseline.
            nn.init.zeros_(self.unet.conv_out.weight)
            if self.unet.conv_out.bias is not None:
                nn.init.zeros_(self.unet.conv_out.bias)
        self.qe = QueryEnhancement(config.qe_threshold, config.qe_fallback_k, config.qe_mode,
                                   spatial=config.qe_spatial) if config.use_qe else None
        self.vtct = None
        if config.use_vtct:
            width = int(unet.config.cross_attention_dim)
            self.vtct = VisualToTextualConditionTranslator(image_encoder, width, config.vtct_tokens, config.vtct_mode)
        self.scheduler = one_step_scheduler()
        prompt = None if empty_prompt_embedding is None else empty_prompt_embedding.detach().clone().float()
        self.register_buffer("empty_prompt_embedding", prompt)

    @property
    def settings(self) -> dict[str, Any]:
        """:attr:`config` by name, and whether VTCT has an image encoder (``model_config.json``'s ``settings``)."""
        has_image_encoder = self.vtct is not None and self.vtct.image_encoder is not None
        return {**self.config.as_dict(), "image_encoder": has_image_encoder}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        sd: str | os.PathLike = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        image_encoder: str | os.PathLike | None = "facebook/dinov2-small",
        *,
        local_files_only: bool | None = None,
        torch_dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
        **settings: Any,
    ) -> SDFSMIS:
        """Build from pretrained SD-1.5 (HF id, local diffusers folder or single checkpoint) and DINOv2.

        Parameters
        ----------
        sd, image_encoder, local_files_only, torch_dtype, cache_dir
            Passed to :func:`monai_sdfsmis.networks.pretrained.load_pretrained_components`;
            ``image_encoder=None`` gives VTCT's no-prior mode. DINOv2 is not loaded when ``use_vtct=False``.
        settings
            The constructor's keyword arguments (``use_sii``, ``sii_mode``, ``timestep``, ...).
        """
        encoder = image_encoder if SDFSMISSettings(**settings).use_vtct else None
        parts = load_pretrained_components(
            sd, encoder, local_files_only=local_files_only, torch_dtype=torch_dtype, cache_dir=cache_dir
        )
        return cls(**vars(parts), **settings)

    @classmethod
    def tiny(cls, seed: int = 0, *, with_image_encoder: bool = True, **settings: Any) -> SDFSMIS:
        """The same architecture at toy width, randomly initialised from ``seed``
        (:func:`~monai_sdfsmis.networks.pretrained.build_tiny_components`), for tests and smoke runs on CPU. The
        global RNG is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**vars(build_tiny_components(with_image_encoder)), **settings)

    # ------------------------------------------------------------------ training
    def parameter_groups(
        self, lr_unet: float = 1e-5, lr_new: float = 5e-5, weight_decay: float = 1e-2
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups (weight decay 1e-2; lr 1e-5 for the UNet, 5e-5 for new modules).

        ``"unet"``: SD's pretrained UNet weights (``lr_unet``); ``"new"``: input convolutions, SII
        layers and VTCT's MLP / positional embedding / gate / learned condition (``lr_new``). Frozen
        VAE and DINOv2 and the empty-prompt buffer are not included.
        """
        new_modules = self.unet.new_modules + ([self.vtct] if self.vtct is not None else [])
        return self.unet_and_new_groups(new_modules, lr_unet, lr_new, weight_decay)

    # ------------------------------------------------------------------ building blocks
    def condition(self, support_image: torch.Tensor, support_label: torch.Tensor) -> torch.Tensor:
        """Text-like condition ``[Bs, T, D]`` of the query pass: VTCT output, or the empty-prompt embedding."""
        batch = support_image.shape[0]
        if self.vtct is None:
            return self.empty_prompt_embedding.expand(batch, -1, -1)
        return self.vtct(support_image, support_label, self.empty_prompt_embedding)

    def predict_mask_latent(self, query_latent: torch.Tensor, context: SupportContext) -> torch.Tensor:
        """Query pass + one step: query image latent ``[Bq, 4, h, w]`` -> predicted mask latent ``[Bq, 4, h, w]``.

        ``Bq`` equals ``context.batch_size`` (pairs) or is a multiple of it (one support, many queries);
        :func:`~monai_sdfsmis.networks.sdfsmis_passes.query_pass`.
        """
        return query_pass(self, query_latent, context)

    # ------------------------------------------------------------------ public interface
    def compute_loss(
        self,
        support_image: torch.Tensor,
        support_label: torch.Tensor,
        query_image: torch.Tensor,
        query_label: torch.Tensor,
        posteriors: Sequence[torch.Tensor] | None = None,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of a batch of ``B`` episodes: ``MSE(x0, z_qm)`` in float32 (paper Eq. 5).

        With ``foreground_weight != 1`` the latent cells the query mask touches weigh that much more
        (:func:`~monai_sdfsmis.networks.latent_loss.latent_mse`).

        Parameters
        ----------
        support_image, query_image
            ``[B, 3, H, W]`` in ``[-1, 1]``.
        support_label, query_label
            ``[B, 1, H, W]`` in ``{0, 1}``; every support mask needs a foreground pixel.
        posteriors
            Optional VAE posterior parameters of the four inputs, in the order above, each ``[B, 2C, h, w]``
            (:meth:`encode_posterior`, e.g. from a :class:`~monai_sdfsmis.networks.latent_cache.LatentCache`);
            ``None`` encodes the four images here.
        return_parts
            Also return ``{"loss_mean_target": ...}``: the MSE against the posterior-mean query-mask latent
            (equal to the loss unless the posterior is sampled; comparable across settings, so it is what to log).

        Returns
        -------
        torch.Tensor or (torch.Tensor, dict)
            Scalar float32 loss (and its parts).
        """
        posterior = self.encode_slice_pairs(
            {"support": (support_image, support_label), "query": (query_image, query_label)}, posteriors
        )
        z_si, z_sm, z_qi, z_qm = self.latents_from_posterior(posterior).chunk(4)
        x0 = self.predict_mask_latent(z_qi, support_pass(self, support_image, support_label, z_si, z_sm))
        mean_target = None
        if return_parts and self.training and self.config.vae_sample_in_training:
            mean_target = self.latents_from_posterior(posterior.chunk(4)[3], sample=False)
        loss, parts = mask_latent_loss(
            x0, z_qm, query_label, self.config.foreground_weight, self.config.decoded_dice_weight, self.decode_mask,
            mean_target,
        )
        return (loss, parts) if return_parts else loss

    @torch.no_grad()
    def encode_support(self, support_image: torch.Tensor, support_label: torch.Tensor) -> SupportContext:
        """Encode a support slice once for any number of queries.

        Parameters
        ----------
        support_image
            ``[1, 3, H, W]`` in ``[-1, 1]`` (``Bs > 1`` supports are allowed; see :meth:`segment`).
        support_label
            ``[1, 1, H, W]`` in ``{0, 1}`` with at least one foreground pixel.
        """
        self.check_slice_pair(support_image, support_label, "support")
        return support_pass(self, support_image, support_label)

    @staticmethod
    def fuse_supports(contexts: Sequence[SupportContext]) -> SupportContext:
        """One context from the contexts of ``k`` support slices (k-shot fusion inside the network, as DiffewS):
        :meth:`SupportContext.fuse`."""
        return SupportContext.fuse(contexts)

    @torch.no_grad()
    def segment(self, query_image: torch.Tensor, context: SupportContext) -> torch.Tensor:
        """Soft masks of ``N`` query slices from a cached support.

        Parameters
        ----------
        query_image
            ``[N, 3, H, W]`` in ``[-1, 1]``; ``N`` a multiple of ``context.batch_size`` (query ``i`` uses
            support ``i // (N // Bs)``).
        context
            From :meth:`encode_support`.

        Returns
        -------
        torch.Tensor
            ``[N, 1, H, W]`` float32 in ``[-1, 1]``.
        """
        self.check_slice_pair(query_image, None, "query")
        expected = tuple(context.image_latent.shape[-2:])
        factor = downsampling_factor(self.vae)
        if tuple(s // factor for s in query_image.shape[-2:]) != expected:
            raise ValueError(f"query_image {tuple(query_image.shape)} does not match the support's size (latent {expected}).")
        return self.decode_mask(self.predict_mask_latent(self.encode_latents(query_image), context))

    def forward(
        self,
        support_image: torch.Tensor,
        support_label: torch.Tensor,
        query_image: torch.Tensor,
        query_label: torch.Tensor | None = None,
        *,
        mode: str = "segment",
        posteriors: Sequence[torch.Tensor] | None = None,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Segment (default) or compute the training loss.

        ``mode="segment"``: :meth:`encode_support` + :meth:`segment`, ``[Bs, 3, H, W]``, ``[Bs, 1, H, W]``,
        ``[N, 3, H, W]`` -> ``[N, 1, H, W]``. ``mode="loss"``: :meth:`compute_loss` of ``B`` episodes (with
        ``query_label``, ``posteriors``, ``return_parts``). Training goes through ``forward`` so that a
        ``DistributedDataParallel`` wrapper sees the call and all-reduces the gradients in buckets during backward.
        """
        _check_forward_arguments(mode, query_label, posteriors, return_parts)
        if mode == "loss":
            return self.compute_loss(
                support_image, support_label, query_image, query_label, posteriors=posteriors, return_parts=return_parts
            )
        return self.segment(query_image, self.encode_support(support_image, support_label))
