"""Training loss on the mask latent: the paper's MSE, optionally weighted towards the organ's latent cells.

A query mask covers a few percent of a slice, so with the plain MSE (paper Eq. 5) the mean latent (an empty
mask) is a deep, flat minimum: a from-scratch UNet spends its first few hundred iterations there and predicts
nothing. Weighting the latent cells that the organ touches makes leaving that plateau pay sooner.
"""

from __future__ import annotations

__all__ = ["foreground_cells", "latent_mse", "decoded_dice_loss"]

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


def foreground_cells(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Which latent cells the mask touches.

    Parameters
    ----------
    mask
        ``[B, 1, H, W]`` binary mask on the image grid.
    latent_size
        ``(h, w)`` of the latent grid; ``H`` and ``W`` must be multiples of it.

    Returns
    -------
    torch.Tensor
        ``[B, 1, h, w]`` float32, 1 where any pixel of the cell's ``H/h x W/w`` block is foreground.
    """
    height, width = (int(s) for s in mask.shape[-2:])
    if height % latent_size[0] or width % latent_size[1]:
        raise ValueError(f"mask size {(height, width)} is not a multiple of the latent size {tuple(latent_size)}.")
    kernel = (height // latent_size[0], width // latent_size[1])
    return F.max_pool2d((mask > 0).float(), kernel_size=kernel, stride=kernel)


def latent_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, foreground_weight: float = 1.0
) -> torch.Tensor:
    """Mean squared error between predicted and target mask latents, in float32.

    Parameters
    ----------
    prediction, target
        ``[B, C, h, w]`` latents.
    mask
        ``[B, 1, H, W]`` the target's binary mask on the image grid; needed when ``foreground_weight != 1``.
    foreground_weight
        Weight of the latent cells the mask touches (:func:`foreground_cells`); the others weigh 1. The sum is
        divided by the total weight, so the loss stays a mean squared error per weighted cell and
        ``foreground_weight=1`` is exactly ``F.mse_loss``.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if float(foreground_weight) <= 0:
        raise ValueError(f"foreground_weight must be positive, got {foreground_weight}.")
    squared = (prediction.float() - target.float()) ** 2
    if float(foreground_weight) == 1.0:
        return squared.mean()
    if mask is None:
        raise ValueError("latent_mse needs the target mask when foreground_weight != 1.")
    cells = foreground_cells(mask, (int(prediction.shape[-2]), int(prediction.shape[-1])))
    weight = 1.0 + (float(foreground_weight) - 1.0) * cells  # [B, 1, h, w], broadcast over channels
    weight = weight.expand_as(squared)
    return (weight * squared).sum() / weight.sum()


def decoded_dice_loss(soft_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of a decoded mask against the target mask, on the image grid (MONAI ``DiceLoss``).

    The frozen decoder is differentiable, so a loss on what it draws reaches the predicted latent: an all-empty
    prediction (the mean-latent plateau of the latent MSE) costs a Dice loss near 1 instead of a small MSE.

    Parameters
    ----------
    soft_mask
        ``[B, 1, H, W]`` decoded soft mask in ``[-1, 1]`` (``SDFSMIS.decode_mask``); read as the probability
        ``(soft + 1) / 2``.
    target
        ``[B, 1, H, W]`` binary mask.

    Returns
    -------
    torch.Tensor
        Scalar float32, the mean over the batch of ``1 - Dice`` (smoothed by 1e-5).
    """
    probability = (soft_mask.float() + 1.0) / 2.0
    return DiceLoss(reduction="mean")(probability, target.float())
