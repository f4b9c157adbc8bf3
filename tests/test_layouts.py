"""Dataset layouts (ALPNet folder, MONAI datalist) and the VolumeStore that loads them."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.data import VolumeRecord, VolumeStore, find_alpnet_volumes, load_datalist
from tests.utils import chaos_dir, requires_chaos

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37", "38", "39"]


def _touch_layout(root: Path, numbers, labels=True, supervoxels=True) -> None:
    """An ALPNet folder of empty files: find_alpnet_volumes only looks at names."""
    root.mkdir(parents=True, exist_ok=True)
    if supervoxels:
        (root / "supervoxels_5000").mkdir(exist_ok=True)
    for n in numbers:
        (root / f"image_{n}.nii.gz").touch()
        if labels:
            (root / f"label_{n}.nii.gz").touch()
        if supervoxels:
            (root / "supervoxels_5000" / f"superpix-MIDDLE_{n}.nii.gz").touch()


# --------------------------------------------------------------------------------------------- ALPNet folder
@requires_chaos
def test_find_alpnet_volumes_chaos_numeric_order():
    records = find_alpnet_volumes(chaos_dir(), require_labels=True, require_supervoxels=True)
    assert [r.id for r in records] == CHAOS_IDS
    for r in records:
        assert r.image.name == f"image_{r.id}.nii.gz" and r.image.is_file()
        assert r.label is not None and r.label.name == f"label_{r.id}.nii.gz"
        assert r.supervoxel is not None and r.supervoxel.name == f"superpix-MIDDLE_{r.id}.nii.gz"
        assert r.supervoxel.parent.name == "supervoxels_5000"


def test_numeric_not_lexicographic(tmp_path):
    _touch_layout(tmp_path, [10, 2, 1, 33, 3])
    assert [r.id for r in find_alpnet_volumes(tmp_path)] == ["1", "2", "3", "10", "33"]


def test_optional_labels_and_supervoxels(tmp_path):
    _touch_layout(tmp_path, [1, 2], labels=False, supervoxels=False)
    records = find_alpnet_volumes(tmp_path)
    assert all(r.label is None and r.supervoxel is None for r in records)
    assert find_alpnet_volumes(tmp_path, supervoxel_dir=None)[0].supervoxel is None


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_alpnet_volumes(tmp_path / "nowhere")


def test_no_images(tmp_path):
    (tmp_path / "label_1.nii.gz").touch()
    with pytest.raises(ValueError, match="No image_N.nii.gz files"):
        find_alpnet_volumes(tmp_path)


def test_non_numeric_image_name(tmp_path):
    _touch_layout(tmp_path, [1])
    (tmp_path / "image_abc.nii.gz").touch()
    with pytest.raises(ValueError, match="image_abc.nii.gz"):
        find_alpnet_volumes(tmp_path)


def test_missing_label_when_required(tmp_path):
    _touch_layout(tmp_path, [1, 2])
    (tmp_path / "label_2.nii.gz").unlink()
    assert find_alpnet_volumes(tmp_path)[1].label is None
    with pytest.raises(FileNotFoundError, match="label_2.nii.gz"):
        find_alpnet_volumes(tmp_path, require_labels=True)


def test_missing_supervoxel_file_is_named(tmp_path):
    _touch_layout(tmp_path, [1, 2, 3])
    (tmp_path / "supervoxels_5000" / "superpix-MIDDLE_3.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="superpix-MIDDLE_3.nii.gz"):
        find_alpnet_volumes(tmp_path)


def test_missing_supervoxel_folder_when_required(tmp_path):
    _touch_layout(tmp_path, [1], supervoxels=False)
    with pytest.raises(FileNotFoundError, match="supervoxels_5000"):
        find_alpnet_volumes(tmp_path, require_supervoxels=True)


# --------------------------------------------------------------------------------------------- datalist JSON
def test_load_datalist_relative_paths_and_order(tmp_path):
    _touch_layout(tmp_path / "data", [1, 2, 3])
    entries = [
        {"image": "data/image_3.nii.gz", "label": "data/label_3.nii.gz", "supervoxel": "data/supervoxels_5000/superpix-MIDDLE_3.nii.gz"},
        {"image": "data/image_1.nii.gz", "id": "case1"},
        "data/image_2.nii.gz",
    ]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    records = load_datalist(path)
    assert [r.id for r in records] == ["image_3", "case1", "image_2"]
    assert records[0].label == tmp_path / "data" / "label_3.nii.gz"
    assert records[0].supervoxel == tmp_path / "data" / "supervoxels_5000" / "superpix-MIDDLE_3.nii.gz"
    assert records[1].label is None and records[2].supervoxel is None
    with pytest.raises(ValueError, match="has no 'label'"):
        load_datalist(path, require_labels=True)
    # base_dir overrides the JSON's folder
    (tmp_path / "sub").mkdir()
    moved = tmp_path / "sub" / "list.json"
    moved.write_text(path.read_text())
    assert load_datalist(moved, base_dir=tmp_path)[0].image == tmp_path / "data" / "image_3.nii.gz"


def test_load_datalist_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"training": [ {"image": "a.nii.gz"}, ')
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_datalist(bad)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_datalist(tmp_path / "absent.json")
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"validation": [{"image": "x.nii.gz"}]}))
    with pytest.raises(ValueError, match="nokey.json.*no key 'training'"):
        load_datalist(nokey)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": [{"image": "not_there.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="not_there.nii.gz"):
        load_datalist(missing)
    (tmp_path / "a.nii.gz").touch()
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"training": ["a.nii.gz", "a.nii.gz"]}))
    with pytest.raises(ValueError, match="duplicate volume id 'a'"):
        load_datalist(dup)
    noimage = tmp_path / "noimage.json"
    noimage.write_text(json.dumps({"training": [{"label": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match="entry 0 must be an object with an 'image'"):
        load_datalist(noimage)


# --------------------------------------------------------------------------------------------- VolumeStore
@requires_chaos
def test_volume_store_matches_files_voxel_for_voxel():
    """Image, label and supervoxels must stay aligned after RAS reorientation.

    The published supervoxel files carry an identity (LPS) affine while the images are LAS; reorienting each by
    its own header would flip the supervoxels against the image. The store takes both on the image's grid.
    """
    record = find_alpnet_volumes(chaos_dir())[0]
    store = VolumeStore([record])
    raw_img = np.asarray(nib.load(record.image).dataobj).astype(np.float64)
    raw_lbl = np.asarray(nib.load(record.label).dataobj)
    raw_sv = np.asarray(nib.load(record.supervoxel).dataobj)
    # image_1 is stored LAS: RAS = flip of the first axis; CHAOS is already 256 x 256 so nothing is resized
    expected_img = 2 * (raw_img - raw_img.min()) / (raw_img.max() - raw_img.min()) - 1
    image, label, sv = store.image("1"), store.label("1"), store.supervoxels("1")
    assert image.shape == label.shape == sv.shape == (256, 256, 37)
    assert image.dtype == np.float32 and label.dtype == np.int16 and sv.dtype == np.int32
    np.testing.assert_allclose(image, expected_img[::-1], atol=1e-6)
    np.testing.assert_array_equal(label, raw_lbl[::-1])
    np.testing.assert_array_equal(sv, raw_sv[::-1])
    assert image.min() == -1.0 and image.max() == 1.0
    np.testing.assert_allclose(store.spacing("1"), (1.25, 1.25, 7.7), rtol=1e-6)
    # supervoxel background (0) is the dark outside of the body
    assert image[sv == 0].mean() < -0.97 and image[sv > 0].mean() > -0.6
    assert store.image("1") is image  # cached, loaded once
    with pytest.raises(ValueError, match="read-only|not writeable"):
        image[0, 0, 0] = 0


@requires_chaos
def test_volume_store_resize_keeps_ids_and_scales_spacing():
    record = find_alpnet_volumes(chaos_dir())[1]
    store = VolumeStore([record], spatial_size=128, cache=False)
    label = store.label("2")
    assert label.shape == (128, 128, 31) and store.image("2").shape == (128, 128, 31)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    assert set(np.unique(store.supervoxels("2"))) <= set(np.unique(np.asarray(nib.load(record.supervoxel).dataobj)))
    np.testing.assert_allclose(store.spacing("2"), (2.5, 2.5, 7.7), rtol=1e-5)


def test_volume_store_errors(tmp_path):
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    image = np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "image_1.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), affine), str(tmp_path / "label_1.nii.gz"))
    store = VolumeStore([VolumeRecord("1", tmp_path / "image_1.nii.gz", None, None)], spatial_size=16)
    assert store.image("1").shape == (16, 16, 4)
    np.testing.assert_allclose(store.spacing("1"), (1.0, 1.0, 5.0))
    with pytest.raises(ValueError, match="image_1.nii.gz.*has no label file"):
        store.label("1")
    with pytest.raises(ValueError, match="has no supervoxel file"):
        store.supervoxels("1")
    with pytest.raises(ValueError, match="Unknown volume id '7'"):
        store.image("7")
    bad = VolumeStore([VolumeRecord("1", tmp_path / "image_1.nii.gz", tmp_path / "label_1.nii.gz", tmp_path / "sv.nii.gz")])
    with pytest.raises(ValueError, match="label_1.nii.gz.*shape"):
        bad.label("1")
    with pytest.raises(FileNotFoundError, match="sv.nii.gz"):
        bad.supervoxels("1")
    with pytest.raises(ValueError, match="preset"):
        VolumeStore([VolumeRecord("1", tmp_path / "image_1.nii.gz")], intensity="nope")
    with pytest.raises(ValueError, match="Duplicate volume id"):
        VolumeStore([VolumeRecord("1", tmp_path / "image_1.nii.gz")] * 2)


def _las_case(tmp_path: Path, label_affine_change=None) -> tuple[VolumeRecord, np.ndarray]:
    """An LAS image (CHAOS's orientation) and its label with one asymmetric organ; the label is written through
    ``label_affine_change(image, label) -> label image``."""
    affine = np.diag([-1.25, 1.25, 7.7, 1.0])
    affine[:3, 3] = [160.0, -150.0, -40.0]
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 24, 6)).astype(np.float32)
    label = np.zeros((20, 24, 6), np.int16)
    label[2:7, 3:15, 1:4] = 1  # near the first voxels along x, y and z: a mirror in any axis moves it
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "image_1.nii.gz"))
    written = nib.Nifti1Image(label, affine)
    if label_affine_change is not None:
        written = label_affine_change(written)
    nib.save(written, str(tmp_path / "label_1.nii.gz"))
    return VolumeRecord("1", tmp_path / "image_1.nii.gz", label=tmp_path / "label_1.nii.gz"), label


def test_volume_store_reads_a_label_saved_in_another_orientation_by_its_header(tmp_path):
    """nibabel's as_closest_canonical stores the same voxels RAS (the x axis flipped, the header changed): read by
    array index it would be the organ's mirror image."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    as_stored, label = _las_case(tmp_path / "a")
    canonical, _ = _las_case(tmp_path / "b", nib.as_closest_canonical)
    assert not np.array_equal(np.asarray(nib.load(str(canonical.label)).dataobj), label)  # stored differently
    reference = VolumeStore([as_stored], spatial_size=None, orientation=None).label("1")
    assert np.array_equal(reference, label)
    assert np.array_equal(VolumeStore([canonical], spatial_size=None, orientation=None).label("1"), label)
    ras = VolumeStore([canonical], spatial_size=None).label("1"), VolumeStore([as_stored], spatial_size=None).label("1")
    assert np.array_equal(*ras)


def test_volume_store_refuses_a_label_on_another_grid(tmp_path):
    def shifted(img):
        affine = img.affine.copy()
        affine[0, 3] += 5.0  # four voxels away, same shape
        return nib.Nifti1Image(np.asarray(img.dataobj), affine)

    record, _ = _las_case(tmp_path, shifted)
    with pytest.raises(ValueError, match=r"label_1.nii.gz' is not on the voxel grid of its image .*image_1.nii.gz"):
        VolumeStore([record], spatial_size=None).label("1")
