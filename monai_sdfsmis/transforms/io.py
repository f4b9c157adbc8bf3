"""Loading of 3D medical volumes (NIfTI, NRRD, DICOM series) with the checks the rest of the package relies on.

Every loader returns a channel-first :class:`monai.data.MetaTensor` ``[1, H, W, D]`` whose slices run along the
last axis, reoriented to one set of axis codes (``RAS`` by default) so that images, labels and supervoxel maps
from different files line up voxel for voxel. The affine stays in the tensor's meta data.
"""

from __future__ import annotations

__all__ = [
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "select_reader",
    "DicomSeries",
    "list_dicom_series",
    "load_volume",
    "check_label_ids",
    "check_same_grid",
    "LoadVolumed",
    "LoadVolumeD",
    "LoadVolumeDict",
    "CheckLabelIdsd",
    "CheckLabelIdsD",
    "CheckLabelIdsDict",
    "check_output_folder",
    "axis_reorientation",
    "check_written_volume",
    "label_map_dtype",
    "SaveVolumed",
]

import copy
import functools
import os
import re
import tempfile
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.data.image_reader import ImageReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, Orientation, SaveImaged
from monai.transforms.io.array import SUPPORTED_READERS
from monai.utils import ImageMetaKey, convert_to_numpy, ensure_tuple, get_equivalent_dtype, optional_import

from monai_sdfsmis.extras import require
from monai_sdfsmis.transforms.dicom_geometry import check_slice_geometry, read_slice_geometry
from monai_sdfsmis.utils import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")

_FILENAME_KEY = ImageMetaKey.FILENAME_OR_OBJ


def select_reader(path: str | os.PathLike, reader: ImageReader | str | None = None) -> ImageReader:
    """Return the MONAI reader used for ``path``.

    Parameters
    ----------
    path
        A file, or a folder holding one DICOM series.
    reader
        ``None`` to choose by file type (NIfTI -> ``NibabelReader``; NRRD, folders (DICOM series) and any other
        suffix -> ``ITKReader``), a reader name from ``monai.transforms.io.array.SUPPORTED_READERS``
        (e.g. ``"ITKReader"``, case-insensitive) or a reader instance (returned unchanged).
    """
    if isinstance(reader, ImageReader):
        return reader
    if isinstance(reader, str):
        cls = SUPPORTED_READERS.get(reader.lower())
        if cls is None:
            raise ValueError(f"unknown reader {reader!r}; choose one of {sorted(SUPPORTED_READERS)}")
        return cls()
    if reader is not None:
        raise ValueError(f"reader must be None, a reader name or a monai ImageReader, got {type(reader).__name__}")
    path = Path(path)
    if not path.is_dir() and path.name.lower().endswith(NIFTI_SUFFIXES):
        return NibabelReader()
    # ITK reads NRRD/NHDR, DICOM series (folders) and MetaImage with LPS->RAS affines like NibabelReader's.
    require("itk", f"reading {'the DICOM series in ' if path.is_dir() else ''}{path}")
    return ITKReader()


@functools.lru_cache(maxsize=1)
def _image_loader() -> LoadImage:
    # LoadImage instantiates every default reader on construction (and MONAI's nvImageCodec DICOM reader logs a
    # warning each time where CuPy is missing); one loader per process, called with an explicit reader, avoids both.
    return LoadImage(image_only=True, ensure_channel_first=False, dtype=None)


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder, as ITK (and so MONAI's ``ITKReader``) groups the files.

    ``identifier`` is ITK's series identifier (the SeriesInstanceUID, followed by details such as the image size
    when one UID holds images of several sizes); ``uid`` the SeriesInstanceUID, ``description`` the
    SeriesDescription (``""`` if absent), ``files`` the file names in slice order.
    """

    identifier: str
    uid: str
    description: str
    files: tuple[str, ...]


def _series_name_generator(folder: Path) -> Any:
    itk, has_itk = optional_import("itk")
    if not has_itk:
        raise ValueError(f"cannot read the DICOM folder {folder}: the 'itk' package is not installed")
    # The same settings as MONAI's ITKReader, so that the series listed are the series it can read.
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")
    names.SetDirectory(str(folder))
    return itk, names


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series in ``folder`` (not its sub-folders), in ITK's order; ``[]`` when it holds none."""
    folder = Path(folder)
    itk, names = _series_name_generator(folder)
    series = []
    for identifier in names.GetSeriesUIDs():
        files = tuple(str(f) for f in names.GetFileNames(identifier))
        header = itk.GDCMImageIO.New()
        header.SetFileName(files[0])
        header.ReadImageInformation()
        uid = str(header.GetValueFromTag("0020|000e", "")[1]).strip() or str(identifier)
        description = str(header.GetValueFromTag("0008|103e", "")[1]).strip()
        series.append(DicomSeries(str(identifier), uid, description, files))
    return series


def _chosen_series(path: Path, reader: ImageReader, series_uid: str | None) -> tuple[ImageReader, DicomSeries | None]:
    """``reader`` set to the one series of folder ``path`` to read, and that series (``None`` when the folder holds
    none that ITK lists); refuses a folder of several series unless one is chosen."""
    if not isinstance(reader, ITKReader):
        if series_uid is not None:
            raise ValueError(f"series_uid needs the ITKReader to read {path}, got {type(reader).__name__}")
        return reader, None
    series = list_dicom_series(path)
    if not series:
        return reader, None  # ITKReader's own error ("no DICOMs") is turned into a message below
    listing = "; ".join(
        f"{s.uid} ({s.description or 'no description'}, {len(s.files)} slices)" for s in series
    )
    if series_uid is None:
        if len(series) == 1:
            return reader, series[0]
        raise ValueError(
            f"folder {path} holds {len(series)} DICOM series: {listing}; choose one with series_uid=<UID> "
            "or move each series into a folder of its own"
        )
    chosen = [s for s in series if series_uid in (s.uid, s.identifier)]
    if not chosen:
        raise ValueError(f"series_uid {series_uid} is not in folder {path}, which holds: {listing}")
    if len(chosen) > 1:
        parts = "; ".join(f"{s.identifier} ({len(s.files)} slices)" for s in chosen)
        raise ValueError(f"series {series_uid} in folder {path} has images of several kinds: {parts}; pass one of these")
    reader = copy.copy(reader)
    reader.series_name = chosen[0].identifier
    return reader, chosen[0]


def _read(path: Path, reader: ImageReader, series_uid: str | None = None) -> MetaTensor:
    """Read ``path`` with ``reader`` into a channel-first MetaTensor in the file's own dtype."""
    if path.is_dir() and not any(p.is_file() for p in path.iterdir()):
        raise ValueError(f"folder {path} contains no DICOM series: it holds no files")
    if path.is_dir():
        reader, series = _chosen_series(path, reader, series_uid)
        if series is not None:
            check_slice_geometry(path, read_slice_geometry(series.files))
    elif series_uid is not None:
        raise ValueError(f"series_uid {series_uid} was given but {path} is a file, not a DICOM folder")
    else:
        _check_file_container(path)
    try:
        img = _image_loader()(str(path), reader=reader)
    except FileNotFoundError as e:
        if path.is_dir():  # ITKReader's "no DICOMs in: <dir>"
            raise ValueError(f"folder {path} contains no DICOM series readable by {type(reader).__name__}") from e
        raise FileNotFoundError(f"cannot read {path}: {e}") from e
    except Exception as e:  # the readers raise a zoo of types (ImageFileError, RuntimeError, OSError, ...)
        what = "DICOM series in folder" if path.is_dir() else "file"
        raise ValueError(
            f"cannot read {what} {path} with {type(reader).__name__} (corrupt or unsupported?): "
            f"{type(e).__name__}: {str(e).strip()[:500]}"
        ) from e
    try:
        return EnsureChannelFirst()(img)
    except Exception as e:
        raise ValueError(f"cannot determine the channel layout of {path} (shape {tuple(img.shape)}): {e}") from e


_NRRD_DATA_FILE = re.compile(rb"^data ?file: *(.+?) *$", re.IGNORECASE | re.MULTILINE)


def _check_file_container(path: Path) -> None:
    """Refuse, naming the file, what a reader would report only as a low-level error: a gzip stream named ``.nii``,
    a NIfTI of RGB(A) colour voxels, and a detached NRRD header (``.nhdr``) whose single data file is missing."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if path.suffix.lower() == ".nii" and head[:2] == b"\x1f\x8b":
        raise ValueError(f"{path} is gzip-compressed but named .nii: rename it to {path.name}.gz")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        try:
            fields = nib.load(str(path)).get_data_dtype().names  # the header only
        except Exception:  # a corrupt header: the reader's own error names the file
            fields = None
        if fields:
            raise ValueError(
                f"{path} holds {''.join(fields)} colour voxels; a single-channel grey-value volume is required "
                "(convert it to grey values)"
            )
    if path.suffix.lower() == ".nhdr":
        match = _NRRD_DATA_FILE.search(head)
        data_file = match.group(1).decode(errors="replace") if match else None
        # "LIST" and "%d"-pattern headers name several files; those are left to the reader.
        if data_file and data_file != "LIST" and "%" not in data_file and " " not in data_file:
            target = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
            if not target.is_file():
                raise FileNotFoundError(f"NRRD header {path} names the data file {target}, which does not exist")


def _check_integer_range(img: torch.Tensor, dtype: torch.dtype, path: Path) -> None:
    """Refuse values an integer cast would wrap around (a label id of 2**40 would become 0, silently)."""
    if img.numel() == 0 or dtype.is_floating_point or dtype == torch.bool:
        return
    info = torch.iinfo(dtype)
    low, high = (float(v) for v in torch.aminmax(img.flatten().to(torch.float64)))
    if low < info.min or high > info.max:
        raise ValueError(
            f"{path} holds values from {low:.0f} to {high:.0f}, outside the {dtype} range of label ids "
            f"[{info.min}, {info.max}]: renumber its labels"
        )


def _raw_nifti_zooms(path: Path) -> np.ndarray | None:
    """The voxel size a NIfTI-1 header without an sform stores (pixdim 1-3), as written: nibabel's loader replaces a
    0 by 1 mm with only a log line. ``None`` for other files and headers with an sform."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        with nib.openers.ImageOpener(str(path)) as stream:
            header = nib.Nifti1Header.from_fileobj(stream, check=False)
    except Exception:  # NIfTI-2, or a header the reader already accepted in another form
        return None
    if int(header["sform_code"]) > 0:
        return None
    return np.asarray(header["pixdim"][1:4], dtype=np.float64)


def _check_grid(img: MetaTensor, path: Path) -> None:
    """Refuse a header whose voxel grid is degenerate (a zero, negative-zero or non-finite voxel size, or axes that
    do not span space): masks written on such a grid could not be placed back on the scan."""
    n = min(len(img.shape) - 1, 3)
    zooms = _raw_nifti_zooms(path)
    if zooms is not None and (np.any(zooms[:n] == 0) or not np.all(np.isfinite(zooms[:n]))):
        raise ValueError(
            f"{path} has a degenerate voxel grid: its header gives the voxel size {', '.join(f'{v:g}' for v in zooms)}"
            " mm (pixdim) and no sform; fix the spacing in its header"
        )
    affine = np.asarray(convert_to_numpy(img.affine), dtype=np.float64)
    matrix = affine[:n, :n]
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0) or abs(np.linalg.det(matrix)) <= 1e-12 * np.prod(
        np.maximum(spacing, 1e-300)
    ):
        shown = ", ".join(f"{v:g}" for v in spacing)
        raise ValueError(
            f"{path} has a degenerate voxel grid (voxel size {shown} mm, or axes that do not span space); fix the "
            "spacing or direction in its header"
        )


def _check_finite(values: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` counting NaN / infinite voxels; one min/max pass when all are finite."""
    v_min, v_max = torch.aminmax(values)
    if bool(torch.isfinite(v_min)) and bool(torch.isfinite(v_max)):  # NaN propagates into min/max
        return
    n_nan = int(torch.isnan(values).sum())
    if n_nan:
        raise ValueError(f"{name} contains {n_nan} NaN voxels")
    raise ValueError(f"{name} contains {int(torch.isinf(values).sum())} infinite voxels")


def _check_range(values: torch.Tensor, name: str) -> None:
    """Refuse finite values whose range overflows float32 arithmetic (``max - min`` is infinite): intensity scaling
    would turn them into infinities."""
    v_min, v_max = torch.aminmax(values.float())
    if not bool(torch.isfinite(v_max - v_min)):
        raise ValueError(
            f"{name} holds finite values too large for float32 arithmetic (from {float(v_min):.3g} to {float(v_max):.3g}); "
            "rescale the volume"
        )


def _check_shape(img: MetaTensor, path: Path, require_3d: bool) -> tuple[int, ...]:
    """The spatial shape of a channel-first ``img``; refuse several channels and (``require_3d``) 2D data."""
    n_channels, spatial = int(img.shape[0]), tuple(int(s) for s in img.shape[1:])
    if n_channels != 1:
        raise ValueError(
            f"{path} holds {n_channels} channels or time points (shape {tuple(img.shape)} channel-first); "
            "a single-channel volume is required"
        )
    if require_3d and (len(spatial) != 3 or min(spatial) < 2):
        kind = "2D data" if len(spatial) < 3 or min(spatial) < 2 else f"{len(spatial)}D data"
        raise ValueError(
            f"{path} holds {kind} (spatial shape {spatial}); a 3D volume with at least 2 voxels along each axis "
            "is required"
        )
    return spatial


def _cast_volume(img: MetaTensor, torch_dtype: torch.dtype, path: Path) -> MetaTensor:
    """``img`` as ``torch_dtype``. A float-to-integer cast rounds, refusing values more than 1e-3 from an integer
    (label maps hold integer ids); a cast to any integer dtype refuses values outside its range."""
    if torch.is_floating_point(img) and not torch_dtype.is_floating_point and torch_dtype != torch.bool:
        rounded = torch.round(img)
        off = (img - rounded).abs()
        if float(off.max()) > 1e-3:
            bad = img.flatten()[int(torch.argmax(off.flatten()))]
            raise ValueError(
                f"{path} contains non-integer values (e.g. {float(bad):g}) but {torch_dtype} was requested; "
                "label maps must hold integer ids"
            )
        img = rounded
    _check_integer_range(img.as_tensor(), torch_dtype, path)
    return img.to(torch_dtype)


def load_volume(
    path: str | os.PathLike,
    *,
    reader: ImageReader | str | None = None,
    orientation: str | None = "RAS",
    dtype: DtypeLike | torch.dtype | None = np.float32,
    require_3d: bool = True,
    series_uid: str | None = None,
) -> MetaTensor:
    """Load one volume as a channel-first MetaTensor ``[1, H, W, D]``.

    Parameters
    ----------
    path
        NIfTI (``.nii``/``.nii.gz``) or NRRD (``.nrrd``/``.nhdr``) file, or a folder holding one DICOM series
        (any other suffix is handed to ITK).
    reader
        ``None`` (choose by file type, see :func:`select_reader`), a MONAI reader name or instance.
    orientation
        Axis codes the volume is reoriented to (``monai.transforms.Orientation``); ``None`` keeps the file's
        voxel order. Use the same value for an image and its labels so that they stay aligned.
    dtype
        Output dtype. ``None`` keeps the file's dtype. For an integer dtype a floating-point file must hold
        integer values only (label maps), which are rounded before the cast.
    require_3d
        Reject 2D data (and single-slice volumes). With ``False`` 2D images load as ``[1, H, W]``.
    series_uid
        For a DICOM folder: the SeriesInstanceUID (or ITK series identifier, :func:`list_dicom_series`) of the
        series to read. ``None`` reads the folder's only series; a folder of several series is refused, with a
        message listing them (UID, description, slice count), rather than reading one of them silently.

    Returns
    -------
    MetaTensor
        ``[1, H, W, D]`` (``[1, H, W]`` for 2D data with ``require_3d=False``); ``.affine`` maps voxel indices
        to world millimetres (RAS), ``.meta["filename_or_obj"]`` is ``path``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file cannot be read, a folder holds no DICOM series or several (without ``series_uid``), the data
        are not a single-channel 3D volume, contain NaN or infinite values, or (integer ``dtype``) hold
        non-integer values.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"volume {path} does not exist")
    img = _read(path, select_reader(path, reader), series_uid)
    spatial = _check_shape(img, path, require_3d)

    _check_grid(img, path)
    if torch.is_complex(img):
        raise ValueError(f"{path} holds complex values ({img.dtype}); a real-valued volume is required (save its magnitude)")
    if torch.is_floating_point(img):
        _check_finite(img.as_tensor(), str(path))
        _check_range(img.as_tensor(), str(path))

    if dtype is not None:
        img = _cast_volume(img, get_equivalent_dtype(dtype, torch.Tensor), path)

    if orientation is not None:
        axcodes = str(orientation)[: len(spatial)]
        try:
            img = Orientation(axcodes=axcodes, labels=None)(img)
        except Exception as e:
            raise ValueError(f"cannot reorient {path} to {orientation!r}: {e}") from e
    img.meta[_FILENAME_KEY] = str(path)
    return img


def _name_of(label: Any, path: str | os.PathLike | None) -> str:
    if path is not None:
        return str(path)
    if isinstance(label, MetaTensor) and label.meta.get(_FILENAME_KEY):
        return str(label.meta[_FILENAME_KEY])
    return "<label array>"


def _present_ids(label: torch.Tensor) -> list[int]:
    """Sorted ids in ``label``; a counting pass for small non-negative integer ids (the usual case), else a sort."""
    flat = label.flatten()
    if flat.numel() and not flat.is_floating_point() and flat.dtype != torch.bool:
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo >= 0 and hi < 1 << 20:
            counts = torch.bincount(flat, minlength=hi + 1)
            return torch.nonzero(counts).flatten().tolist()
    return [int(v) for v in torch.unique(flat).tolist()]


def check_label_ids(label: Any, required_ids: Iterable[int] = (), path: str | os.PathLike | None = None) -> list[int]:
    """Check that a label map holds foreground and every id in ``required_ids``.

    Parameters
    ----------
    label
        Label map of any shape (tensor or array), e.g. ``[1, H, W, D]``.
    required_ids
        Ids that must occur (e.g. the organs to be segmented).
    path
        File name used in messages; defaults to the MetaTensor's ``filename_or_obj``.

    Returns
    -------
    list of int
        Sorted ids present in ``label`` (background 0 included when present).

    Raises
    ------
    ValueError
        A required id is not a positive integer (0 is the background), ``label`` holds no foreground voxel, or a
        required id is absent.
    """
    name = _name_of(label, path)
    required_ids = list(required_ids)
    bad_ids = [i for i in required_ids if int(i) != i or int(i) < 1]
    if bad_ids:
        raise ValueError(
            f"organ id {bad_ids[0]} is not valid for {name}: organ ids are positive integers (0 is the background)"
        )
    tensor = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(np.asarray(label))
    present = _present_ids(tensor)
    if not any(v != 0 for v in present):
        raise ValueError(f"label file {name} contains no foreground (every voxel is 0)")
    missing = [int(i) for i in required_ids if int(i) not in present]
    if len(missing) == 1:
        raise ValueError(f"organ id {missing[0]} absent from {name}; present ids: {present}")
    if missing:
        raise ValueError(f"organ ids {missing} absent from {name}; present ids: {present}")
    return present


def check_same_grid(
    reference: MetaTensor,
    other: MetaTensor,
    ref_name: str = "reference",
    other_name: str = "other",
    rtol: float = 1e-3,
) -> None:
    """Raise ``ValueError`` unless ``other`` lies on ``reference``'s voxel grid (spatial shape and affine).

    Parameters
    ----------
    reference, other
        Channel-first MetaTensors ``[C, H, W, D]``.
    ref_name, other_name
        Names used in the message (file names).
    rtol
        Tolerance as a fraction of the reference's smallest voxel size: every affine entry (origin, direction
        times spacing) may differ by at most ``rtol * min(spacing)`` millimetres.
    """
    if tuple(reference.shape[1:]) != tuple(other.shape[1:]):
        raise ValueError(
            f"{other_name} has spatial shape {tuple(other.shape[1:])} but {ref_name} has "
            f"{tuple(reference.shape[1:])}; they must share one voxel grid"
        )
    a, b = np.asarray(reference.affine, dtype=float), np.asarray(other.affine, dtype=float)
    n = a.shape[0] - 1
    spacing = np.linalg.norm(a[:n, :n], axis=0)
    tol = float(rtol) * float(spacing.min()) if spacing.size and spacing.min() > 0 else float(rtol)
    diff = np.abs(a - b)
    if float(diff.max()) > tol:
        origin = float(np.abs(a[:n, n] - b[:n, n]).max())
        raise ValueError(
            f"{other_name} and {ref_name} have different affines: they lie on different voxel grids (origins {origin:.4g} mm apart, largest affine "
            f"difference {float(diff.max()):.4g} mm, tolerance {tol:.3g} mm); they must share one voxel grid "
            "(is the label from another volume?)"
        )


class LoadVolumed(MapTransform):
    """Dictionary wrapper of :func:`load_volume`: replaces each path under ``keys`` with its ``[1, H, W, D]`` volume.

    Label maps are loaded with an integer dtype (``label_dtype``), everything else with ``dtype``.

    Parameters
    ----------
    keys
        Keys whose values are paths.
    reader, orientation, require_3d
        See :func:`load_volume` (shared by all keys).
    dtype
        Dtype of the non-label keys.
    label_keys
        Keys holding label maps. ``None`` (default) means every key whose name contains ``"label"``
        (``label``, ``support_label``, ...); pass ``()`` to load everything with ``dtype``.
    label_dtype
        Integer dtype of the label keys (int32 leaves room for supervoxel ids).
    grid_key
        If given, every other loaded key must lie on this key's voxel grid (shape and affine), e.g.
        ``grid_key="image"`` to check that the labels belong to the image.
    same_grid
        ``{key: reference_key}``: each ``key`` must lie on its ``reference_key``'s voxel grid, e.g.
        ``{"support_label": "support_image"}`` when the query has another grid than the support.
    series_uid
        ``{key: SeriesInstanceUID}``: the DICOM series to read where a key's folder holds several
        (see :func:`load_volume`).
    allow_missing_keys
        Skip keys that are absent instead of raising ``KeyError``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: ImageReader | str | None = None,
        orientation: str | None = "RAS",
        dtype: DtypeLike | torch.dtype | None = np.float32,
        label_keys: KeysCollection | None = None,
        label_dtype: DtypeLike | torch.dtype = np.int32,
        require_3d: bool = True,
        grid_key: Hashable | None = None,
        same_grid: Mapping[Hashable, Hashable] | None = None,
        series_uid: Mapping[Hashable, str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid = dict(series_uid or {})
        unknown = [k for k in self.series_uid if k not in self.keys]
        if unknown:
            raise ValueError(f"series_uid names keys {unknown} that are not among keys {self.keys}")
        self.same_grid = dict(same_grid or {})
        for key, ref in self.same_grid.items():
            if key not in self.keys or ref not in self.keys:
                raise ValueError(f"same_grid entry {key!r}: {ref!r} must name two of keys {self.keys}")
        self.reader = reader
        self.orientation = orientation
        self.dtype = dtype
        if label_keys is None:
            self.label_keys = tuple(k for k in self.keys if "label" in str(k))
        else:
            self.label_keys = ensure_tuple(label_keys)
        if get_equivalent_dtype(label_dtype, torch.Tensor).is_floating_point:
            raise ValueError(f"label_dtype must be an integer dtype, got {label_dtype}")
        self.label_dtype = label_dtype
        self.require_3d = require_3d
        if grid_key is not None and grid_key not in self.keys:
            raise ValueError(f"grid_key {grid_key!r} is not one of keys {self.keys}")
        self.grid_key = grid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_volume(
                d[key],
                reader=self.reader,
                orientation=self.orientation,
                dtype=self.label_dtype if key in self.label_keys else self.dtype,
                require_3d=self.require_3d,
                series_uid=self.series_uid.get(key),
            )
        if self.grid_key is not None and self.grid_key in d:
            ref = d[self.grid_key]
            for key in self.key_iterator(d):
                if key != self.grid_key:
                    check_same_grid(ref, d[key], _name_of(ref, None), _name_of(d[key], None))
        for key, ref_key in self.same_grid.items():
            if key in d and ref_key in d:
                check_same_grid(d[ref_key], d[key], _name_of(d[ref_key], None), _name_of(d[key], None))
        return d


class CheckLabelIdsd(MapTransform):
    """Dictionary wrapper of :func:`check_label_ids`: passes the data through unchanged or raises ``ValueError``.

    Parameters
    ----------
    keys
        Label keys to check.
    required_ids
        Ids that must occur in every checked label map.
    allow_missing_keys
        Skip keys that are absent.
    """

    def __init__(
        self, keys: KeysCollection, required_ids: Sequence[int] = (), allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.required_ids = tuple(int(i) for i in required_ids)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_label_ids(d[key], self.required_ids)
        return d


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be written in it; returns it as a ``Path``.

    Raises ``ValueError`` naming the folder (and the cause) when it is a file, cannot be created or is not writable.
    """
    path = Path(folder).expanduser()
    if path.is_symlink() and not path.exists():
        raise ValueError(f"output folder {path} is a broken symbolic link (to {os.readlink(path)}); create its target")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as err:
        raise ValueError(f"output folder {path} is not writable: {err.strerror or err}") from err
    return path


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))
    except (TypeError, ValueError):
        return False


def axis_reorientation(
    affine: Any, target_affine: Any, shape: Sequence[int], target_shape: Sequence[int] | None = None, atol: float = 1e-3
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The axis permutation and flips that take an array on ``affine`` onto ``target_affine``'s grid, if there are.

    Parameters
    ----------
    affine, target_affine
        ``(N+1) x (N+1)`` voxel-to-world matrices of the array and of the grid wanted.
    shape, target_shape
        Spatial shapes (``target_shape`` defaults to the permuted ``shape``).
    atol
        Tolerance, in voxels, on the voxel-to-voxel matrix being a signed permutation with whole-voxel offsets.

    Returns
    -------
    ``(axes, flips)`` such that ``np.flip(np.transpose(array, axes), flips)`` lies on the target grid, or ``None``
    when the grids differ by more than axis order and direction (spacing, origin shift, rotation, size).
    """
    a, t = np.asarray(affine, dtype=np.float64), np.asarray(target_affine, dtype=np.float64)
    n = len(shape)
    if a.shape != (n + 1, n + 1) or t.shape != (n + 1, n + 1):
        return None
    try:
        voxel = np.linalg.solve(a, t)  # target voxel index -> array voxel index
    except np.linalg.LinAlgError:
        return None
    rotation, offset = voxel[:n, :n], voxel[:n, n]
    axes = tuple(int(i) for i in np.argmax(np.abs(rotation), axis=0))
    if sorted(axes) != list(range(n)):
        return None
    signs = np.array([rotation[axes[j], j] for j in range(n)])
    expected = np.zeros((n, n))
    for j in range(n):
        expected[axes[j], j] = np.sign(signs[j])
    if not np.allclose(rotation, expected, atol=atol / max(max(shape), 1)):
        return None
    permuted = tuple(int(shape[axes[j]]) for j in range(n))
    if target_shape is not None and tuple(int(v) for v in target_shape) != permuted:
        return None
    flips = []
    for j in range(n):
        start = offset[axes[j]]
        if signs[j] > 0 and abs(start) <= atol:
            continue
        if signs[j] < 0 and abs(start - (permuted[j] - 1)) <= atol:
            flips.append(j)
            continue
        return None
    return axes, tuple(flips)


def check_written_volume(path: str | os.PathLike, shape: Sequence[int], name: Any = None) -> None:
    """Read a just-written volume back completely; raise ``OSError`` naming ``name`` when it is short or unreadable.

    NIfTI files are decompressed in full (gzip's checksum catches a truncated ``.nii.gz``); other formats are read
    in full with ITK. ``shape`` is the shape of the array the writer was given, in any axis order (ITK's writer
    holds it reversed): the number of values read back must equal its product.
    """
    shown = os.fspath(name if name is not None else path)
    try:
        if str(path).endswith((".nii", ".nii.gz")):
            image = nib.load(os.fspath(path))
            voxels = int(np.asarray(image.dataobj).size)  # every byte, and gzip's CRC
        else:
            itk = optional_import("itk")[0]
            voxels = int(itk.array_view_from_image(itk.imread(os.fspath(path))).size)
    except Exception as error:  # truncated gzip, short data, a header that does not parse
        raise OSError(f"writing {shown} failed: the file does not read back ({type(error).__name__}: {error}); is the "
                      "disk full?") from None
    expected = int(np.prod([int(v) for v in shape]))
    if voxels != expected:
        raise OSError(f"writing {shown} failed: it reads back with {voxels} voxels, not {expected}; is the disk full?")


def label_map_dtype(max_label: int) -> type:
    """The integer type a mask or label map is stored in: ``uint8`` when every label fits, else ``uint16``.

    A label above 65535 is a ``ValueError``: no id of a segmentation is that large, and a cast would wrap it.
    """
    if int(max_label) > np.iinfo(np.uint16).max:
        raise ValueError(f"label id {int(max_label)} does not fit a uint16 label map (at most 65535)")
    return np.uint8 if int(max_label) <= np.iinfo(np.uint8).max else np.uint16


def _atomic_writer(writer_cls: type) -> type:
    """A subclass of a MONAI ``ImageWriter``: ``write`` goes to a temporary file renamed last, and an output whose
    grid differs from the file's only by axis order and direction is put back by transposes and flips."""

    class _Atomic(writer_cls):  # type: ignore[misc, valid-type]
        def write(self, filename_or_obj, *args, **kwargs):  # noqa: D102
            if not isinstance(filename_or_obj, (str, os.PathLike)):
                return super().write(filename_or_obj, *args, **kwargs)
            with atomic_path(filename_or_obj) as tmp:
                result = super().write(str(tmp), *args, **kwargs)
                # Some writers (ITK's) ignore a short write on a full disk; only a file that reads back is published.
                check_written_volume(tmp, self.data_obj.shape, filename_or_obj)
                return result

        @classmethod
        def resample_if_needed(cls, data_array, affine=None, target_affine=None, output_spatial_shape=None, **kwargs):
            # MONAI resamples through SpatialResample, which copies the whole volume to float64 (several GB for a
            # large CT) even when undoing an Orientation; that case needs no interpolation, only a view.
            if affine is None:
                return super().resample_if_needed(data_array, affine, target_affine, output_spatial_shape, **kwargs)
            spatial = tuple(int(v) for v in data_array.shape[:3])
            if target_affine is None:
                return data_array, affine
            plan = axis_reorientation(
                convert_to_numpy(affine), convert_to_numpy(target_affine), spatial,
                None if output_spatial_shape is None else ensure_tuple(output_spatial_shape)[:3],
            )
            if plan is None:
                return super().resample_if_needed(data_array, affine, target_affine, output_spatial_shape, **kwargs)
            axes, flips = plan
            array = convert_to_numpy(data_array)  # a CPU tensor's memory, not a copy
            array = np.transpose(array, (*axes, *range(3, array.ndim)))
            if flips:
                array = np.flip(array, flips)
            return array, np.asarray(convert_to_numpy(target_affine), dtype=np.float64)

    _Atomic.__name__ = _Atomic.__qualname__ = f"Atomic{writer_cls.__name__}"
    return _Atomic


class SaveVolumed(SaveImaged):
    """MONAI ``SaveImaged`` that never leaves a half-written file, never writes over an input and never replaces an
    existing output unless ``overwrite``.

    Each file is written under a temporary name in the output folder and renamed to its final name once complete
    (:func:`monai_sdfsmis.utils.atomic_path`), so a crash or ``SIGKILL`` while saving leaves no truncated file under
    the final name. The output folder is checked when the transform is built, i.e. before any inference.

    Parameters
    ----------
    keys, output_dir, **kwargs
        As ``monai.transforms.SaveImaged``.
    overwrite
        Replace outputs that already exist; with ``False`` (default) an existing output raises ``ValueError``.
    protected
        Input files that must never be written over, whatever ``overwrite`` says (e.g. the query image, the support
        image and label). The file each saved volume was loaded from (its ``filename_or_obj``) is always protected.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike = "./",
        overwrite: bool = False,
        protected: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        check_output_folder(output_dir)
        super().__init__(keys, output_dir=output_dir, **kwargs)
        self.overwrite = bool(overwrite)
        self.protected = [os.fspath(p) for p in ensure_tuple(protected) if p is not None]
        self.saver.writers = tuple(_atomic_writer(w) for w in self.saver.writers)

    def _target(self, img: Any, meta_data: Mapping | None) -> str:
        meta = img.meta if isinstance(img, MetaTensor) else meta_data
        kw = self.saver.fname_formatter(meta, self.saver)
        return str(self.saver.folder_layout.filename(**kw))

    def __call__(self, data):
        d = dict(data)
        targets = []
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            meta_data = d.get(meta_key) if meta_key is not None else None
            target = self._target(d[key], meta_data)
            targets.append(target)
            meta = d[key].meta if isinstance(d[key], MetaTensor) else (meta_data or {})
            inputs = [*self.protected, *(p for p in ensure_tuple(meta.get(_FILENAME_KEY)) if isinstance(p, str))]
            if any(_same_file(target, p) for p in inputs):
                raise ValueError(f"refusing to write {target}: it is an input file; choose another output_dir")
            if os.path.lexists(target) and not self.overwrite:
                raise ValueError(
                    f"output {target} already exists; remove it, choose another output_dir or set overwrite=True"
                )
        try:
            return super().__call__(d)
        except RuntimeError as error:
            # MONAI tries every writer and reports all their tracebacks; the first failure is the one that matters.
            raise OSError(f"could not write {', '.join(targets)}: {_first_writer_failure(str(error))}") from None


def _first_writer_failure(report: str) -> str:
    """The first writer's error from MONAI's report of every writer's traceback, in one line."""
    blocks = report.split("Traceback (most recent call last):")
    if len(blocks) < 2:
        return report.strip().splitlines()[0] if report.strip() else "unknown error"
    lines = [line.strip() for line in blocks[1].splitlines() if line.strip()]
    # The exception's own lines follow the indented stack; ours already reads "writing X failed: ...".
    start = next((i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)), len(lines) - 1)
    message = lines[start].split(":", 1)[0] + ": " + lines[-1] if len(lines) - start > 1 else lines[start]
    message = message.removeprefix("OSError: ")
    return message if "disk full" in message else f"{message}; is the disk full?"


LoadVolumeD = LoadVolumeDict = LoadVolumed
CheckLabelIdsD = CheckLabelIdsDict = CheckLabelIdsd
