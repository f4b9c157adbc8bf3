"""Slice geometry of a DICOM series, checked before any voxel of it is used.

ITK stacks a series' files on a uniform grid: it sorts them by ImagePositionPatient along the slice normal and
spaces them by the distance of the first two. Where two slices share a position it falls back to file-name
order, and where a slice is missing it spreads the rest over a false uniform grid; both only with a C++ warning.
A mask computed on such a grid lands on voxels the scanner never acquired. :func:`check_slice_geometry` refuses
those series instead (duplicate positions, gaps or uneven spacing, mixed orientations, slices shifted within
their plane), with one line naming the folder and the first offending file. Gaps are refused rather than
resampled: the missing slices are usually a transfer error that the user can repair at the source.
"""

from __future__ import annotations

__all__ = ["SliceGeometry", "read_slice_geometry", "check_slice_geometry"]

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monai_sdfsmis.extras import require

# Direction cosines agree to 1e-4 in any scanner's output; positions within 0.01 mm are the same position.
ORIENTATION_TOLERANCE = 1e-4
POSITION_TOLERANCE_MM = 0.01
# Relative spread of the slice steps allowed as rounding (positions are written as decimal strings).
SPACING_TOLERANCE = 0.01


@dataclass(frozen=True)
class SliceGeometry:
    """Where one DICOM file's slice lies: ``position`` (ImagePositionPatient, LPS mm) and ``orientation``
    (ImageOrientationPatient: row then column direction cosines)."""

    file: str
    position: np.ndarray
    orientation: np.ndarray


def _numbers(value: str, count: int, tag: str, file: str) -> np.ndarray:
    try:
        numbers = np.asarray([float(v) for v in value.strip().split("\\")], dtype=float)
    except ValueError:
        numbers = np.zeros(0)
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise ValueError(f"DICOM file {file} has no valid {tag} (read {value.strip()!r}); its slice cannot be placed")
    return numbers


def read_slice_geometry(files: Sequence[str]) -> list[SliceGeometry]:
    """ImagePositionPatient and ImageOrientationPatient of each file, from its header only (ITK's GDCM reader)."""
    itk = require("itk", "checking the slice positions of a DICOM series")
    geometry = []
    for file in files:
        header = itk.GDCMImageIO.New()
        header.SetFileName(str(file))
        header.ReadImageInformation()
        position = _numbers(str(header.GetValueFromTag("0020|0032", "")[1]), 3, "ImagePositionPatient", file)
        orientation = _numbers(str(header.GetValueFromTag("0020|0037", "")[1]), 6, "ImageOrientationPatient", file)
        geometry.append(SliceGeometry(str(file), position, orientation))
    return geometry


def check_slice_geometry(folder: str | Path, geometry: Sequence[SliceGeometry]) -> None:
    """Refuse a series whose slices do not form one uniform stack along the slice normal.

    Parameters
    ----------
    folder
        The series' folder, named in the messages.
    geometry
        One entry per file (any order); a single-file series (one slice or one multi-frame file) passes.

    Raises
    ------
    ValueError
        One line naming ``folder`` and the first offending file: mixed orientations, two slices at one position,
        a gap or uneven slice spacing, or slices shifted within their plane (a tilted gantry).
    """
    if len(geometry) < 2:
        return
    first = geometry[0]
    for g in geometry[1:]:
        if np.max(np.abs(g.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise ValueError(
                f"DICOM series in {folder} mixes slice orientations: {Path(g.file).name} has "
                f"{np.round(g.orientation, 4).tolist()}, {Path(first.file).name} {np.round(first.orientation, 4).tolist()}; "
                "one stack of parallel slices is required"
            )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    normal /= np.linalg.norm(normal)
    ordered = sorted(geometry, key=lambda g: float(g.position @ normal))
    along = np.asarray([float(g.position @ normal) for g in ordered])
    steps = np.diff(along)
    name = [Path(g.file).name for g in ordered]
    for i, step in enumerate(steps):
        if step < POSITION_TOLERANCE_MM:
            raise ValueError(
                f"DICOM series in {folder} has two slices at one position ({along[i]:.3f} mm along the slice normal): "
                f"{name[i]} and {name[i + 1]}; remove the repeated slice (or split a multi-echo / repeated acquisition "
                "into one folder each)"
            )
    spacing = float(np.median(steps))
    for i, step in enumerate(steps):
        if abs(step - spacing) > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * spacing):
            missing = f" ({round(step / spacing) - 1} slice(s) missing?)" if step > 1.5 * spacing else ""
            raise ValueError(
                f"DICOM series in {folder} is not evenly spaced: {step:.3f} mm from {name[i]} to {name[i + 1]}, "
                f"{spacing:.3f} mm between the other slices{missing}; a complete series with uniform slice spacing "
                "is required"
            )
    for g, distance in zip(ordered[1:], along[1:] - along[0]):
        shift = g.position - ordered[0].position - distance * normal
        if np.linalg.norm(shift) > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * spacing):
            raise ValueError(
                f"DICOM series in {folder} has slices shifted within their plane: {Path(g.file).name} lies "
                f"{np.linalg.norm(shift):.3f} mm off the stack's axis (a tilted gantry?); resample the series onto a "
                "stack perpendicular to its slices first"
            )
