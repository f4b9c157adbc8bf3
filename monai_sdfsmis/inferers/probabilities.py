"""From soft masks to what the inferer returns: foreground probabilities that agree with the mask, and label maps."""

from __future__ import annotations

__all__ = ["foreground_probability", "organ_label_map"]

import torch


def foreground_probability(soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft mask in ``[-1, 1]`` -> probability ``(soft + 1) / 2`` in ``[0, 1]`` that thresholds to ``mask`` at 0.5.

    Where ``mask`` is 1 the probability is raised to at least the next float32 above 0.5, elsewhere lowered to at
    most 0.5, so ``probability > 0.5`` reproduces ``mask`` exactly (a relative binarization threshold or a removed
    island would otherwise disagree with a plain 0.5 cut). Same shape as ``soft``, float32.
    """
    return _agree_at_half(((soft.float() + 1.0) / 2.0).clamp(0.0, 1.0), mask)


def _agree_at_half(probability: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    half = torch.tensor(0.5, dtype=torch.float32, device=probability.device)
    above = torch.nextafter(half, torch.ones_like(half))
    return torch.where(mask.bool(), probability.clamp(min=above), probability.clamp(max=half))


def organ_label_map(masks: torch.Tensor, probabilities: torch.Tensor, with_probabilities: bool = False) -> torch.Tensor:
    """``K`` organs' masks and probabilities ``[1, K, H, W, D]`` -> one label map ``[1, 1, H, W, D]``.

    The label map holds ``k + 1`` where organ ``k``'s mask is 1 and 0 where no organ's is; a voxel in several masks
    goes to the organ with the higher probability (the first on a tie). ``with_probabilities``: the ``K``
    probabilities follow as channels ``1..K``, each > 0.5 exactly where the label map holds its organ.
    """
    inside = masks.bool()
    score = torch.where(inside, probabilities, torch.full_like(probabilities, -1.0))
    labels = torch.where(inside.any(dim=1, keepdim=True), score.argmax(dim=1, keepdim=True) + 1, 0).to(torch.float32)
    if not with_probabilities:
        return labels
    organs = torch.arange(1, masks.shape[1] + 1, device=labels.device, dtype=labels.dtype).view(1, -1, 1, 1, 1)
    return torch.cat([labels, _agree_at_half(probabilities, labels == organs)], dim=1)
