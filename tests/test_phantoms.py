"""Synthetic abdominal phantoms in the ALPNet layout: files, labels, real supervoxels, and episodes drawn from them."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.data import (
    EpisodeDataset,
    VolumeStore,
    chunk_bounds,
    compute_supervoxels,
    find_alpnet_volumes,
    make_phantom_dataset,
    organ_slices,
    phantom_volume,
    protocol_cases,
    support_slice_indices,
)

SHAPE = (96, 96, 24)
SPACING = (2.5, 2.5, 7.7)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(out, n_volumes=6, shape=SHAPE, spacing=SPACING, seed=0)
    return out


def test_files_and_contents(phantom_dir):
    records = find_alpnet_volumes(phantom_dir, require_labels=True, require_supervoxels=True)
    assert [r.id for r in records] == ["1", "2", "3", "4", "5", "6"]
    assert json.loads((phantom_dir / "phantom.json").read_text())["n_volumes"] == 6
    assert not list(phantom_dir.rglob(".*")), "temporary files are renamed into place"
    images = []
    for r in records:
        img, lbl, sv = (nib.load(str(p)) for p in (r.image, r.label, r.supervoxel))
        for nii in (img, lbl, sv):
            assert nii.shape == SHAPE
            np.testing.assert_allclose(nii.header.get_zooms(), SPACING, rtol=1e-6)
            assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.int16 and lbl.get_data_dtype() == np.uint8
        image, label, supervoxels = (np.asarray(n.dataobj) for n in (img, lbl, sv))
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}, "all four organs in every volume"
        # organs are brighter than the rest of the body, the outside is dark
        assert image[label == 1].mean() > image[(label == 0) & (image > 100)].mean() + 100
        assert image[supervoxels == 0].mean() < 60 and image[supervoxels > 0].mean() > 250
        # liver on the patient's right (low x in RAS), spleen on the left, kidneys posterior to the liver centre
        centre = {k: np.argwhere(label == k).mean(axis=0) for k in (1, 2, 3, 4)}
        assert centre[1][0] < SHAPE[0] / 2 < centre[4][0]
        assert centre[2][0] < centre[3][0] and centre[2][1] < centre[1][1]
        assert len(np.unique(supervoxels)) > 10
        images.append(image)
    # per-volume jitter: no two volumes are the same
    assert not np.array_equal(images[0], images[1])


def test_supervoxels_are_the_real_algorithm(phantom_dir):
    record = find_alpnet_volumes(phantom_dir)[2]
    image = np.asarray(nib.load(str(record.image)).dataobj).astype(np.float32)
    stored = np.asarray(nib.load(str(record.supervoxel)).dataobj)
    np.testing.assert_array_equal(stored, compute_supervoxels(image, SPACING, min_size=300))


def test_deterministic_volume():
    a_img, a_lbl = phantom_volume((32, 32, 10), seed=3)
    b_img, b_lbl = phantom_volume((32, 32, 10), seed=3)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lbl, b_lbl)
    with pytest.raises(ValueError, match="at least 8 voxels"):
        phantom_volume((32, 32, 4))


def test_idempotent_and_repairs_missing_files(tmp_path):
    out = tmp_path / "ph"
    make_phantom_dataset(out, n_volumes=2, shape=(48, 48, 12), seed=1)
    image_file = out / "image_1.nii.gz"
    sv_file = out / "supervoxels_5000" / "superpix-MIDDLE_2.nii.gz"
    before_sv = np.asarray(nib.load(str(sv_file)).dataobj)
    os.utime(image_file, (1, 1))
    sv_file.unlink()
    records = make_phantom_dataset(out, n_volumes=2, shape=(48, 48, 12), seed=1)
    assert image_file.stat().st_mtime == 1, "complete files are not rewritten"
    np.testing.assert_array_equal(np.asarray(nib.load(str(sv_file)).dataobj), before_sv)
    assert records[1].supervoxel == sv_file
    # other parameters rewrite the phantom files and drop volumes of the earlier, larger run
    records = make_phantom_dataset(out, n_volumes=1, shape=(48, 48, 12), seed=2)
    assert [r.id for r in records] == ["1"] and image_file.stat().st_mtime != 1
    assert not (out / "image_2.nii.gz").exists()


def test_refuses_foreign_dataset_and_bad_arguments(tmp_path):
    (tmp_path / "image_1.nii.gz").touch()
    with pytest.raises(ValueError, match="did not write"):
        make_phantom_dataset(tmp_path)
    with pytest.raises(ValueError, match="n_volumes"):
        make_phantom_dataset(tmp_path / "x", n_volumes=0)
    with pytest.raises(ValueError, match="spacing"):
        make_phantom_dataset(tmp_path / "y", spacing=(1.0, 0.0, 1.0))


def test_episodes_and_protocol_on_phantoms(phantom_dir):
    records = find_alpnet_volumes(phantom_dir, require_labels=True, require_supervoxels=True)
    store = VolumeStore(records)
    assert store.image("1").shape == (256, 256, 24)
    np.testing.assert_allclose(store.spacing("1"), (2.5 * 96 / 256, 2.5 * 96 / 256, 7.7), rtol=1e-6)
    for setting in (1, 2):
        ds = EpisodeDataset(store, ids=["1", "2", "3", "4"], length=8, setting=setting, seed=0)
        for i in range(8):
            ep = ds[i]
            assert ep["support_image"].shape == (3, 256, 256) and abs(ep["support_slice"] - ep["query_slice"]) == 1
            assert ep["support_label"].numpy().sum() > 0 and ep["query_label"].numpy().sum() > 0
            if setting == 2:
                for z in (ep["support_slice"], ep["query_slice"]):
                    assert not np.isin(store.label(ep["volume_id"])[:, :, z], (1, 2, 3, 4)).any()
    # the protocol runs on the phantom labels with explicit folds
    cases = protocol_cases(records, folds=[[0, 1, 2], [3, 4, 5]])
    assert len(cases) == 2 * 4 * 2
    for case in cases[:4]:
        slices = organ_slices(store.label(case.support.id), case.organ_id)
        assert len(support_slice_indices(len(slices))) == 3
        assert chunk_bounds(len(organ_slices(store.label(case.query.id), case.organ_id)))[-1][1] > 0
