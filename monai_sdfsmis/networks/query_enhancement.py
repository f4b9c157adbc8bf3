"""Query Enhancement (QE) of SD-FSMIS [P section 3.3, Eq. 2-4] (raw cosine, threshold 0.7, top-12 fallback).

A support prototype ``p_s`` (masked average of the support image latent) selects the query latent
positions that look like the support foreground; their mean ``p_q`` is broadcast over the latent grid
and concatenated to the query latent, giving the 8-channel query UNet input ``z_q = [z_qi, p_q]``.
QE has no learnable parameters.
"""

from __future__ import annotations

__all__ = ["QueryEnhancement", "masked_average_pool", "downsample_mask", "QE_MODES", "MASK_DOWNSAMPLE_MODES"]

import torch
import torch.nn.functional as F
from torch import nn

from monai_sdfsmis.networks.sqi import match_support_batch

QE_MODES = ("cosine", "ssp")
MASK_DOWNSAMPLE_MODES = ("area", "bilinear", "nearest")


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resize a ``[B, 1, H, W]`` mask to ``size``; ``"area"`` gives the soft foreground fraction of each cell.

    ``"bilinear"`` uses ``align_corners=True`` as SSP does; ``"nearest"`` keeps it binary.
    """
    if mode not in MASK_DOWNSAMPLE_MODES:
        raise ValueError(f"mask_downsample must be one of {MASK_DOWNSAMPLE_MODES}, got {mode!r}.")
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mode == "bilinear":
        return F.interpolate(mask, size=size, mode="bilinear", align_corners=True)
    return F.interpolate(mask, size=size, mode=mode)


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``sum(f * m) / (sum(m) + eps)`` over the spatial grid.

    Parameters
    ----------
    features
        ``[B, C, h, w]``.
    mask
        ``[B, 1, h, w]`` weights (soft mask at the feature resolution).
    eps
        Added to the denominator (0 requires a non-empty mask; SSP uses 1e-5 for its background).

    Returns
    -------
    torch.Tensor
        ``[B, C]`` float32.
    """
    features, mask = features.float(), mask.float()
    return (features * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + eps)


def _check_nonempty(mask: torch.Tensor, who: str) -> None:
    empty = (mask.flatten(1).sum(dim=1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"support mask is empty (batch items {empty}): {who} needs at least one foreground pixel.")


class QueryEnhancement(nn.Module):
    """Prototype-based query latent enhancement.

    Parameters
    ----------
    threshold
        Positions whose score exceeds it form ``p_q`` (0.7, [P]). The score is the raw cosine
        similarity with ``p_s`` (``mode="cosine"``) or SSP's foreground probability (``mode="ssp"``).
    fallback_k
        If no position passes, the ``fallback_k`` best-scoring positions are averaged (SSP's top-12).
    mode
        ``"cosine"`` (default) or ``"ssp"``: ``softmax([cos(p_bg), cos(p_fg)] * 10)[fg]`` with a
        background prototype from the complement of the mask.
    mask_downsample
        How the support mask reaches the latent grid: ``"area"`` (soft, default), ``"bilinear"``, ``"nearest"``.
    spatial
        ``False`` (the paper): ``p_q`` is broadcast over the whole latent grid, the same vector everywhere.
        ``True``: ``p_q`` is placed at each position weighted by that position's score (negative cosines count
        as 0), so the second half of the UNet input is also a map of where the query looks like the support's
        foreground: a localisation a from-scratch UNet need not first learn through SII.

    Notes
    -----
    Computed in float32 whatever the input dtype; the output has the query latent's dtype.
    """

    def __init__(
        self,
        threshold: float = 0.7,
        fallback_k: int = 12,
        mode: str = "cosine",
        mask_downsample: str = "area",
        spatial: bool = False,
    ) -> None:
        super().__init__()
        if mode not in QE_MODES:
            raise ValueError(f"QE mode must be one of {QE_MODES}, got {mode!r}.")
        if mask_downsample not in MASK_DOWNSAMPLE_MODES:
            raise ValueError(f"mask_downsample must be one of {MASK_DOWNSAMPLE_MODES}, got {mask_downsample!r}.")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"QE threshold must be in [-1, 1] (a cosine or a probability), got {threshold}.")
        if fallback_k < 1:
            raise ValueError(f"fallback_k must be >= 1, got {fallback_k}.")
        self.threshold = float(threshold)
        self.fallback_k = int(fallback_k)
        self.mode = mode
        self.mask_downsample = mask_downsample
        self.spatial = bool(spatial)

    def support_prototype(self, support_latent: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
        """Support prototypes, cacheable per support.

        Parameters
        ----------
        support_latent
            ``[B, C, h, w]`` support image latent.
        support_mask
            ``[B, 1, H, W]`` support mask in ``[0, 1]`` at image (or latent) resolution.

        Returns
        -------
        torch.Tensor
            ``[B, K, C]`` float32: ``K = 1`` (foreground) for ``"cosine"``, ``K = 2`` (foreground,
            background) for ``"ssp"``.
        """
        if support_latent.ndim != 4 or support_mask.ndim != 4 or support_mask.shape[1] != 1:
            raise ValueError(
                f"support_latent must be [B, C, h, w] and support_mask [B, 1, H, W], got {tuple(support_latent.shape)} "
                f"and {tuple(support_mask.shape)}."
            )
        if support_latent.shape[0] != support_mask.shape[0]:
            raise ValueError(
                f"support_latent batch {support_latent.shape[0]} != support_mask batch {support_mask.shape[0]}."
            )
        _check_nonempty(support_mask, "query enhancement")
        mask = downsample_mask(support_mask, tuple(support_latent.shape[-2:]), self.mask_downsample)
        if (mask.flatten(1).sum(dim=1) <= 0).any():
            raise ValueError(
                f"support mask vanishes at the latent grid {tuple(mask.shape[-2:])} with "
                f"mask_downsample={self.mask_downsample!r}; use 'area'."
            )
        fg = masked_average_pool(support_latent, mask)
        if self.mode == "cosine":
            return fg[:, None]
        bg = masked_average_pool(support_latent, 1.0 - mask, eps=1e-5)
        return torch.stack([fg, bg], dim=1)

    def scores(self, query_latent: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """Per-position score ``[Bq, h*w]`` (cosine or SSP fg probability) of each query latent vector."""
        q = query_latent.float().flatten(2)  # [B, C, L]
        proto = match_support_batch(prototype.float(), q.shape[0], "QE prototype")
        fg = F.cosine_similarity(q, proto[:, 0, :, None], dim=1)
        if self.mode == "cosine":
            return fg
        bg = F.cosine_similarity(q, proto[:, 1, :, None], dim=1)
        return torch.softmax(torch.stack([bg, fg], dim=1) * 10.0, dim=1)[:, 1]

    def query_prototype(self, query_latent: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """``p_q`` ``[Bq, C]`` float32: mean of the query latents scoring above the threshold (or the top-k)."""
        return self._selected_mean(query_latent, self.scores(query_latent, prototype))

    def _selected_mean(self, query_latent: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """:meth:`query_prototype` from the ``[Bq, h*w]`` scores already computed."""
        selected = score > self.threshold
        k = min(self.fallback_k, score.shape[1])
        top = torch.zeros_like(selected).scatter_(1, score.topk(k, dim=1).indices, True)
        selected = torch.where(selected.any(dim=1, keepdim=True), selected, top).float()
        q = query_latent.float().flatten(2)
        return (q * selected[:, None]).sum(dim=2) / selected.sum(dim=1, keepdim=True)

    def enhance(self, query_latent: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """``z_q = [z_qi, broadcast(p_q)]`` (``spatial``: ``[z_qi, max(score, 0) * p_q]`` position by position).

        Parameters
        ----------
        query_latent
            ``[Bq, C, h, w]`` query image latent.
        prototype
            ``[Bs, K, C]`` from :meth:`support_prototype`; ``Bq`` equal to or a multiple of ``Bs``.

        Returns
        -------
        torch.Tensor
            ``[Bq, 2C, h, w]``, dtype of ``query_latent``.
        """
        if query_latent.ndim != 4:
            raise ValueError(f"query_latent must be [B, C, h, w], got {tuple(query_latent.shape)}.")
        if prototype.ndim != 3 or prototype.shape[-1] != query_latent.shape[1]:
            raise ValueError(
                f"prototype must be [B, K, {query_latent.shape[1]}] (from support_prototype), got {tuple(prototype.shape)}."
            )
        score = self.scores(query_latent, prototype)
        p_q = self._selected_mean(query_latent, score).to(query_latent.dtype)
        enhancement = p_q[:, :, None, None].expand_as(query_latent)
        if self.spatial:
            weight = score.clamp(min=0).to(query_latent.dtype)
            enhancement = enhancement * weight.view(query_latent.shape[0], 1, *query_latent.shape[-2:])
        return torch.cat([query_latent, enhancement], dim=1)

    def forward(
        self, support_latent: torch.Tensor, support_mask: torch.Tensor, query_latent: torch.Tensor
    ) -> torch.Tensor:
        """``[B, C, h, w]`` support latent, ``[B, 1, H, W]`` support mask, ``[B, C, h, w]`` query latent -> ``[B, 2C, h, w]``."""
        return self.enhance(query_latent, self.support_prototype(support_latent, support_mask))
