"""The "support-mask copy" baseline: predict the support slice's mask for every query slice.

It needs no training and no weights, and it has the inference interface of
:class:`monai_sdfsmis.networks.sdfsmis.SDFSMIS` (``encode_support`` / ``segment`` / ``binarize``), so
the protocol inferer and evaluator run it unchanged. Its score says how much of a method's Dice comes
from the protocol alone (support slice picked from the same part of the organ, query slices restricted
to the organ) rather than from the network.
"""

from __future__ import annotations

__all__ = ["SupportMaskCopy", "SupportMaskContext"]

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SupportMaskContext:
    """The encoded support of :class:`SupportMaskCopy`: the support mask in ``{-1, 1}``, ``[1, 1, H, W]``."""

    mask: torch.Tensor


class SupportMaskCopy(nn.Module):
    """Baseline that returns the support mask as the prediction for every query slice.

    Has no parameters; a scalar buffer ``device_anchor`` lets ``.to(device)`` and device inference
    (``next(iter(net.buffers())).device``) work as for the real network.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("device_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.device_anchor.device

    def encode_support(self, support_image: torch.Tensor, support_label: torch.Tensor) -> SupportMaskContext:
        """Store the support mask.

        Parameters
        ----------
        support_image
            ``[1, 3, H, W]`` support slice (only its shape is checked).
        support_label
            ``[1, 1, H, W]`` support mask in ``{0, 1}``.

        Returns
        -------
        SupportMaskContext
            The mask mapped to ``{-1, 1}`` (the network's soft-output range).
        """
        if support_image.ndim != 4 or support_label.ndim != 4:
            raise ValueError(
                "support_image must be [1, 3, H, W] and support_label [1, 1, H, W], got shapes "
                f"{tuple(support_image.shape)} and {tuple(support_label.shape)}."
            )
        if support_label.shape[0] != 1 or support_label.shape[1] != 1:
            raise ValueError(f"support_label must be [1, 1, H, W], got {tuple(support_label.shape)}.")
        if support_image.shape[-2:] != support_label.shape[-2:]:
            raise ValueError(
                f"support_image {tuple(support_image.shape)} and support_label {tuple(support_label.shape)} "
                "differ in height/width."
            )
        mask = (support_label > 0).to(torch.float32) * 2.0 - 1.0
        return SupportMaskContext(mask=mask)

    def segment(self, query_image: torch.Tensor, context: SupportMaskContext) -> torch.Tensor:
        """The support mask for every query slice.

        Parameters
        ----------
        query_image
            ``[N, 3, H, W]`` query slices (same height/width as the support).
        context
            Output of :meth:`encode_support`.

        Returns
        -------
        torch.Tensor
            ``[N, 1, H, W]`` float in ``{-1, 1}``, on ``query_image``'s device.
        """
        if query_image.ndim != 4:
            raise ValueError(f"query_image must be [N, 3, H, W], got {tuple(query_image.shape)}.")
        if query_image.shape[-2:] != context.mask.shape[-2:]:
            raise ValueError(
                f"query_image {tuple(query_image.shape)} and the support mask {tuple(context.mask.shape)} "
                "differ in height/width."
            )
        mask = context.mask.to(device=query_image.device)
        return mask.expand(query_image.shape[0], -1, -1, -1).clone()

    @staticmethod
    def binarize(soft: torch.Tensor) -> torch.Tensor:
        """Foreground where the soft mask is above 0: ``[N, 1, H, W]`` float -> bool."""
        return soft > 0

    def forward(self, query_image: torch.Tensor, support_image: torch.Tensor, support_label: torch.Tensor) -> torch.Tensor:
        """One-call form: ``[N, 3, H, W]`` query slices and one support slice -> ``[N, 1, H, W]`` soft mask."""
        return self.segment(query_image, self.encode_support(support_image, support_label))
