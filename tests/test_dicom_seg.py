"""DICOM in, DICOM out: a mask of a DICOM series written as a DICOM-SEG lands on the series' own pixels.

Every check reads the SEG back with pydicom alone (not the writer's library) and places each frame by its own
referenced source slice, against values recomputed from the source files' pixel data or from the NIfTI output of
the same run.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.errors import format_error
from monai_sdfsmis.transforms import load_volume
from monai_sdfsmis.transforms.dicom_seg import write_dicom_seg
from tests.utils import REPO_ROOT, requires_totalseg, totalseg_dir

pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

BONE_HU = 300


def _sources(folder: Path) -> dict[str, object]:
    """The series' slices by SOP Instance UID (from the file meta: the example series is anonymised), with pixels."""
    datasets = [pydicom.dcmread(str(f)) for f in sorted(folder.iterdir())]
    return {str(ds.file_meta.MediaStorageSOPInstanceUID): ds for ds in datasets}


def _frames_by_source(seg_path: Path) -> dict[str, np.ndarray]:
    """Each SEG frame, keyed by the SOPInstanceUID of the source slice it was derived from."""
    seg = pydicom.dcmread(str(seg_path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    pixels = np.asarray(seg.pixel_array).reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    frames = {}
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames[str(source)] = pixels[i].astype(bool)
    return frames


@requires_totalseg
def test_a_bone_mask_written_as_dicom_seg_covers_the_bone_of_each_source_slice(tmp_path, capsys):
    """The mask is the CT's own bone (HU > 300) on the loaded RAS volume: each frame must equal the threshold of its
    source slice's pixel data, so any flip, transpose or slice mix-up shows (the body is not symmetric to the pixel)."""
    folder = totalseg_dir() / "ct_dicom"
    image = load_volume(folder, dtype=None)  # RAS, reoriented from the series' LPS files
    mask = (image[0].numpy() > BONE_HU).astype(np.uint8)
    out = write_dicom_seg(mask, image.affine.numpy(), folder, tmp_path / "ct_dicom_seg.dcm", segment_label="bone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_dicom_seg.dcm"]  # no temporary left

    frames, sources = _frames_by_source(out), _sources(folder)
    assert frames and set(frames) <= set(sources)
    for uid, ds in sources.items():
        bone = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) > BONE_HU
        if uid in frames:
            np.testing.assert_array_equal(frames[uid], bone, err_msg=f"frame of slice {uid}")
        else:  # frames without foreground are left out of the SEG
            assert not bone.any(), f"slice {uid} has bone but no frame"
    seg = pydicom.dcmread(str(out))
    assert seg.SegmentSequence[0].SegmentLabel == "bone"
    # This series is anonymised: no Study or Series Instance UID. The SEG gets generated ones, and says so.
    first = next(iter(sources.values()))
    assert not first.StudyInstanceUID and not first.SeriesInstanceUID
    assert seg.StudyInstanceUID and seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert "has no StudyInstanceUID or SeriesInstanceUID (anonymised?)" in capsys.readouterr().err


@requires_totalseg
def test_a_mask_off_the_series_grid_is_refused(tmp_path):
    folder = totalseg_dir() / "ct_dicom"
    image = load_volume(folder, dtype=None)
    shifted = image.affine.numpy().copy()
    shifted[:3, 3] += 0.4  # 0.4 mm: under a voxel, but the pixels no longer fall on the mask's voxel centres
    with pytest.raises(ValueError, match="is not on the grid of DICOM slice"):
        write_dicom_seg(np.ones(image.shape[1:], np.uint8), shifted, folder, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


def _infer(out: Path, query: Path, **overrides) -> None:
    from monai.bundle import run

    bundle = REPO_ROOT / "bundles" / "sd_fsmis"
    data = totalseg_dir()
    run(
        config_file=str(bundle / "configs" / "inference.json"), logging_file=False, bundle_root=str(bundle),
        output_dir=str(out), network_def={"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"},
        load_checkpoint=False, query_image=str(query), support_image=str(data / "example_ct_sm.nii.gz"),
        support_label=str(data / "example_seg.nii.gz"), organ_id=5, spatial_size=128, progress=False, **overrides,
    )


def _nifti_value_at_frames(nifti: Path, sources: dict[str, object]) -> dict[str, np.ndarray]:
    """The NIfTI mask sampled at every pixel of every source slice, by the DICOM pixel -> patient formula."""
    img = nib.load(str(nifti))
    data, inverse = np.asarray(img.dataobj), np.linalg.inv(img.affine)
    values = {}
    for uid, ds in sources.items():
        x, y = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = np.asarray(ds.ImagePositionPatient, float) + c[..., None] * dc * x + r[..., None] * dr * y
        ijk = np.rint((lps * [-1, -1, 1]) @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        values[uid] = data[ijk[..., 0], ijk[..., 1], ijk[..., 2]] > 0
    return values


@requires_totalseg
def test_infer_writes_the_same_mask_as_dicom_seg_and_as_nifti(tmp_path):
    """The bundle's inference (the support-mask copy as network) on a DICOM series query, once per format."""
    folder = totalseg_dir() / "ct_dicom"
    _infer(tmp_path / "nifti", folder)
    _infer(tmp_path / "seg", folder, output_format="dicom_seg")
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["ct_dicom_seg.dcm"]
    sources = _sources(folder)
    expected = _nifti_value_at_frames(tmp_path / "nifti" / "ct_dicom_seg.nii.gz", sources)
    frames = _frames_by_source(tmp_path / "seg" / "ct_dicom_seg.dcm")
    assert sum(int(v.sum()) for v in expected.values()) > 0
    for uid, values in expected.items():
        np.testing.assert_array_equal(frames.get(uid, np.zeros_like(values)), values, err_msg=f"slice {uid}")
    seg = pydicom.dcmread(str(tmp_path / "seg" / "ct_dicom_seg.dcm"))
    assert seg.SegmentSequence[0].SegmentLabel == "organ 5"


@requires_totalseg
def test_dicom_seg_of_a_nifti_query_or_into_the_series_folder_is_one_line_before_inference(tmp_path):
    for query, out, expected in (
        (totalseg_dir() / "example_ct_sm.nii.gz", tmp_path / "out",
         "writes masks of DICOM series, but the query"),
        (totalseg_dir() / "ct_dicom", totalseg_dir() / "ct_dicom", "refusing to write a DICOM-SEG into the series folder"),
    ):
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        with pytest.raises(Exception) as info:
            _infer(out, query, output_format="dicom_seg")
        line = format_error(info.value)
        assert line is not None and "\n" not in line and expected in line, line
        assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else []) == before
