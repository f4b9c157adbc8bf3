"""What :class:`~monai_sdfsmis.inferers.sliding_support.SlidingSupportInferer` accepts: every check of its inputs.

Each check raises ``ValueError`` with one line that names the input and says what to change, before any network
call, so a bad volume never reaches the network and never yields a mask.
"""

from __future__ import annotations

__all__ = [
    "check_call_arguments",
    "network_uses_support",
    "check_volume",
    "check_finite",
    "check_range",
    "check_mask",
    "checked_organ_ids",
    "checked_supports",
    "checked_query_label",
]

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor

#: How far outside [-1, 1] an intensity may lie (rounding of a rescaled volume) before it is refused.
RANGE_TOLERANCE = 1e-3


def check_call_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Refuse what the inferer's ``__call__`` does not take: a misspelt keyword (e.g. ``support=``) must not be dropped
    silently, as MONAI's ``SliceInferer`` would."""
    if args or kwargs:
        unexpected = [f"positional #{i + 2}" for i in range(len(args))] + sorted(kwargs)
        raise ValueError(
            f"SlidingSupportInferer got unexpected arguments {unexpected}; it takes inputs, network, support_image, "
            "support_label, query_label and organ_id."
        )


def network_uses_support(network: Any) -> bool:
    """Whether ``network`` segments from a support (few-shot) or from its own organ contexts (``uses_support =
    False``); ``ValueError`` naming the first method of that interface it lacks."""
    uses_support = bool(getattr(network, "uses_support", True))
    needed = ("encode_support", "segment", "binarize") if uses_support else ("organ_context", "segment", "binarize")
    for name in needed:
        if not callable(getattr(network, name, None)):
            raise ValueError(
                f"network {type(network).__name__} has no '{name}' method; SlidingSupportInferer needs the "
                f"SDFSMIS interface ({', '.join(needed)})."
            )
    return uses_support


def check_volume(name: str, volume: Any, channels: Sequence[int] | None) -> torch.Tensor:
    """``volume`` must be a tensor ``[1, C, H, W, D]``; ``channels`` the allowed ``C`` (``None``: any, one organ each)."""
    if not isinstance(volume, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [1, C, H, W, D], got {type(volume).__name__}.")
    allowed = "C >= 1" if channels is None else f"C in {tuple(channels)}"
    if volume.ndim != 5 or volume.shape[0] != 1 or (channels is not None and volume.shape[1] not in channels) or (
        volume.shape[1] < 1
    ):
        raise ValueError(
            f"{name} must be [1, C, H, W, D] with {allowed} (one volume, slices along the last axis), got shape "
            f"{tuple(volume.shape)}."
        )
    if min(volume.shape[2:]) < 1:
        raise ValueError(f"{name} has an empty spatial shape {tuple(volume.shape)}.")
    return volume


def check_finite(name: str, volume: torch.Tensor) -> None:
    """Refuse NaN or infinite voxels."""
    # min/max comparisons are False for NaN, so the range and mask checks alone let NaN volumes through.
    finite = torch.isfinite(volume)
    if not bool(finite.all()):
        n_bad = int(finite.numel() - int(finite.sum()))
        raise ValueError(f"{name} contains {n_bad} non-finite (NaN or infinite) voxels; fix or mask the input volume.")


def check_range(name: str, volume: torch.Tensor) -> None:
    """Refuse intensities outside ``[-1, 1]`` (beyond :data:`RANGE_TOLERANCE`)."""
    low, high = float(volume.min()), float(volume.max())
    if low < -1.0 - RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} intensities must be in [-1, 1], got [{low:g}, {high:g}]; normalise the volume first "
            "(monai_sdfsmis.transforms.intensity.ScaleToUnitRanged)."
        )


def check_mask(name: str, mask: torch.Tensor) -> None:
    """Refuse a mask with values other than 0 and 1."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        values = torch.unique(mask)
        shown = ", ".join(f"{float(v):g}" for v in values[:8])
        raise ValueError(
            f"{name} must be a binary organ mask in {{0, 1}}, found values [{shown}]; select one organ first "
            "(e.g. label == organ_id)."
        )


def checked_organ_ids(organ_id: Any) -> list[int]:
    """The organ ids a support-free network is asked for, as ints (a collated batch gives a tensor)."""
    if organ_id is None:
        raise ValueError(
            "this network segments without a support and needs organ_id (the label id(s) of the organ(s) to segment)."
        )
    values = torch.as_tensor(organ_id).flatten().tolist() if not isinstance(organ_id, (list, tuple)) else organ_id
    if not values or any(int(v) != v for v in values):
        raise ValueError(f"organ_id must be one or more integer label ids, got {organ_id!r}.")
    return [int(v) for v in values]


def checked_supports(support_image: Any, support_label: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The support volumes and masks as plain tensors, each pair checked; one pair, or ``k`` for k-shot.

    Parameters
    ----------
    support_image
        ``[1, C, Hs, Ws, Ds]`` (``C`` 1 or 3, in ``[-1, 1]``), or a sequence of ``k`` such volumes.
    support_label
        ``[1, K, Hs, Ws, Ds]`` binary, one per support volume, every one with the same ``K`` organs.

    Returns
    -------
    list of (torch.Tensor, torch.Tensor)
        ``(image, label)`` per support, ``MetaTensor`` metadata dropped.
    """
    if support_image is None or support_label is None:
        raise ValueError("SlidingSupportInferer needs support_image and support_label (the annotated support volume).")
    several = isinstance(support_image, (list, tuple))
    images = list(support_image) if several else [support_image]
    labels = list(support_label) if isinstance(support_label, (list, tuple)) else [support_label]
    if not images or len(images) != len(labels):
        raise ValueError(
            f"got {len(images)} support image(s) and {len(labels)} support label(s); give one organ mask per "
            "support volume."
        )
    pairs = []
    for k, (image, label) in enumerate(zip(images, labels)):
        suffix = f"[{k}]" if several else ""
        image_name, label_name = f"support_image{suffix}", f"support_label{suffix}"
        check_volume(image_name, image, (1, 3))
        check_volume(label_name, label, None)
        if label.shape[1] != labels[0].shape[1]:
            raise ValueError(
                f"{label_name} has {label.shape[1]} organ channel(s) but support_label[0] has "
                f"{labels[0].shape[1]}; every support needs the same organs."
            )
        if label.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"{label_name} {tuple(label.shape)} and {image_name} {tuple(image.shape)} must have the same "
                "spatial shape."
            )
        image, label = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (image, label))
        check_finite(image_name, image)
        if label.is_floating_point():
            check_finite(label_name, label)
        check_range(image_name, image)
        check_mask(label_name, label)
        pairs.append((image, label))
    return pairs


def checked_query_label(query_label: Any, query: torch.Tensor, n_organs: int, needed: bool) -> torch.Tensor | None:
    """The query's organ mask(s) ``[1, n_organs, H, W, D]`` as a plain tensor, checked against the query volume.

    ``needed`` (protocol mode, which segments the query's organ slices): a missing mask is an error. Otherwise the
    mask is only checked for finite values and passed on.
    """
    if isinstance(query_label, MetaTensor):
        query_label = query_label.as_tensor()
    if query_label is not None and query_label.is_floating_point():
        check_finite("query_label", query_label)
    if not needed:
        return query_label
    if query_label is None:
        raise ValueError(
            "query_range='protocol' needs query_label (the query's organ mask, to select its organ slices); "
            "use query_range='all' when the query has no annotation."
        )
    check_volume("query_label", query_label, (n_organs,))
    if query_label.shape[2:] != query.shape[2:]:
        raise ValueError(
            f"query_label {tuple(query_label.shape)} and the query volume {tuple(query.shape)} must have the "
            "same spatial shape."
        )
    check_mask("query_label", query_label)
    return query_label
