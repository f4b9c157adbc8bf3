"""Visual-to-Textual Condition Translator (VTCT) of SD-FSMIS [P section 3.4] (ODISE-style gated condition).

The support slice goes through a frozen DINOv2; its last-layer patch tokens are averaged over the
support mask into a prototype ``p_v`` that a learned MLP maps into SD's text-embedding space. The
result is broadcast over the prompt tokens with a learned positional embedding (ODISE's
``PositionalLinear``) and, by default, added to SD's empty-prompt embedding through a zero-initialised
tanh gate (ODISE's implicit captioner), so that before training the UNet sees exactly the empty prompt.
"""

from __future__ import annotations

__all__ = ["VisualToTextualConditionTranslator", "VTCT_MODES", "IMAGENET_MEAN", "IMAGENET_STD"]

import torch
import torch.nn.functional as F
from torch import nn

from monai_sdfsmis.networks.query_enhancement import downsample_mask, masked_average_pool

VTCT_MODES = ("add", "replace")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisualToTextualConditionTranslator(nn.Module):
    """Support slice + mask -> text-like condition ``E_t`` ``[B, num_tokens, cross_attention_dim]``.

    Parameters
    ----------
    image_encoder
        A transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``); frozen here (``eval``,
        ``requires_grad=False``). ``None`` selects the no-prior mode: a learned condition embedding
        ``[1, num_tokens, D]`` (trunc-normal, std 0.02) is returned for every support, the support
        image/mask are not used and the empty-prompt embedding may be ``None``.
    cross_attention_dim
        ``D``, the UNet's cross-attention width (768 for SD-1.5).
    num_tokens
        Number of condition tokens (77 = SD's prompt length; must match the empty-prompt embedding in ``"add"``).
    mode
        ``"add"``: ``E_empty + tanh(gate) * (MLP(p_v) + pos)`` with ``gate`` zero-initialised (shape
        ``[1, num_tokens, D]`` as ODISE); ``"replace"``: ``MLP(p_v) + pos``.
    encoder_dim
        Width of the encoder's tokens; read from ``image_encoder.config.hidden_size`` when ``None``.
    input_size
        Side of the square the support image is resized to for the encoder (224 -> 16x16 patches of 14).

    Notes
    -----
    Image input is SD's ``[-1, 1]``; it is mapped to ``[0, 1]`` and normalised with ImageNet mean/std
    as DINOv2 expects. The mask is area-downsampled to the patch grid (soft weights).
    """

    def __init__(
        self,
        image_encoder: nn.Module | None,
        cross_attention_dim: int = 768,
        num_tokens: int = 77,
        mode: str = "add",
        encoder_dim: int | None = None,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        if mode not in VTCT_MODES:
            raise ValueError(f"VTCT mode must be one of {VTCT_MODES}, got {mode!r}.")
        if num_tokens < 1 or cross_attention_dim < 1:
            raise ValueError(f"num_tokens and cross_attention_dim must be >= 1, got {num_tokens}, {cross_attention_dim}.")
        self.mode = mode
        self.num_tokens = int(num_tokens)
        self.cross_attention_dim = int(cross_attention_dim)
        self.input_size = int(input_size)
        self.image_encoder = image_encoder
        if image_encoder is None:
            self.learned_condition = nn.Parameter(torch.empty(1, num_tokens, cross_attention_dim))
            nn.init.trunc_normal_(self.learned_condition, std=0.02)
            return
        image_encoder.requires_grad_(False)
        image_encoder.eval()
        config = getattr(image_encoder, "config", None)
        if encoder_dim is None:
            if config is None:
                raise ValueError("encoder_dim must be given for an image encoder without a transformers config.")
            encoder_dim = int(config.hidden_size)
        self.patch_size = int(getattr(config, "patch_size", 14)) if config is not None else 14
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} must be a multiple of the patch size {self.patch_size}.")
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.mlp = nn.Sequential(
            nn.Linear(encoder_dim, cross_attention_dim), nn.GELU(), nn.Linear(cross_attention_dim, cross_attention_dim)
        )
        self.positional_embedding = nn.Parameter(torch.empty(1, num_tokens, cross_attention_dim))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        if mode == "add":
            self.gate = nn.Parameter(torch.zeros(1, num_tokens, cross_attention_dim))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VisualToTextualConditionTranslator:
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.eval()  # frozen: dropout/drop-path stay off
        return self

    def visual_prototype(self, support_image: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
        """``p_v`` ``[B, encoder_dim]`` float32: mask-averaged last-layer DINOv2 patch tokens.

        Parameters
        ----------
        support_image
            ``[B, 3, H, W]`` in ``[-1, 1]``.
        support_mask
            ``[B, 1, H, W]`` in ``[0, 1]`` with at least one foreground pixel per item.
        """
        if self.image_encoder is None:
            raise ValueError("this VTCT has no image encoder (no-prior mode): there is no visual prototype.")
        if support_image.ndim != 4 or support_image.shape[1] != 3:
            raise ValueError(f"support_image must be [B, 3, H, W], got {tuple(support_image.shape)}.")
        if support_mask.ndim != 4 or support_mask.shape[1] != 1 or support_mask.shape[0] != support_image.shape[0]:
            raise ValueError(
                f"support_mask must be [B, 1, H, W] with B = {support_image.shape[0]}, got {tuple(support_mask.shape)}."
            )
        empty = (support_mask.flatten(1).sum(dim=1) <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"support mask is empty: VTCT needs at least one foreground pixel (batch items {empty})."
            )
        size = (self.input_size, self.input_size)
        x = (support_image.float() + 1.0) / 2.0
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        tokens = self.image_encoder(pixel_values=x).last_hidden_state[:, self.num_prefix_tokens :]
        grid = (self.input_size // self.patch_size, self.input_size // self.patch_size)
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"image encoder returned {tokens.shape[1]} patch tokens, expected {grid[0] * grid[1]}.")
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        mask = downsample_mask(support_mask, grid, "area")
        return masked_average_pool(features, mask)

    def forward(
        self,
        support_image: torch.Tensor | None,
        support_mask: torch.Tensor | None,
        empty_prompt_embedding: torch.Tensor | None,
    ) -> torch.Tensor:
        """The condition ``E_t``.

        Parameters
        ----------
        support_image
            ``[B, 3, H, W]`` in ``[-1, 1]`` (only its batch size is used in no-prior mode; may be ``None`` there -> B = 1).
        support_mask
            ``[B, 1, H, W]`` in ``[0, 1]``.
        empty_prompt_embedding
            ``[1, num_tokens, D]`` SD's text-encoder output for ``""``; needed in ``"add"`` mode.

        Returns
        -------
        torch.Tensor
            ``[B, num_tokens, D]``.
        """
        if self.image_encoder is None:
            batch = 1 if support_image is None else support_image.shape[0]
            return self.learned_condition.expand(batch, -1, -1)
        if support_image is None or support_mask is None:
            raise ValueError("VTCT needs the support image and mask.")
        p_v = self.visual_prototype(support_image, support_mask)
        proj = self.mlp(p_v.to(self.mlp[0].weight.dtype))[:, None] + self.positional_embedding  # [B, T, D]
        if self.mode == "replace":
            return proj
        expected = (1, self.num_tokens, self.cross_attention_dim)
        if empty_prompt_embedding is None or tuple(empty_prompt_embedding.shape) != expected:
            shape = None if empty_prompt_embedding is None else tuple(empty_prompt_embedding.shape)
            raise ValueError(f"VTCT mode 'add' needs the empty-prompt embedding of shape {expected}, got {shape}.")
        return empty_prompt_embedding.to(proj.dtype) + torch.tanh(self.gate) * proj
