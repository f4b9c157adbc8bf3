"""Load each volume of a dataset once, normalised and resized the way the network sees it."""

from __future__ import annotations

__all__ = ["VolumeStore"]

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Orientation
from monai.utils import convert_to_numpy

from monai_sdfsmis.data.layouts import VolumeRecord
from monai_sdfsmis.progress import progress_bar
from monai_sdfsmis.transforms.intensity import ResizeSlicesd, ScaleToUnitRange
from monai_sdfsmis.transforms.io import axis_reorientation, load_volume

_KINDS = ("image", "label", "supervoxel")
T = TypeVar("T")


class VolumeStore:
    """Read-only access to the normalised volumes of a dataset, loading each file at most once.

    Every volume is reoriented to ``orientation``, its image mapped to ``[-1, 1]`` with
    :class:`~monai_sdfsmis.transforms.intensity.ScaleToUnitRange` (``intensity`` preset),
    and resized in-plane to ``spatial_size x spatial_size`` (bilinear for the image, nearest for the
    label and supervoxel maps); the slice axis ``D`` keeps its length.

    Label and supervoxel maps are taken **on the image's voxel grid**: they must have the image's
    array shape and their header geometry is ignored. This is how the ALPNet/ADNet/RPT pipelines
    read them (as plain arrays), and it is necessary for their published supervoxel files, which
    carry an identity affine unrelated to the image's.

    Parameters
    ----------
    records
        The volumes (:func:`~monai_sdfsmis.data.layouts.find_alpnet_volumes`, :func:`~monai_sdfsmis.data.layouts.load_datalist`).
    intensity
        ``ScaleToUnitRange`` preset: ``"minmax"`` (already-preprocessed CHAOS/SABS), ``"ct"``, ``"mr"``, ``"zscore"``.
    spatial_size
        In-plane size ``H = W`` after resizing; ``None`` keeps the stored size.
    orientation
        Axis codes to reorient to (``"RAS"``); ``None`` keeps the stored voxel order.
    cache
        Keep loaded arrays in memory (each file is read once); ``False`` reloads on every access.

    Examples
    --------
    >>> store = VolumeStore(find_alpnet_volumes("chaos_t2spir"))  # doctest: +SKIP
    >>> store.image("1").shape, store.spacing("1")                 # doctest: +SKIP
    ((256, 256, 37), (1.25, 1.25, 7.7))
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        intensity: str = "minmax",
        spatial_size: int | None = 256,
        orientation: str | None = "RAS",
        cache: bool = True,
    ) -> None:
        if len(records) == 0:
            raise ValueError("VolumeStore needs at least one volume record.")
        self._records: dict[str, VolumeRecord] = {}
        for rec in records:
            if rec.id in self._records:
                raise ValueError(f"Duplicate volume id '{rec.id}' ('{self._records[rec.id].image}' and '{rec.image}').")
            self._records[rec.id] = rec
        if spatial_size is not None and int(spatial_size) < 1:
            raise ValueError(f"spatial_size must be a positive integer or None, got {spatial_size}.")
        self.spatial_size = None if spatial_size is None else int(spatial_size)
        self.orientation = orientation
        self.intensity = intensity
        self.cache = cache
        # Built once: fails early on an unknown preset instead of at the first access.
        self._scale = ScaleToUnitRange(preset=intensity)
        self._orienter = Orientation(axcodes=orientation, labels=None) if orientation else None
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._memo: dict[tuple[str, str], Any] = {}
        self._geometry: dict[str, tuple[tuple[int, ...], torch.Tensor, tuple[float, float, float]]] = {}

    # ----------------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        """Volume ids in record order."""
        return list(self._records)

    @property
    def records(self) -> list[VolumeRecord]:
        return list(self._records.values())

    def record(self, volume_id: str) -> VolumeRecord:
        try:
            return self._records[str(volume_id)]
        except KeyError:
            known = ", ".join(list(self._records)[:10])
            raise ValueError(f"Unknown volume id '{volume_id}' (known ids: {known}{', ...' if len(self) > 10 else ''}).") from None

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, volume_id: object) -> bool:
        return str(volume_id) in self._records

    # ----------------------------------------------------------------------------------------------
    def image(self, volume_id: str) -> np.ndarray:
        """Normalised image, float32 ``[H, W, D]`` in ``[-1, 1]``."""
        return self._get("image", volume_id)

    def label(self, volume_id: str) -> np.ndarray:
        """Ground-truth label map, int16 ``[H, W, D]``."""
        return self._get("label", volume_id)

    def supervoxels(self, volume_id: str) -> np.ndarray:
        """Supervoxel map, int32 ``[H, W, D]`` (0 = background)."""
        return self._get("supervoxel", volume_id)

    def spacing(self, volume_id: str) -> tuple[float, float, float]:
        """Voxel size in mm of the arrays this store returns (after reorientation and in-plane resizing)."""
        return self._image_geometry(str(volume_id))[2]

    def has_label(self, volume_id: str) -> bool:
        return self.record(volume_id).label is not None

    def has_supervoxels(self, volume_id: str) -> bool:
        return self.record(volume_id).supervoxel is not None

    def memo(self, name: str, volume_id: str, compute: Callable[[], T]) -> T:
        """Value derived from one volume (e.g. per-slice supervoxel counts), computed once when ``cache`` is on.

        Lets several consumers of the same store (episode datasets of different folds or label groups) share
        work that depends only on the volume.
        """
        key = (f"memo:{name}", str(volume_id))
        if key in self._memo:
            return self._memo[key]
        value = compute()
        if self.cache:
            self._memo[key] = value
        return value

    def preload(self, ids: Iterable[str] | None = None, kinds: Sequence[str] = ("image",), progress: bool = True) -> None:
        """Load ``kinds`` (``"image"``, ``"label"``, ``"supervoxel"``) of ``ids`` now, with a progress bar.

        Useful before forking DataLoader workers, so that they share the arrays instead of each reading the files.
        """
        for kind in kinds:
            if kind not in _KINDS:
                raise ValueError(f"Unknown kind {kind!r}; expected one of {_KINDS}.")
        id_list = self.ids if ids is None else [str(i) for i in ids]
        if self.cache:
            id_list = [vid for vid in id_list if any((kind, vid) not in self._arrays for kind in kinds)]
        for vid in progress_bar(id_list, desc="loading volumes", disable=not progress or len(id_list) < 2):
            for kind in kinds:
                self._get(kind, vid)

    # ----------------------------------------------------------------------------------------------
    def _get(self, kind: str, volume_id: str) -> np.ndarray:
        vid = str(volume_id)
        rec = self.record(vid)
        key = (kind, vid)
        if key in self._arrays:
            return self._arrays[key]
        if kind == "image":
            array = self._load_image(rec)
        else:
            array = self._load_map(rec, kind)
        array.flags.writeable = False  # shared between callers and DataLoader workers: nobody may edit it
        if self.cache:
            self._arrays[key] = array
        return array

    @staticmethod
    def _read_raw(path: Any, dtype: Any) -> MetaTensor:
        # Stored voxel order: label/supervoxel maps are aligned to the image by array index, not by header.
        return load_volume(path, orientation=None, dtype=dtype)

    def _image_geometry(self, vid: str) -> tuple[tuple[int, ...], torch.Tensor, tuple[float, float, float]]:
        if vid not in self._geometry:
            self._get("image", vid)
        return self._geometry[vid]

    def _orient(self, volume: MetaTensor) -> MetaTensor:
        return self._orienter(volume) if self._orienter is not None else volume

    def _resize(self, volume: MetaTensor, mode: str) -> np.ndarray:
        if self.spatial_size is not None and tuple(volume.shape[1:3]) != (self.spatial_size, self.spatial_size):
            volume = ResizeSlicesd(keys="x", spatial_size=self.spatial_size, mode=mode)({"x": volume})["x"]
        return convert_to_numpy(volume)[0]

    def _load_image(self, rec: VolumeRecord) -> np.ndarray:
        raw = self._read_raw(rec.image, np.float32)
        raw_affine = raw.affine.clone()
        scaled = self._scale(raw)
        if not isinstance(scaled, MetaTensor):
            scaled = MetaTensor(torch.as_tensor(scaled), affine=raw_affine)
        oriented = self._orient(scaled)
        spacing = [float(s) for s in convert_to_numpy(affine_to_spacing(oriented.affine, r=3))]
        if self.spatial_size is not None:
            spacing[0] *= oriented.shape[1] / self.spatial_size
            spacing[1] *= oriented.shape[2] / self.spatial_size
        self._geometry[rec.id] = (tuple(raw.shape[1:]), raw_affine, (spacing[0], spacing[1], spacing[2]))
        image = self._resize(oriented, mode="bilinear").astype(np.float32, copy=False)
        # Bilinear resizing stays inside [-1, 1]; the clip only guards against float rounding of the preset.
        return np.clip(image, -1.0, 1.0)

    @staticmethod
    def _label_on_image_grid(
        label: MetaTensor, shape: tuple[int, ...], affine: torch.Tensor, path: Any, image_path: Any
    ) -> MetaTensor:
        """The label in its image's voxel order, read by header: a label saved in another orientation is transposed
        and flipped onto the image's grid (exactly); one on another grid is refused, naming the file.

        Supervoxel maps are not checked: the published ADNet/RPT ones carry an LPS header on the same voxels.
        """
        plan = axis_reorientation(convert_to_numpy(label.affine), convert_to_numpy(affine), tuple(label.shape[1:]), shape)
        if plan is None:
            if sorted(label.shape[1:]) != sorted(shape):
                return label  # not even a reordering of the image's shape: the caller names both shapes
            raise ValueError(
                f"Label file '{path}' is not on the voxel grid of its image '{image_path}' (shape {tuple(label.shape[1:])} "
                f"vs {shape}, or another spacing, origin or rotation); resample it onto the image grid first."
            )
        axes, flips = plan
        if axes == tuple(range(len(axes))) and not flips:
            return label
        array = np.flip(np.transpose(convert_to_numpy(label.as_tensor()[0]), axes), flips)
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=affine)

    def _load_map(self, rec: VolumeRecord, kind: str) -> np.ndarray:
        path = rec.label if kind == "label" else rec.supervoxel
        if path is None:
            what = "label" if kind == "label" else "supervoxel"
            raise ValueError(
                f"Volume '{rec.id}' (image '{rec.image}') has no {what} file; "
                f"{'Setting 2 and the protocol need ground-truth labels' if kind == 'label' else 'compute supervoxels first'}."
            )
        raw_shape, raw_affine, _ = self._image_geometry(rec.id)
        # An integer dtype makes load_volume reject label files holding non-integer values, naming the file.
        raw = self._read_raw(path, np.int32)
        if kind == "label":
            raw = self._label_on_image_grid(raw, raw_shape, raw_affine, path, rec.image)
        if tuple(raw.shape[1:]) != raw_shape:
            raise ValueError(
                f"{kind.capitalize()} file '{path}' has shape {tuple(raw.shape[1:])} but its image '{rec.image}' has "
                f"shape {raw_shape}; they must share the voxel grid."
            )
        volume = MetaTensor(raw.as_tensor(), affine=raw_affine)
        array = self._resize(self._orient(volume), mode="nearest-exact")
        return array.astype(np.int16 if kind == "label" else np.int32, copy=False)
