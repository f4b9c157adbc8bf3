from __future__ import annotations

import re

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from monai_sdfsmis.transforms import (
    CheckLabelIdsd,
    LoadVolumed,
    ScaleToUnitRanged,
    check_label_ids,
    load_volume,
    select_reader,
)
from monai_sdfsmis.transforms.io import label_map_dtype, list_dicom_series
from tests.utils import chaos_dir, requires_chaos, requires_totalseg, totalseg_dir

CHAOS_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def _save_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@requires_chaos
def test_all_chaos_volumes_load_with_consistent_geometry():
    loader = LoadVolumed(["image", "label"], grid_key="image")
    scale = ScaleToUnitRanged("image", preset="minmax")
    for n in CHAOS_IDS:
        d = loader({"image": chaos_dir() / f"image_{n}.nii.gz", "label": chaos_dir() / f"label_{n}.nii.gz"})
        image, label = d["image"], d["label"]
        assert image.shape[:3] == (1, 256, 256) and 31 <= image.shape[3] <= 46, (n, image.shape)
        assert image.dtype == torch.float32 and label.dtype == torch.int32
        assert image.shape == label.shape
        np.testing.assert_allclose(_spacing(image.affine), (1.25, 1.25, 7.7), atol=1e-4)
        np.testing.assert_allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-6)
        assert nib.aff2axcodes(np.asarray(image.affine)) == ("R", "A", "S")
        ids = set(check_label_ids(label, (1,)))
        assert 0 in ids and ids <= {0, 1, 2, 3, 4} and len(ids) > 1, (n, ids)
        scaled = scale(d)["image"]
        assert float(scaled.min()) == -1.0 and float(scaled.max()) == 1.0


@requires_chaos
def test_ras_reorientation_flips_the_stored_las_axis_and_matches_itk():
    path = chaos_dir() / "image_1.nii.gz"
    raw = nib.load(str(path))
    assert nib.aff2axcodes(raw.affine) == ("L", "A", "S")
    vol = load_volume(path)
    np.testing.assert_array_equal(vol[0].numpy(), np.asarray(raw.dataobj, dtype=np.float32)[::-1])
    # Voxel (i, j, k) in the output sits at the same world position as the stored voxel it came from.
    i, j, k = 10, 20, 5
    stored = raw.affine @ np.array([raw.shape[0] - 1 - i, j, k, 1.0])
    np.testing.assert_allclose(np.asarray(vol.affine) @ np.array([i, j, k, 1.0]), stored, atol=1e-4)
    via_itk = load_volume(path, reader="ITKReader")
    np.testing.assert_array_equal(via_itk.numpy(), vol.numpy())
    np.testing.assert_allclose(np.asarray(via_itk.affine), np.asarray(vol.affine), atol=1e-4)
    no_reorient = load_volume(path, orientation=None)
    np.testing.assert_allclose(np.asarray(no_reorient.affine), raw.affine, atol=1e-4)


@requires_totalseg
def test_dicom_series_folder_loads_as_3d_hu_volume():
    folder = totalseg_dir() / "ct_dicom"
    vol = load_volume(folder)
    assert vol.shape == (1, 512, 512, 20) and vol.dtype == torch.float32
    assert nib.aff2axcodes(np.asarray(vol.affine)) == ("R", "A", "S")
    np.testing.assert_allclose(_spacing(vol.affine), (0.9766, 0.9766, 2.0), atol=1e-3)
    assert -1100 <= float(vol.min()) <= -900  # air, rescale slope/intercept applied
    assert 300 <= float(vol.max()) <= 4000  # bone/contrast
    assert 0.05 < float((vol > -500).float().mean()) < 0.8  # a body in air, not a blank or saturated series
    assert vol.meta["filename_or_obj"] == str(folder)


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
def test_nrrd_roundtrip_keeps_spacing_and_world_positions(tmp_path, suffix):
    data = np.zeros((20, 30, 10), np.float32)
    data[2, 3, 4] = 100.0
    spacing, origin_lps = np.array([0.8, 0.9, 2.5]), np.array([10.0, 20.0, 30.0])
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag(spacing),
        "space origin": origin_lps,
    }
    path = tmp_path / f"vol{suffix}"
    nrrd.write(str(path), data, header)
    vol = load_volume(path)
    assert vol.shape == (1, 20, 30, 10)
    np.testing.assert_allclose(_spacing(vol.affine), spacing, atol=1e-5)
    assert nib.aff2axcodes(np.asarray(vol.affine)) == ("R", "A", "S")
    marked_lps = origin_lps + spacing * np.array([2, 3, 4])
    marked_ras = marked_lps * np.array([-1, -1, 1])
    idx = np.unravel_index(int(torch.argmax(vol)), vol.shape[1:])
    np.testing.assert_allclose((np.asarray(vol.affine) @ np.array([*idx, 1.0]))[:3], marked_ras, atol=1e-4)
    # The same geometry written as NIfTI (RAS affine) loads to the same tensor.
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.vstack([np.c_[np.diag(spacing), origin_lps], [0, 0, 0, 1]])
    as_nifti = load_volume(_save_nifti(tmp_path / "vol.nii.gz", data, affine_ras))
    np.testing.assert_array_equal(as_nifti.numpy(), vol.numpy())
    np.testing.assert_allclose(np.asarray(as_nifti.affine), np.asarray(vol.affine), atol=1e-4)


def test_reader_selection(tmp_path):
    assert type(select_reader(tmp_path / "a.nii.gz")).__name__ == "NibabelReader"
    assert type(select_reader(tmp_path / "a.NII")).__name__ == "NibabelReader"
    assert type(select_reader(tmp_path / "a.nrrd")).__name__ == "ITKReader"
    assert type(select_reader(tmp_path)).__name__ == "ITKReader"
    assert type(select_reader(tmp_path / "a.nii.gz", "itkreader")).__name__ == "ITKReader"
    with pytest.raises(ValueError, match="unknown reader 'FooReader'"):
        select_reader(tmp_path / "a.nii.gz", "FooReader")


def test_load_volumed_dtypes_and_label_keys(tmp_path):
    img = _save_nifti(tmp_path / "img.nii.gz", np.random.rand(8, 9, 5).astype(np.float32))
    lab = _save_nifti(tmp_path / "lab.nii.gz", np.ones((8, 9, 5), np.float64))  # float-stored integer ids
    d = LoadVolumed(["image", "support_label"], grid_key="image")({"image": img, "support_label": lab})
    assert d["image"].dtype == torch.float32 and d["support_label"].dtype == torch.int32
    d = LoadVolumed(["image", "support_label"], label_keys=())({"image": img, "support_label": lab})
    assert d["support_label"].dtype == torch.float32
    d = LoadVolumed(["image", "lab"], label_keys="lab", label_dtype=np.uint8)({"image": img, "lab": lab})
    assert d["lab"].dtype == torch.uint8
    with pytest.raises(ValueError, match="label_dtype must be an integer dtype"):
        LoadVolumed("label", label_dtype=np.float32)
    with pytest.raises(ValueError, match="grid_key 'x' is not one of keys"):
        LoadVolumed("label", grid_key="x")


# ---------------------------------------------------------------- bad inputs


def test_missing_file_and_folder(tmp_path):
    for missing in (tmp_path / "nope.nii.gz", tmp_path / "no_folder"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + " does not exist"):
            load_volume(missing)
    with pytest.raises(FileNotFoundError, match="nope.nii.gz does not exist"):
        LoadVolumed("image")({"image": tmp_path / "nope.nii.gz"})


def test_corrupt_files(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match=rf"cannot read file {re.escape(str(bad))} with NibabelReader"):
        load_volume(bad)
    truncated = tmp_path / "t.nrrd"
    truncated.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 5 5 5\nencoding: raw\n\n" + bytes(10))
    with pytest.raises(ValueError, match=rf"cannot read file {re.escape(str(truncated))} with ITKReader"):
        load_volume(truncated)


def test_2d_and_single_slice_images_rejected(tmp_path):
    flat = _save_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 12), np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{flat} holds 2D data (spatial shape (10, 12))")):
        load_volume(flat)
    assert load_volume(flat, require_3d=False).shape == (1, 10, 12)
    one = _save_nifti(tmp_path / "one.nii.gz", np.zeros((10, 12, 1), np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{one} holds 2D data (spatial shape (10, 12, 1))")):
        load_volume(one)


def test_multichannel_rejected(tmp_path):
    four = _save_nifti(tmp_path / "four.nii.gz", np.zeros((10, 12, 5, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{four} holds 3 channels or time points")):
        load_volume(four)


def test_nan_and_inf_rejected(tmp_path):
    data = np.random.rand(6, 7, 8).astype(np.float32)
    data[0, 0, :3] = np.nan
    nan_file = _save_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ValueError, match=re.escape(f"{nan_file} contains 3 NaN voxels")):
        load_volume(nan_file)
    data = np.random.rand(6, 7, 8).astype(np.float32)
    data[1, 1, :2] = np.inf
    inf_file = _save_nifti(tmp_path / "inf.nii.gz", data)
    with pytest.raises(ValueError, match=re.escape(f"{inf_file} contains 2 infinite voxels")):
        load_volume(inf_file)


def test_complex_and_overflowing_volumes_are_refused_by_name(tmp_path):
    data = (np.random.rand(6, 7, 8) + 1j * np.random.rand(6, 7, 8)).astype(np.complex64)
    complex_file = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(complex_file))
    with pytest.raises(ValueError, match=re.escape(f"{complex_file} holds complex values")):
        load_volume(complex_file)
    huge = np.full((6, 7, 8), 3e38, np.float32)
    huge[0] = -3e38  # finite, but max - min overflows float32
    huge_file = _save_nifti(tmp_path / "huge.nii.gz", huge)
    with pytest.raises(ValueError, match=re.escape(f"{huge_file} holds finite values too large for float32 arithmetic")):
        load_volume(huge_file)
    fine = np.full((6, 7, 8), 3e38, np.float32)  # large but with a finite range: accepted
    fine[0] = 1e38
    assert load_volume(_save_nifti(tmp_path / "fine.nii.gz", fine)).shape == (1, 6, 7, 8)


@pytest.mark.parametrize("how", ["zero slice spacing", "collapsed axes"])
def test_a_degenerate_voxel_grid_is_refused_by_name(tmp_path, how):
    data = np.random.rand(6, 7, 8).astype(np.float32)
    path = tmp_path / "degenerate.nii.gz"
    if how == "zero slice spacing":  # the header's pixdim says 0 mm between slices (no sform)
        image = nib.Nifti1Image(data, None)
        image.header.set_zooms((1.25, 1.25, 0.0))
    else:  # an sform whose second and third axes point the same way
        affine = np.eye(4)
        affine[:3, 2] = affine[:3, 1]
        image = nib.Nifti1Image(data, affine)
        image.header.set_qform(None, code=0)
    nib.save(image, str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path} has a degenerate voxel grid")):
        load_volume(path)


def test_non_integer_label_rejected(tmp_path):
    soft = _save_nifti(tmp_path / "soft.nii.gz", np.full((6, 7, 8), 0.3, np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{soft} contains non-integer values (e.g. 0.3)")):
        load_volume(soft, dtype=np.int32)


def test_dicom_folder_without_series(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"folder {re.escape(str(empty))} contains no DICOM series"):
        load_volume(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a dicom file")
    with pytest.raises(ValueError, match=rf"folder {re.escape(str(junk))} contains no DICOM series"):
        load_volume(junk)


def test_empty_label_and_absent_ids(tmp_path):
    empty = _save_nifti(tmp_path / "empty_label.nii.gz", np.zeros((6, 7, 8), np.uint8))
    label = load_volume(empty, dtype=np.int32)
    with pytest.raises(ValueError, match=re.escape(f"label file {empty} contains no foreground")):
        check_label_ids(label)
    with pytest.raises(ValueError, match=re.escape(f"label file {empty} contains no foreground")):
        CheckLabelIdsd("label")({"label": label})

    data = np.zeros((6, 7, 8), np.uint8)
    data[1, 1, 1], data[2, 2, 2] = 1, 3
    path = _save_nifti(tmp_path / "lab.nii.gz", data)
    d = LoadVolumed("label")({"label": path})
    assert check_label_ids(d["label"], (1, 3)) == [0, 1, 3]
    with pytest.raises(ValueError, match=re.escape(f"organ id 4 absent from {path}; present ids: [0, 1, 3]")):
        CheckLabelIdsd("label", required_ids=(1, 4))(d)
    with pytest.raises(ValueError, match=re.escape(f"organ ids [2, 4] absent from {path}")):
        check_label_ids(d["label"], (2, 4))
    with pytest.raises(ValueError, match=re.escape("organ id 2 absent from mine.nii.gz")):
        check_label_ids(np.asarray(data), (2,), path="mine.nii.gz")


@requires_chaos
def test_real_label_missing_organ_message():
    path = chaos_dir() / "label_1.nii.gz"
    with pytest.raises(ValueError, match=re.escape(f"organ id 5 absent from {path}; present ids: [0, 1, 2, 3, 4]")):
        check_label_ids(load_volume(path, dtype=np.int32), (1, 5))


def test_grid_mismatch_names_both_files(tmp_path):
    img = _save_nifti(tmp_path / "img.nii.gz", np.zeros((6, 7, 8), np.float32))
    lab = _save_nifti(tmp_path / "lab.nii.gz", np.ones((6, 7, 9), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"{lab} has spatial shape (6, 7, 9) but {img} has (6, 7, 8)")):
        LoadVolumed(["image", "label"], grid_key="image")({"image": img, "label": lab})
    shifted = _save_nifti(tmp_path / "shifted.nii.gz", np.ones((6, 7, 8), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=re.escape(f"{shifted} and {img} have different affines")):
        LoadVolumed(["image", "label"], grid_key="image")({"image": img, "label": shifted})


@pytest.mark.parametrize("organ_id", [0, -2])
def test_check_label_ids_refuses_background_and_negative_ids(organ_id):
    label = np.zeros((4, 4, 3), dtype=np.int32)
    label[1:3, 1:3, 1] = 1
    with pytest.raises(ValueError, match=re.escape(f"organ id {organ_id} is not valid for mine.nii.gz")):
        check_label_ids(label, (organ_id,), path="mine.nii.gz")


def _grid_case(tmp_path, label_affine, label_shape=(6, 5, 4)):
    from monai_sdfsmis.transforms.io import LoadVolumed

    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    image = _save_nifti(tmp_path / "image.nii.gz", np.random.default_rng(0).random((6, 5, 4)).astype(np.float32), affine)
    label = np.zeros(label_shape, dtype=np.uint8)
    label[1:3, 1:3, 1:3] = 1
    label = _save_nifti(tmp_path / "other_label.nii.gz", label, label_affine)
    load = LoadVolumed(["support_image", "support_label"], same_grid={"support_label": "support_image"})
    return load, {"support_image": str(image), "support_label": str(label)}


def test_same_grid_refuses_a_label_of_another_grid_and_names_both_files(tmp_path):
    shifted = np.diag([2.0, 2.0, 5.0, 1.0])
    shifted[0, 3] = 51.0
    load, data = _grid_case(tmp_path, shifted)
    with pytest.raises(ValueError, match="different voxel grids") as info:
        load(data)
    assert "other_label.nii.gz" in str(info.value) and "image.nii.gz" in str(info.value)
    load, data = _grid_case(tmp_path, np.diag([2.0, 2.0, 5.0, 1.0]), label_shape=(6, 5, 3))
    with pytest.raises(ValueError, match="spatial shape") as info:
        load(data)
    assert "other_label.nii.gz" in str(info.value) and "image.nii.gz" in str(info.value)


def test_same_grid_tolerates_a_rounding_difference(tmp_path):
    nearly = np.diag([2.0, 2.0, 5.0, 1.0])
    nearly[0, 3] = 1e-4  # well below 1e-3 of the 2 mm voxel
    load, data = _grid_case(tmp_path, nearly)
    assert load(data)["support_label"].shape == (1, 6, 5, 4)


# LAS voxel axes in DICOM's LPS patient coordinates: columns run to the patient's left (+x), rows to the anterior
# (-y), slices to the superior (+z); CHAOS stores its NIfTI files in this orientation.
LAS_ORIENTATION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def write_dicom_series(folder, volume, series_uid, description, spacing=(1.5, 1.25, 4.0), origin=(-20.0, 30.0, 5.0),
                       orientation=LAS_ORIENTATION, first_file=0, offsets=None, file_numbers=None, positions=None,
                       orientations=None):
    """Write ``volume`` ``[rows, columns, slices]`` (int16) as one MR series of real DICOM files in ``folder``.

    Pixel ``(r, c)`` of slice ``k`` lies at ``origin + c * spacing[1] * row_dir + r * spacing[0] * col_dir +
    k * spacing[2] * normal`` millimetres (LPS), as DICOM's ImagePositionPatient/ImageOrientationPatient define it.
    ``offsets[k]`` (mm along the normal) replaces ``k * spacing[2]``, ``positions[k]`` the whole position and
    ``orientations[k]`` the orientation of slice ``k``; slice ``k`` is written to ``IM<file_numbers[k]>.dcm``
    (default ``first_file + k``), so that file-name order need not be slice order.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        number = first_file + k if file_numbers is None else file_numbers[k]
        path = folder / f"IM{number:05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "TEST01", "Test^Patient"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.99.1", series_uid, "1.2.3"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, k + 1
        offset = k * spacing[2] if offsets is None else offsets[k]
        position = np.asarray(origin) + offset * normal if positions is None else np.asarray(positions[k])
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (orientation if orientations is None else orientations[k])]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = volume.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].astype("<i2")).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return folder


def two_series_folder(folder, rng=None):
    """A folder holding two series of one patient: 8 slices (``"T2 SPIR"``) and 5 slices (``"T1 in-phase"``)."""
    rng = np.random.default_rng(0) if rng is None else rng
    first = rng.integers(0, 1000, size=(12, 10, 8)).astype(np.int16)
    second = rng.integers(0, 1000, size=(12, 10, 5)).astype(np.int16)
    write_dicom_series(folder, first, "1.2.826.0.1.3680043.99.1.1", "T2 SPIR")
    write_dicom_series(folder, second, "1.2.826.0.1.3680043.99.1.2", "T1 in-phase", first_file=100)
    return folder, first, second


def test_a_folder_of_two_dicom_series_is_refused_naming_each(tmp_path):
    folder, _, _ = two_series_folder(tmp_path / "dicom")
    listed = list_dicom_series(folder)
    assert sorted((s.uid, s.description, len(s.files)) for s in listed) == [
        ("1.2.826.0.1.3680043.99.1.1", "T2 SPIR", 8), ("1.2.826.0.1.3680043.99.1.2", "T1 in-phase", 5)
    ]
    with pytest.raises(ValueError) as info:
        load_volume(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message and "2 DICOM series" in message and "series_uid" in message
    assert "1.2.826.0.1.3680043.99.1.1 (T2 SPIR, 8 slices)" in message
    assert "1.2.826.0.1.3680043.99.1.2 (T1 in-phase, 5 slices)" in message
    with pytest.raises(ValueError, match=r"series_uid 9\.9 is not in folder .*T2 SPIR"):
        load_volume(folder, series_uid="9.9")


def _dicom_value_at(shape, affine, spacing=(1.5, 1.25, 4.0), origin=(-20.0, 30.0, 5.0),
                    orientation=LAS_ORIENTATION):
    """DICOM (row, column, slice) of every voxel of a loaded volume of spatial ``shape``, through world coordinates."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ras = index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0]) - np.asarray(origin)
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    c, r, k = lps @ row_dir / spacing[1], lps @ col_dir / spacing[0], lps @ normal / spacing[2]
    for v in (c, r, k):
        np.testing.assert_allclose(v, np.round(v), atol=1e-3)  # voxel centres land on DICOM pixel centres
    return np.round(r).astype(int), np.round(c).astype(int), np.round(k).astype(int)


@pytest.mark.parametrize("series, which", [("1.2.826.0.1.3680043.99.1.1", 0), ("1.2.826.0.1.3680043.99.1.2", 1)])
def test_series_uid_reads_the_chosen_series_with_its_geometry(tmp_path, series, which):
    folder, first, second = two_series_folder(tmp_path / "dicom")
    expected = (first, second)[which]
    image = load_volume(folder, series_uid=series, dtype=None)
    assert tuple(image.shape) == (1, 10, 12, expected.shape[2])  # RAS: x runs along the DICOM columns
    r, c, k = _dicom_value_at(image.shape[1:], image.affine)
    np.testing.assert_array_equal(image[0].numpy().reshape(-1), expected[r, c, k])
    # The same through the dictionary transform, keyed by the image key.
    d = LoadVolumed("image", dtype=None, series_uid={"image": series})({"image": folder})
    assert torch.equal(d["image"].as_tensor(), image.as_tensor())


def test_a_single_dicom_series_needs_no_uid(tmp_path):
    volume = np.random.default_rng(1).integers(0, 500, size=(12, 10, 6)).astype(np.int16)
    folder = write_dicom_series(tmp_path / "one", volume, "1.2.826.0.1.3680043.99.2", "only")
    image = load_volume(folder, dtype=None)
    r, c, k = _dicom_value_at(image.shape[1:], image.affine)
    np.testing.assert_array_equal(image[0].numpy().reshape(-1), volume[r, c, k])


def test_dicom_slices_land_where_acquired_whatever_the_file_names(tmp_path):
    """File-name order opposite to, then shuffled against, slice order: every voxel still reads its own slice."""
    volume = np.random.default_rng(2).integers(0, 500, size=(12, 10, 7)).astype(np.int16)
    for name, numbers in (("reversed", [6, 5, 4, 3, 2, 1, 0]), ("shuffled", [3, 0, 6, 1, 5, 2, 4])):
        folder = write_dicom_series(tmp_path / name, volume, "1.2.826.0.1.3680043.99.3", name, file_numbers=numbers)
        image = load_volume(folder, dtype=None)
        r, c, k = _dicom_value_at(image.shape[1:], image.affine)
        np.testing.assert_array_equal(image[0].numpy().reshape(-1), volume[r, c, k])


def _refused_series(tmp_path, **geometry):
    volume = np.random.default_rng(3).integers(0, 500, size=(12, 10, 6)).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", volume, "1.2.826.0.1.3680043.99.4", "broken",
                                file_numbers=[5, 0, 4, 1, 3, 2], **geometry)
    with pytest.raises(ValueError) as info:
        load_volume(folder)
    message = str(info.value)
    assert "\n" not in message and f"DICOM series in {folder}" in message
    return message


def test_dicom_series_with_two_slices_at_one_position_is_refused(tmp_path):
    # slices 2 and 3 (files IM00004, IM00001) both at 8 mm: ITK would stack them by file name on a false grid
    message = _refused_series(tmp_path, offsets=[0.0, 4.0, 8.0, 8.0, 12.0, 16.0])
    assert "two slices at one position (3.000 mm along the slice normal)" in message
    assert {"IM00004.dcm", "IM00001.dcm"} <= set(re.findall(r"IM\d+\.dcm", message))


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    message = _refused_series(tmp_path, offsets=[0.0, 4.0, 8.0, 16.0, 20.0, 24.0])
    assert "not evenly spaced: 8.000 mm from IM00004.dcm to IM00001.dcm, 4.000 mm between the other slices" in message
    assert "1 slice(s) missing?" in message


def test_dicom_series_with_mixed_orientations_is_refused(tmp_path):
    tilted = (1.0, 0.0, 0.0, 0.0, -0.98, 0.198997)
    message = _refused_series(tmp_path, orientations=[LAS_ORIENTATION] * 3 + [tilted] + [LAS_ORIENTATION] * 2)
    assert "mixes slice orientations: IM00001.dcm has" in message


def test_dicom_series_shifted_within_the_slice_plane_is_refused(tmp_path):
    # a tilted gantry: each slice 0.7 mm further along the column direction (-y LPS), 4 mm along the normal
    origin, normal, column = np.array([-20.0, 30.0, 5.0]), np.array([0.0, 0.0, -1.0]), np.array([0.0, -1.0, 0.0])
    message = _refused_series(tmp_path, positions=[origin + k * (4.0 * normal + 0.7 * column) for k in range(6)])
    assert "slices shifted within their plane" in message and "tilted gantry" in message


@requires_chaos
def test_saving_back_to_the_las_file_orientation_is_exact_and_needs_no_resampling(tmp_path, monkeypatch):
    """A CHAOS label (stored LAS) loaded in RAS and saved with ``resample=True`` is the file's array, voxel for voxel."""
    import monai.data.image_writer as image_writer

    from monai_sdfsmis.transforms.io import SaveVolumed

    calls = []
    resample = image_writer.SpatialResample.__call__
    monkeypatch.setattr(image_writer.SpatialResample, "__call__", lambda *a, **k: calls.append(1) or resample(*a, **k))
    source = chaos_dir() / "label_2.nii.gz"
    d = LoadVolumed("label")({"label": source})
    assert not np.allclose(d["label"].affine.numpy(), nib.load(str(source)).affine)  # really reoriented
    saver = SaveVolumed("label", output_dir=tmp_path, output_postfix="seg", output_dtype=np.uint8, resample=True,
                        mode="nearest", separate_folder=False, print_log=False)
    saver(d)
    written, original = nib.load(str(tmp_path / "label_2_seg.nii.gz")), nib.load(str(source))
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj).astype(np.uint8))
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    assert not calls, "an orientation-only difference must be undone without SpatialResample"


def test_axis_reorientation_recognises_only_permutations_and_flips():
    from monai_sdfsmis.transforms.io import axis_reorientation

    las = np.diag([-1.25, 1.25, 7.7, 1.0])
    las[:3, 3] = (160.0, -150.0, 10.0)
    shape = (4, 5, 3)
    # RAS copy of the LAS grid: x flipped, so index i of the file is 3 - i of the array.
    ras = las.copy()
    ras[0, 0], ras[0, 3] = 1.25, 160.0 - 1.25 * (shape[0] - 1)
    axes, flips = axis_reorientation(ras, las, shape, shape)
    array = np.arange(np.prod(shape)).reshape(shape)
    file_view = np.flip(np.transpose(array, axes), flips)
    world = lambda affine, idx: affine[:3, :3] @ np.asarray(idx, dtype=float) + affine[:3, 3]  # noqa: E731
    for idx in np.ndindex(*shape):  # the voxel of the file view at idx is the array voxel at the same world point
        src = np.linalg.solve(ras[:3, :3], world(las, idx) - ras[:3, 3])
        assert file_view[idx] == array[tuple(np.round(src).astype(int))]
    shifted = las.copy()
    shifted[0, 3] += 0.5  # half a voxel: needs interpolation
    assert axis_reorientation(ras, shifted, shape, shape) is None
    assert axis_reorientation(ras, np.diag([2.5, 1.25, 7.7, 1.0]), shape, shape) is None
    assert axis_reorientation(ras, las, shape, (4, 5, 4)) is None


# Peak RSS of bundle inference on the 1000-slice query below, measured 2026-12-01 (benchmarks/RESULTS.md, "Memory"):
# 1780 MB with the transposes and flips, 5205 MB with MONAI's resampling back to the file's orientation.
PEAK_RSS_BOUND_MB = 2600
_PEAK_RSS_RUNNER = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print(f'PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}',"
    " file=sys.stderr))\n"
    "sys.argv = ['monai.bundle', *sys.argv[1:]]\n"
    "runpy.run_module('monai.bundle', run_name='__main__')\n"
)


@requires_chaos
def test_a_1000_slice_query_is_segmented_in_bounded_memory(tmp_path):
    """Bundle inference (tiny network, 64x64 slices) on a 256x256x1000 LAS query: peak RSS below the bound."""
    import os
    import subprocess
    import sys

    from tests.utils import REPO_ROOT

    source = nib.load(str(chaos_dir() / "image_3.nii.gz"))
    array = np.asarray(source.dataobj)
    query = tmp_path / "query_1000.nii"
    tiled = np.tile(array, (1, 1, -(-1000 // array.shape[2])))[:, :, :1000].astype(np.int16)
    nib.save(nib.Nifti1Image(tiled, source.affine), str(query))
    del tiled
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SDFSMIS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args = {
        "network_type": "tiny", "load_checkpoint": "False", "query_image": str(query),
        "support_image": str(chaos_dir() / "image_3.nii.gz"), "support_label": str(chaos_dir() / "label_3.nii.gz"),
        "organ_id": "1", "spatial_size": "64", "progress": "False", "output_dir": str(tmp_path / "out"),
    }
    command = [sys.executable, "-c", _PEAK_RSS_RUNNER, "run", "--config_file", "configs/inference.json"]
    command += [item for key, value in args.items() for item in (f"--{key}", value)]
    proc = subprocess.run(command, cwd=REPO_ROOT / "bundles" / "sd_fsmis", env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(re.search(r"PEAK_RSS_MB (\d+)", proc.stderr).group(1))
    print(f"peak RSS {peak} MB")
    written = nib.load(str(tmp_path / "out" / "query_1000_seg.nii.gz"))
    assert written.shape == (256, 256, 1000)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert peak < PEAK_RSS_BOUND_MB, f"peak RSS {peak} MB exceeds {PEAK_RSS_BOUND_MB} MB"


_FULL_DISK_SCRIPT = """
import resource, sys
import numpy as np, torch
from monai.data import MetaTensor
from monai_sdfsmis.transforms import SaveVolumed

resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a 'disk' that takes 4 KiB per file
mask = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (1, 64, 64, 16)).astype(np.uint8))
image = MetaTensor(mask, affine=torch.diag(torch.tensor([-1.25, 1.25, 7.7, 1.0])), meta={"filename_or_obj": "q.nii.gz"})
saver = SaveVolumed("pred", output_dir=sys.argv[1], output_postfix="seg", output_ext=sys.argv[2],
                    separate_folder=False, output_dtype=np.uint8, resample=False, print_log=False)
try:
    saver({"pred": image})
except OSError as error:
    print("OSError:", error)
    sys.exit(3)
"""


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_a_mask_that_does_not_fit_on_the_disk_is_never_published(tmp_path, ext):
    """Python ignores SIGXFSZ, so a file-size limit makes writes fail as a full disk does: nibabel raises, MONAI
    falls back to its ITK writer, which ignores the short write; the file must not appear under its final name."""
    import subprocess
    import sys

    from tests.utils import REPO_ROOT

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(out), ext], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    message = proc.stdout.strip().splitlines()[-1]
    assert message.startswith(f"OSError: could not write {out / ('q_seg' + ext)}: ") and "disk full" in message, message
    assert "\n" not in message
    assert list(out.iterdir()) == []  # neither a truncated file under the final name nor a temporary left behind


def test_a_save_removes_what_a_killed_save_of_the_same_file_left(tmp_path):
    from monai.data import MetaTensor

    from monai_sdfsmis.transforms import SaveVolumed

    killed = tmp_path / ".q_seg.nii.gz.k3_x9ab.nii.gz"  # atomic_path's temporary name of q_seg.nii.gz
    other = tmp_path / ".p_seg.nii.gz.k3_x9ab.nii.gz"  # another output's: maybe another run writing now
    for leftover in (killed, other):
        leftover.write_bytes(b"\x1f\x8b truncated")
    mask = torch.zeros(1, 8, 8, 4, dtype=torch.uint8)
    mask[0, 2:5, 2:5, 1:3] = 1
    image = MetaTensor(mask, affine=torch.eye(4), meta={"filename_or_obj": str(tmp_path / "q.nii.gz")})
    SaveVolumed("pred", output_dir=tmp_path, output_postfix="seg", separate_folder=False, output_dtype=np.uint8,
                resample=False, print_log=False)({"pred": image})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p_seg.nii.gz.k3_x9ab.nii.gz", "q_seg.nii.gz"]
    assert np.asarray(nib.load(str(tmp_path / "q_seg.nii.gz")).dataobj).sum() == 18


def test_label_map_dtype_keeps_every_id_and_refuses_one_that_would_wrap():
    assert label_map_dtype(1) is np.uint8 and label_map_dtype(255) is np.uint8
    assert label_map_dtype(256) is np.uint16 and label_map_dtype(65535) is np.uint16
    for largest in (255, 256, 1000, 65535):
        assert np.asarray([largest]).astype(label_map_dtype(largest))[0] == largest
    with pytest.raises(ValueError, match="label id 65536 does not fit a uint16 label map"):
        label_map_dtype(65536)
