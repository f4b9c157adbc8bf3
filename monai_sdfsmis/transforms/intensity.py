"""Intensity scaling to [-1, 1] (CT window, MR percentiles, per-volume min-max or z-score), resizing, channels.

All transforms here are thin compositions of MONAI transforms; they add the presets of the method and the checks
that turn degenerate inputs (constant volumes, NaN) into clear errors instead of NaN outputs.
"""

from __future__ import annotations

__all__ = [
    "PRESETS",
    "ScaleToUnitRange",
    "ScaleToUnitRanged",
    "ScaleToUnitRangeD",
    "ScaleToUnitRangeDict",
    "ResizeSlicesd",
    "ResizeSlicesD",
    "ResizeSlicesDict",
    "ReplicateChanneld",
    "ReplicateChannelD",
    "ReplicateChannelDict",
]

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    NormalizeIntensity,
    RepeatChanneld,
    Resize,
    ScaleIntensityRange,
    Transform,
)
from monai.transforms.utils_pytorch_numpy_unification import clip, percentile
from monai.utils import ImageMetaKey, TransformBackends, convert_to_dst_type, ensure_tuple_rep

PRESETS = ("ct", "mr", "minmax", "zscore")
_NEAREST_MODES = ("nearest", "nearest-exact")


def _describe(img: Any, key: Hashable | None = None) -> str:
    """Name an input in error messages: its file when known, else its dictionary key."""
    name = img.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(img, MetaTensor) else None
    if name:
        return f"image {name}" + (f" (key {key!r})" if key is not None else "")
    return f"image under key {key!r}" if key is not None else "image"


class ScaleToUnitRange(Transform):
    """Map a volume's intensities to float32 ``[-1, 1]`` with one of the presets below.

    Presets
    -------
    ``"ct"``
        Clip to the HU window ``ct_window`` and map it linearly to [-1, 1]
        (``ScaleIntensityRange(a_min, a_max, -1, 1, clip=True)``).
    ``"mr"``
        Clip to the volume's ``mr_percentiles`` and map them linearly to [-1, 1]; this is
        ``ScaleIntensityRangePercentiles(lower, upper, -1, 1, clip=True)`` with the two percentiles computed once,
        so that a degenerate range can be reported instead of silently passed through.
    ``"minmax"``
        The volume's min..max to [-1, 1] (as ``ScaleIntensity(-1, 1)``); for volumes already preprocessed offline
        (CHAOS/SABS as published by the few-shot literature).
    ``"zscore"``
        Per-volume z-score (``NormalizeIntensity``), clipped to +-``zscore_clip`` sd and divided by
        ``zscore_clip`` (RPT's normalisation brought to [-1, 1]).

    Parameters
    ----------
    preset
        One of :data:`PRESETS`.
    ct_window
        ``(a_min, a_max)`` HU window of the ``"ct"`` preset.
    mr_percentiles
        ``(lower, upper)`` percentiles (0..100) of the ``"mr"`` preset.
    zscore_clip
        Clip of the ``"zscore"`` preset in standard deviations (> 0).

    Input: array or tensor of any shape, e.g. ``[C, H, W, D]``; the statistics are taken over the whole input.
    Output: same type and shape, float32, in ``[-1, 1]``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        preset: str = "minmax",
        ct_window: Sequence[float] = (-125.0, 275.0),
        mr_percentiles: Sequence[float] = (0.5, 99.5),
        zscore_clip: float = 3.0,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        if len(ct_window) != 2 or not float(ct_window[0]) < float(ct_window[1]):
            raise ValueError(f"ct_window must be (a_min, a_max) with a_min < a_max, got {tuple(ct_window)}")
        lo, hi = (float(p) for p in mr_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"mr_percentiles must satisfy 0 <= lower < upper <= 100, got {tuple(mr_percentiles)}")
        if not zscore_clip > 0:
            raise ValueError(f"zscore_clip must be > 0, got {zscore_clip}")
        self.preset = preset
        self.ct_window = (float(ct_window[0]), float(ct_window[1]))
        self.mr_percentiles = (lo, hi)
        self.zscore_clip = float(zscore_clip)

    def __call__(self, img: NdarrayOrTensor, key: Hashable | None = None) -> NdarrayOrTensor:
        """Scale ``img``; ``key`` only names the input in error messages."""
        what = _describe(img, key)
        values = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        if values.numel() == 0:
            raise ValueError(f"{what} is empty (shape {tuple(values.shape)})")
        v_min, v_max = (float(v) for v in torch.aminmax(values))
        if not (np.isfinite(v_min) and np.isfinite(v_max)):  # NaN propagates into min/max
            raise ValueError(f"{what} contains {int((~torch.isfinite(values)).sum())} NaN or infinite voxels")
        out: NdarrayOrTensor
        if self.preset == "ct":
            a_min, a_max = self.ct_window
            out = ScaleIntensityRange(a_min, a_max, -1.0, 1.0, clip=True, dtype=np.float32)(img)
        elif self.preset == "mr":
            p_lo, p_hi = (float(v) for v in percentile(values.float(), np.array(self.mr_percentiles)))
            if not p_hi > p_lo:
                raise ValueError(
                    f"{what}: the {self.mr_percentiles[0]}th and {self.mr_percentiles[1]}th percentiles are both "
                    f"{p_lo:g}; preset 'mr' cannot scale it to [-1, 1] (constant or nearly constant volume)"
                )
            out = ScaleIntensityRange(p_lo, p_hi, -1.0, 1.0, clip=True, dtype=np.float32)(img)
        elif self.preset == "minmax":
            if not v_max > v_min:
                raise ValueError(
                    f"{what} has constant intensity {v_min:g}; preset 'minmax' cannot scale it to [-1, 1] "
                    "(division by zero)"
                )
            # ScaleIntensity(minv=-1, maxv=1) with the min/max already at hand, so the volume is scanned once.
            out = ScaleIntensityRange(v_min, v_max, -1.0, 1.0, clip=False, dtype=np.float32)(img)
        else:  # zscore
            if not v_max > v_min:
                raise ValueError(
                    f"{what} has constant intensity {v_min:g}; preset 'zscore' cannot normalise it "
                    "(standard deviation 0)"
                )
            c = self.zscore_clip
            # MONAI's float32 statistics overflow ((x - mean)^2 from |x - mean| ~ 2e19), which turned a volume of large
            # but finite values into NaN; they are taken of the volume scaled by a power of two (exact) instead.
            scale = 2.0 ** math.floor(math.log2(max(abs(v_min), abs(v_max))))  # finite in float32
            unit = values.float() / scale
            mean, std = float(unit.mean()) * scale, float(unit.std(unbiased=False)) * scale
            out = clip(NormalizeIntensity(subtrahend=mean, divisor=std, dtype=np.float32)(img), -c, c) / c
        return convert_to_dst_type(out, img, dtype=np.float32)[0]


class ScaleToUnitRanged(MapTransform):
    """Dictionary wrapper of :class:`ScaleToUnitRange` (same preset for every key).

    Parameters
    ----------
    keys
        Image keys (not labels).
    preset, ct_window, mr_percentiles, zscore_clip
        See :class:`ScaleToUnitRange`.
    allow_missing_keys
        Skip keys that are absent.
    """

    backend = ScaleToUnitRange.backend

    def __init__(
        self,
        keys: KeysCollection,
        preset: str = "minmax",
        ct_window: Sequence[float] = (-125.0, 275.0),
        mr_percentiles: Sequence[float] = (0.5, 99.5),
        zscore_clip: float = 3.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleToUnitRange(preset, ct_window, mr_percentiles, zscore_clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], key=key)
        return d


class ResizeSlicesd(MapTransform, InvertibleTransform):
    """Resize the in-plane axes (H, W) of ``[C, H, W, D]`` volumes or ``[C, H, W]`` slices, leaving D unchanged.

    Built on ``monai.transforms.Resize`` with ``spatial_size=(h, w, -1)`` for volumes and ``(h, w)`` for slices,
    so every call is recorded in the MetaTensor's ``applied_operations``: ``inverse`` (and ``monai.transforms.Invertd``
    over a ``Compose`` holding this transform) returns outputs, e.g. predicted masks, to the input grid and affine.
    Integer inputs resized with a nearest mode keep their dtype (MONAI's ``Resize`` would return float32).

    Parameters
    ----------
    keys
        Keys to resize.
    spatial_size
        Output in-plane size: an int for square slices (256 for the network) or ``(h, w)``.
    mode
        Interpolation per key (``"bilinear"`` for images, ``"nearest"`` or ``"nearest-exact"`` for labels; any
        ``torch.nn.functional.interpolate`` mode). A single value applies to all keys.
    align_corners
        Per key, see ``monai.transforms.Resize``.
    anti_aliasing
        Per key: Gaussian smoothing before downsampling (images only; it would blur label ids).
    allow_missing_keys
        Skip keys that are absent.
    """

    backend = Resize.backend

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: int | Sequence[int] = 256,
        mode: str | Sequence[str] = "bilinear",
        align_corners: bool | None | Sequence[bool | None] = None,
        anti_aliasing: bool | Sequence[bool] = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        size = (int(spatial_size),) * 2 if isinstance(spatial_size, (int, np.integer)) else tuple(spatial_size)
        if len(size) != 2 or min(int(s) for s in size) < 1:
            raise ValueError(f"spatial_size must be a positive int or (h, w), got {spatial_size}")
        self.spatial_size = (int(size[0]), int(size[1]))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.align_corners = ensure_tuple_rep(align_corners, len(self.keys))
        self.anti_aliasing = ensure_tuple_rep(anti_aliasing, len(self.keys))
        # Two resizers because Resize's target rank is fixed at construction; the trace records which one ran.
        self.volume_resizer = Resize((*self.spatial_size, -1))
        self.slice_resizer = Resize(self.spatial_size)

    def _resizer(self, img: NdarrayOrTensor, key: Hashable) -> Resize:
        if img.ndim == 4:
            return self.volume_resizer
        if img.ndim == 3:
            return self.slice_resizer
        raise ValueError(f"key {key!r}: expected a [C, H, W, D] volume or a [C, H, W] slice, got shape {img.shape}")

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, mode, align, aa in self.key_iterator(d, self.mode, self.align_corners, self.anti_aliasing):
            img = d[key]
            out = self._resizer(img, key)(img, mode=mode, align_corners=align, anti_aliasing=aa)
            d[key] = self._keep_integer_dtype(out, img, mode)
        return d

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            img = d[key]
            d[key] = self._keep_integer_dtype(self._resizer(img, key).inverse(img), img, mode)
        return d

    @staticmethod
    def _keep_integer_dtype(out: NdarrayOrTensor, src: NdarrayOrTensor, mode: str) -> NdarrayOrTensor:
        src_dtype = src.dtype if isinstance(src, torch.Tensor) else torch.from_numpy(np.empty(0, src.dtype)).dtype
        if src_dtype.is_floating_point or str(mode) not in _NEAREST_MODES:
            return out
        return convert_to_dst_type(out, src)[0]


class ReplicateChanneld(RepeatChanneld):
    """``RepeatChanneld`` that turns single-channel images ``[1, ...]`` into 3-channel ones ``[3, ...]``.

    The network takes 3-channel images (SD's VAE, DINOv2); this checks that the input has one channel, so that
    an already 3-channel input is not silently turned into 9 channels.

    Parameters
    ----------
    keys
        Keys to replicate.
    repeats
        Number of output channels.
    allow_missing_keys
        Skip keys that are absent.
    """

    def __init__(self, keys: KeysCollection, repeats: int = 3, allow_missing_keys: bool = False) -> None:
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        super().__init__(keys, repeats=int(repeats), allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        for key in self.key_iterator(dict(data)):
            if data[key].shape[0] != 1:
                raise ValueError(
                    f"{_describe(data[key], key)} has {data[key].shape[0]} channels (shape {tuple(data[key].shape)});"
                    " ReplicateChanneld expects a single channel"
                )
        return super().__call__(data)


ScaleToUnitRangeD = ScaleToUnitRangeDict = ScaleToUnitRanged
ResizeSlicesD = ResizeSlicesDict = ResizeSlicesd
ReplicateChannelD = ReplicateChannelDict = ReplicateChanneld
