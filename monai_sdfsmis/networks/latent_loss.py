"""Training loss on the mask latent: the paper's MSE, optionally weighted towards the organ's latent cells.

A query mask covers a few percent of a slice, so with the plain MSE (paper Eq. 5) the mean latent (an empty
mask) is a deep, flat minimum: a from-scratch UNet spends its first few hundred iterations there and predicts
nothing. Weighting the latent cells that the organ touches makes leaving that plateau pay sooner.
"""

from __future__ import annotations

__all__ = ["foreground_cells", "latent_mse", "decoded_dice_loss", "mask_latent_loss"]

from collections.abc import Callable

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


def mask_latent_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    foreground_weight: float = 1.0,
    decoded_dice_weight: float = 0.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mean_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A latent segmenter's training loss and the parts it logs.

    Parameters
    ----------
    prediction, target
        ``[B, C, h, w]`` predicted and target mask latents.
    mask
        ``[B, 1, H, W]`` the target's binary mask.
    foreground_weight
        :func:`latent_mse`'s weight of the cells the mask touches.
    decoded_dice_weight
        Weight of :func:`decoded_dice_loss` of ``decode(prediction)`` added to the latent MSE (0: none).
    decode
        Latent ``[B, C, h, w]`` -> soft mask ``[B, 1, H, W]`` in ``[-1, 1]``; needed when ``decoded_dice_weight > 0``.
    mean_target
        The posterior-mean target where ``target`` is a posterior sample; ``None``: ``target`` is the mean.

    Returns
    -------
    (torch.Tensor, dict)
        The scalar loss and ``{"loss_mean_target": ...}``, the latent MSE against the posterior-mean target
        (comparable across settings, so it is what to log), with ``"loss_latent"`` and ``"loss_decoded_dice"``
        when the decoded Dice is on.
    """
    loss = latent_mse(prediction, target, mask, foreground_weight)
    parts: dict[str, torch.Tensor] = {}
    if decoded_dice_weight > 0:
        if decode is None:
            raise ValueError("mask_latent_loss needs decode when decoded_dice_weight > 0.")
        dice = decoded_dice_loss(decode(prediction), mask)
        parts = {"loss_latent": loss.detach(), "loss_decoded_dice": dice.detach()}
        loss = loss + decoded_dice_weight * dice
    if mean_target is not None:
        logged = latent_mse(prediction.detach(), mean_target, mask, foreground_weight)
    else:
        logged = parts.get("loss_latent", loss.detach())
    return loss, {"loss_mean_target": logged, **parts}
