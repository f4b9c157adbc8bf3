"""Support alignment: move a support slice onto the query's body before the network sees it.

Between patients the body sits at another place and size in the field of view, and a one-shot segmenter trained
on adjacent slices of one volume largely transfers the support's mask where it lies. Mapping the support slice's
body bounding box onto the query chunk's (an axis-aligned scale and shift of image and mask together) puts the
support organ where the query's anatomy is. It is a preprocessing of the support only: the network, its training
and the query are untouched, and ``support_alignment="none"`` is the paper's inference.

The body is what lies above a threshold halfway between the slices' minimum and their Otsu threshold (invariant to
the intensity scaling), after a binary opening that drops speckle; its box is the rows and columns it touches.
"""

from __future__ import annotations

__all__ = ["SUPPORT_ALIGNMENTS", "BodyBox", "check_support_alignment", "body_box", "align_support"]

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.filters import threshold_otsu

#: ``"none"``: the support slice as it is (the paper); ``"body_box"``: mapped onto the query chunk's body box.
SUPPORT_ALIGNMENTS = ("none", "body_box")

#: Scale factors outside this range are clamped: a box that small or large is a failed body detection, not anatomy.
_SCALE_RANGE = (0.5, 2.0)


def check_support_alignment(value: object) -> str:
    """``value`` if it names one of :data:`SUPPORT_ALIGNMENTS`, else a ``ValueError`` listing them."""
    if value not in SUPPORT_ALIGNMENTS:
        raise ValueError(f"support_alignment must be one of {SUPPORT_ALIGNMENTS}, got {value!r}.")
    return str(value)


class BodyBox(NamedTuple):
    """Inclusive pixel bounds of the body: rows ``top..bottom``, columns ``left..right``."""

    top: int
    bottom: int
    left: int
    right: int


def body_box(slices: torch.Tensor) -> BodyBox | None:
    """The bounding box of the body over ``slices`` ``[N, C, H, W]`` (channel 0 is read), or ``None`` if none is found.

    The body is every pixel of any slice above ``min + (otsu - min) / 2`` after a 2-pixel binary opening.
    """
    values = slices[:, 0].detach().float().cpu().numpy()
    low = float(values.min())
    if float(values.max()) - low <= 1e-6:
        return None
    threshold = low + (float(threshold_otsu(values)) - low) / 2
    body = ndimage.binary_opening((values > threshold).any(axis=0), iterations=2)
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    if rows.size < 2 or cols.size < 2:
        return None
    return BodyBox(int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))


def _axis_map(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float]:
    """``(scale, offset)`` with ``source_pixel = scale * target_pixel + offset`` on one axis."""
    scale = (source[1] - source[0]) / max(target[1] - target[0], 1)
    scale = float(np.clip(scale, *_SCALE_RANGE))
    centre_source, centre_target = (source[0] + source[1]) / 2, (target[0] + target[1]) / 2
    return scale, centre_source - scale * centre_target


def align_support(
    image: torch.Tensor, label: torch.Tensor, target: BodyBox | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support slice ``image [1, C, S, S]`` and ``label [1, 1, S, S]`` mapped onto the body box ``target``.

    Parameters
    ----------
    image, label
        One support slice and its binary mask at the network's size.
    target
        :func:`body_box` of the query slices the support will segment (one chunk), or ``None`` (not found).

    Returns
    -------
    tuple
        The warped image (bilinear, the border continued) and mask (bilinear, then ``> 0.5``), same shapes and dtypes.
        The inputs unchanged when either body is not found or the warped mask would be empty.
    """
    source = body_box(image)
    if source is None or target is None:
        return image, label
    height, width = int(image.shape[-2]), int(image.shape[-1])
    row_scale, row_offset = _axis_map((source.top, source.bottom), (target.top, target.bottom))
    col_scale, col_offset = _axis_map((source.left, source.right), (target.left, target.right))
    rows = torch.arange(height, dtype=torch.float32, device=image.device) * row_scale + row_offset
    cols = torch.arange(width, dtype=torch.float32, device=image.device) * col_scale + col_offset
    # grid_sample's align_corners=True: -1 and 1 are the centres of the first and last pixels.
    grid_rows = (2 * rows / max(height - 1, 1) - 1)[:, None].expand(height, width)
    grid_cols = (2 * cols / max(width - 1, 1) - 1)[None, :].expand(height, width)
    grid = torch.stack([grid_cols, grid_rows], dim=-1)[None]
    warped_image = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    warped_label = F.grid_sample(label.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True) > 0.5
    if not bool(warped_label.any()):
        return image, label
    return warped_image.to(image.dtype), warped_label.to(label.dtype)
