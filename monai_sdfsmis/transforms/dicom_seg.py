"""DICOM in, DICOM out: the mask of a query DICOM series as a DICOM Segmentation (SEG) that references that series.

PACS viewers and OHIF show a SEG over the images it was made from. Each frame of the SEG belongs to one source
slice; which mask voxel a frame pixel takes is found from the slice's own ImagePositionPatient /
ImageOrientationPatient / PixelSpacing and the mask's affine, not from any assumed axis order, so a mask on the
series' grid lands on the acquired pixels whatever the file names, slice order or orientation. The SEG is built
with ``highdicom`` (the ``dicom_seg`` extra), written under a temporary name, read back, and renamed last.
"""

from __future__ import annotations

__all__ = ["DICOM_SEG_EXT", "series_datasets", "mask_frames", "write_dicom_seg", "SaveDicomSegd"]

import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from monai_sdfsmis.extras import require
from monai_sdfsmis.utils import atomic_path

DICOM_SEG_EXT = ".dcm"
# A frame pixel must fall within this fraction of a voxel of a mask voxel centre: the mask is on the series' grid.
GRID_TOLERANCE = 1e-2


def series_datasets(folder: str | os.PathLike) -> list[Any]:
    """The headers of the one DICOM series in ``folder`` (pydicom datasets, pixel data not read), in ITK's order."""
    from monai_sdfsmis.transforms.io import list_dicom_series

    require("dicom_seg", "writing a DICOM-SEG")  # highdicom brings pydicom
    import pydicom

    series = list_dicom_series(folder)
    if len(series) != 1:
        raise ValueError(f"a DICOM-SEG needs exactly one DICOM series in {folder}, found {len(series)}")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series[0].files]
    _complete_identifiers(datasets, folder)
    return datasets


def _complete_identifiers(datasets: Sequence[Any], folder: str | os.PathLike) -> None:
    """Fill the UIDs an anonymiser blanked, so that the SEG can reference the slices.

    A blank SOP Class / Instance UID is taken from the file meta information (the same values, by the standard). A
    blank Study or Series Instance UID has no such copy: one is generated from the slices' SOP Instance UIDs (the
    same on every run) and a warning says that a PACS will not file the SEG with these images.
    """
    from pydicom.uid import generate_uid

    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(keyword, "") or "").strip() and meta is not None and meta.get(meta_keyword):
                setattr(ds, keyword, meta[meta_keyword].value)
            if not str(ds.get(keyword, "") or "").strip():
                raise ValueError(f"DICOM file {ds.filename} of {folder} has no {keyword}; a DICOM-SEG cannot reference it")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not str(datasets[0].get(k, "") or "").strip()]
    for keyword in missing:
        uid = generate_uid(entropy_srcs=[keyword, *(str(ds.SOPInstanceUID) for ds in datasets)])
        for ds in datasets:
            setattr(ds, keyword, uid)
    if missing:
        print(f"WARNING: the DICOM series in {folder} has no {' or '.join(missing)} (anonymised?); its DICOM-SEG "
              "references generated ones, so a PACS will not file it with these images", file=sys.stderr, flush=True)


def _frame_world_ras(ds: Any) -> np.ndarray:
    """RAS millimetres of every pixel centre of one slice ``[rows, cols, 3]``, from its own header."""
    position = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    rows, columns = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    # orientation[:3] is the direction in which the column index grows, orientation[3:] the row index's (LPS)
    lps = (position + columns[..., None] * column_spacing * orientation[:3]
           + rows[..., None] * row_spacing * orientation[3:])
    return lps * np.array([-1.0, -1.0, 1.0])


def mask_frames(mask: np.ndarray, affine: np.ndarray, datasets: Sequence[Any], name: str = "the mask") -> np.ndarray:
    """The mask's value at every pixel of every source slice: ``bool [n_slices, rows, cols]``.

    Parameters
    ----------
    mask
        ``[X, Y, Z]`` voxel array.
    affine
        ``4 x 4`` voxel index -> RAS millimetres of ``mask``.
    datasets
        The source slices' headers (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows, Columns).

    Raises
    ------
    ValueError
        A slice pixel does not fall on a mask voxel centre (the mask is not on the series' grid).
    """
    inverse = np.linalg.inv(np.asarray(affine, dtype=float))
    frames = []
    for ds in datasets:
        ras = _frame_world_ras(ds)
        index = ras @ inverse[:3, :3].T + inverse[:3, 3]
        nearest = np.round(index).astype(int)
        off = float(np.abs(index - nearest).max())
        outside = (nearest < 0) | (nearest >= np.asarray(mask.shape[:3]))
        if off > GRID_TOLERANCE or outside.any():
            raise ValueError(
                f"{name} is not on the grid of DICOM slice {getattr(ds, 'SOPInstanceUID', '?')}: its pixels fall "
                f"{off:.3f} voxels off the mask's voxel centres{' or outside it' if outside.any() else ''}"
            )
        frames.append(mask[nearest[..., 0], nearest[..., 1], nearest[..., 2]] > 0)
    return np.stack(frames)


def write_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    series_folder: str | os.PathLike,
    output_path: str | os.PathLike,
    segment_label: str = "organ",
    software_version: str = "",
) -> Path:
    """Write ``mask`` (on the grid of the series in ``series_folder``) as a binary DICOM-SEG of that series.

    The SEG is a new series in the source study, one segment (``segment_label``, an automatically segmented organ),
    one frame per source slice that holds foreground (every frame when none does, so that an empty answer is still
    a valid SEG). It is written under a temporary name, read back and checked (frame count, pixels), then renamed.

    Raises
    ------
    OSError
        Naming ``output_path`` when the SEG cannot be written whole (a full disk); nothing is left under its name.
    """
    hd = require("dicom_seg", "writing a DICOM-SEG")
    from pydicom.sr.codedict import codes

    datasets = series_datasets(series_folder)
    frames = mask_frames(mask, affine, datasets, name=f"the mask of {series_folder}")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Organ,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="SD-FSMIS", family=codes.DCM.ArtificialIntelligence, version=software_version or "unknown"
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monai-sdfsmis",
        manufacturer_model_name="SD-FSMIS",
        software_versions=software_version or "unknown",
        device_serial_number="none",
        omit_empty_frames=bool(frames.any()),
    )
    target = Path(output_path)
    try:
        with atomic_path(target) as tmp:
            seg.save_as(str(tmp))
            _check_written_seg(tmp, frames, target)
    except OSError as error:
        if error.errno is None:  # _check_written_seg's, which names the file
            raise
        raise OSError(error.errno, f"could not write {target}: {error.strerror or error}") from error
    return target


def _check_written_seg(path: Path, frames: np.ndarray, name: Path) -> None:
    """Read the SEG back: it must parse and hold the foreground pixels the writer was given."""
    import pydicom

    try:
        written = pydicom.dcmread(str(path))
        pixels = np.asarray(written.pixel_array).reshape(-1, *frames.shape[1:])
    except Exception as error:  # truncated file, bad pixel data
        raise OSError(f"writing {name} failed: it does not read back ({type(error).__name__}: {error}); is the disk "
                      "full?") from None
    if int(pixels.sum()) != int(frames.sum()):
        raise OSError(f"writing {name} failed: it reads back with {int(pixels.sum())} foreground pixels, not "
                      f"{int(frames.sum())}")


class SaveDicomSegd(MapTransform):
    """Save ``pred`` (a mask MetaTensor ``[1, X, Y, Z]`` on the query's grid) as ``<output_dir>/<series>_seg.dcm``.

    The query must be a DICOM series folder (its path in the mask's ``filename_or_obj``); see
    :func:`write_dicom_seg`. Existing outputs are kept unless ``overwrite``; an output never replaces an input.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = ".",
        segment_label: str = "organ",
        overwrite: bool = False,
        software_version: str = "",
    ) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.segment_label = segment_label
        self.overwrite = bool(overwrite)
        self.software_version = software_version

    @staticmethod
    def output_path(query: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
        return Path(output_dir) / f"{Path(query).name}_seg{DICOM_SEG_EXT}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if not isinstance(pred, MetaTensor) or not pred.meta.get(ImageMetaKey.FILENAME_OR_OBJ):
                raise ValueError(f"SaveDicomSegd: {key!r} must be a MetaTensor that names its query series")
            query = Path(str(pred.meta[ImageMetaKey.FILENAME_OR_OBJ]))
            if not query.is_dir():
                raise ValueError(f"a DICOM-SEG is written for a DICOM series folder; the query {query} is a file")
            target = self.output_path(query, self.output_dir)
            if target.exists() and not self.overwrite:
                raise ValueError(f"{target} already exists; pass overwrite (--overwrite) to replace it")
            mask = pred.as_tensor().detach().cpu().numpy()
            write_dicom_seg(mask[0], np.asarray(pred.affine, dtype=float), query, target, self.segment_label,
                            self.software_version)
        return d
