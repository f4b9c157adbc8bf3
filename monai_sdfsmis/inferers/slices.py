"""Slice geometry of the sliding-support inference: which slices, at which size, and back onto the query's grid.

Slices run along the last axis of ``[1, C, H, W, D]`` volumes. The network sees ``S x S`` slices (bilinear for
images, pixel-centre aligned nearest for masks, so a mask resized to ``S`` and back is unchanged); predictions are
put back on the query's ``H x W`` grid the same way.
"""

from __future__ import annotations

__all__ = [
    "largest_run",
    "check_flip_axes",
    "flip_passes",
    "mirror",
    "split_chunks",
    "foreground_slices",
    "resize_slices",
    "support_slices",
    "volume_from_slices",
]

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_sdfsmis.data.protocol import chunk_bounds, support_slice_indices


def largest_run(flags: Sequence[bool] | np.ndarray | torch.Tensor) -> tuple[int, int] | None:
    """The longest run of consecutive ``True`` values, as ``[start, end)``; the first one on a tie.

    Returns ``None`` when no value is ``True``.
    """
    values = np.asarray(torch.as_tensor(flags).cpu(), dtype=bool).ravel()
    best: tuple[int, int] | None = None
    start = None
    for i, flag in enumerate([*values.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def check_flip_axes(flip_axes: Sequence[int] | int | None) -> tuple[int, ...]:
    """``flip_axes`` as a sorted tuple of distinct in-plane axes (0, 1); ``ValueError`` for anything else."""
    axes = () if flip_axes is None else (flip_axes,) if isinstance(flip_axes, int) else tuple(flip_axes)
    if any(isinstance(a, bool) or a not in (0, 1) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"flip_axes must name distinct in-plane axes 0 and/or 1, got {list(axes)}.")
    return tuple(sorted(int(a) for a in axes))


def flip_passes(flip_axes: Sequence[int]) -> list[int | None]:
    """The passes of flip test-time augmentation: ``None`` (the plain pass), then one slice dim per volume axis."""
    # A slice [N, C, H, W] mirrored along volume axis a is flipped along its dim a + 2.
    return [None, *(int(a) + 2 for a in flip_axes)]


def mirror(slices: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``slices`` flipped along ``dim`` (``None``: unchanged)."""
    return slices if dim is None else slices.flip(dim)


def split_chunks(index: torch.Tensor, n_chunks: int) -> list[torch.Tensor]:
    """Slice numbers ``[n]`` -> ``n_chunks`` contiguous parts (:func:`~monai_sdfsmis.data.protocol.chunk_bounds`)."""
    return [index[a:b] for a, b in chunk_bounds(int(index.numel()), n_chunks)]


def foreground_slices(mask: torch.Tensor) -> torch.Tensor:
    """Slice numbers ``[n]`` (CPU, ascending) where ``mask [1, 1, H, W, D]`` has a foreground voxel."""
    return torch.nonzero(mask[0, 0].flatten(0, 1).any(dim=0)).flatten().cpu()


def resize_slices(
    volume: torch.Tensor, index: torch.Tensor, mode: str, spatial_size: int, device: torch.device
) -> torch.Tensor:
    """``volume [1, C, H, W, D]`` at slice numbers ``index [n]`` -> ``[n, C', S, S]`` float32 on ``device``.

    ``mode="image"``: one channel is replicated to three, resized bilinearly (antialiased when shrinking) and kept
    in ``[-1, 1]``; ``mode="label"``: resized with pixel-centre aligned nearest (``"nearest-exact"``).
    """
    slices = volume[0][..., index.to(volume.device)].permute(3, 0, 1, 2)  # [n, C, H, W]
    slices = slices.to(device=device, dtype=torch.float32)
    if mode == "image" and slices.shape[1] == 1:
        slices = slices.expand(-1, 3, -1, -1)
    size = (int(spatial_size), int(spatial_size))
    if tuple(slices.shape[-2:]) != size and slices.shape[0] > 0:
        if mode == "image":
            shrink = slices.shape[-2] > size[0] or slices.shape[-1] > size[1]
            slices = F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=shrink)
            slices = slices.clamp(-1.0, 1.0)
        else:
            slices = F.interpolate(slices, size=size, mode="nearest-exact")
    return slices.contiguous()


def support_slices(
    support_image: torch.Tensor,
    support_label: torch.Tensor,
    n_chunks: int,
    spatial_size: int,
    device: torch.device,
    name: str = "support_label",
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The ``n_chunks`` support slices: images ``[n, 3, S, S]``, masks ``[n, 1, S, S]`` and their slice numbers.

    The support organ's slices (those where ``support_label [1, 1, Hs, Ws, Ds]`` has foreground) are split into
    ``n_chunks`` parts and the middle one of each is taken
    (:func:`~monai_sdfsmis.data.protocol.support_slice_indices`). ``name`` names the mask in errors.
    """
    present = foreground_slices(support_label)
    if present.numel() == 0:
        raise ValueError(
            f"{name} is empty: the support volume's mask has no foreground voxel, so there is no support "
            "slice to take; pass the organ mask of the support volume."
        )
    picked = present[support_slice_indices(int(present.numel()), n_chunks)]
    images = resize_slices(support_image, picked, "image", spatial_size, device)
    labels = resize_slices(support_label, picked, "label", spatial_size, device)
    if not bool(labels.flatten(1).any(dim=1).all()):
        # Nearest resizing can drop a very thin structure; the network must still see a non-empty support.
        raise ValueError(
            f"{name}: a support slice's mask vanished when resized to {spatial_size}x{spatial_size}; the organ is "
            f"too small in slices {picked.tolist()}."
        )
    return images, labels, picked.tolist()


def volume_from_slices(
    predicted: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    keep: Sequence[int],
    shape: Sequence[int],
    spatial_size: int,
    device: torch.device,
    with_soft: bool,
) -> torch.Tensor:
    """Per-slice predictions -> the volume ``[1, 1 or 2, H, W, D]`` float32 on the query's grid.

    Parameters
    ----------
    predicted
        ``{slice number: (mask bool [S, S], soft mask [S, S])}``.
    keep
        The slice numbers to write; every other slice is 0 (soft: -1).
    shape
        The query's ``(H, W, D)``.
    spatial_size
        ``S``, the side of the predicted slices.
    device
        Where the volume is built.
    with_soft
        Add the soft mask as channel 1.
    """
    height, width, depth = (int(s) for s in shape)
    size = int(spatial_size)
    output = torch.zeros((depth, 2 if with_soft else 1, size, size), dtype=torch.float32, device=device)
    output[:, 1:] = -1.0
    keep = list(keep)
    if keep:
        output[keep, 0] = torch.stack([predicted[d][0] for d in keep]).to(device=device, dtype=torch.float32)
        if with_soft:
            output[keep, 1] = torch.stack([predicted[d][1] for d in keep]).to(device=device)
    if (height, width) != (size, size):
        output = F.interpolate(output, size=(height, width), mode="nearest-exact")
    return output.permute(1, 2, 3, 0).unsqueeze(0)
