"""Tests of the command line ``python -m monai_sdfsmis``."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.__main__ import main
from tests.utils import REPO_ROOT, chaos_dir, requires_chaos


def _synthetic_volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.zeros((28, 24, 6), dtype=np.int16)
    vol[3:14, 3:21] = 100
    vol[14:25, 3:21] = 200
    vol[3:25, 3:21] += rng.integers(0, 3, size=(22, 18, 6)).astype(np.int16)
    return vol


def _write_nifti(path, data, zooms=(1.25, 1.25, 7.7)):
    nii = nib.Nifti1Image(data, np.diag([-zooms[0], zooms[1], zooms[2], 1.0]))
    nii.header.set_zooms(zooms)
    nib.save(nii, str(path))


@pytest.fixture()
def synthetic_dataset(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    for n in (2, 10):
        _write_nifti(root / f"image_{n}.nii.gz", _synthetic_volume(n))
    (root / "label_2.nii.gz").write_bytes(b"not an image and must be ignored by the glob")
    return root


def test_supervoxels_command_writes_files(synthetic_dataset, capsys):
    rc = main(["supervoxels", "--dataset_dir", str(synthetic_dataset), "--min_size", "200", "--no_progress"])
    assert rc == 0
    out_dir = synthetic_dataset / "supervoxels_200"
    assert sorted(p.name for p in out_dir.iterdir()) == ["superpix-MIDDLE_10.nii.gz", "superpix-MIDDLE_2.nii.gz"]
    labels = np.asarray(nib.load(str(out_dir / "superpix-MIDDLE_2.nii.gz")).dataobj)
    assert labels.shape == (28, 24, 6) and labels.dtype == np.int16
    assert labels.max() >= 2 and (labels[:3] == 0).all()  # background border removed, both blocks kept
    assert "2 written, 0 already present" in capsys.readouterr().out

    rc = main(["supervoxels", "--dataset_dir", str(synthetic_dataset), "--min_size", "200", "--no_progress"])
    assert rc == 0
    assert "0 written, 2 already present" in capsys.readouterr().out
    rc = main(["supervoxels", "--dataset_dir", str(synthetic_dataset), "--min_size", "200", "--overwrite",
               "--no_progress"])
    assert rc == 0
    assert "2 written, 0 already present" in capsys.readouterr().out
    assert len(list(out_dir.iterdir())) == 2  # no temporary files left behind


def test_supervoxels_command_with_explicit_images(synthetic_dataset, tmp_path, capsys):
    out_dir = tmp_path / "custom_out"
    image = synthetic_dataset / "image_10.nii.gz"
    rc = main(["supervoxels", "--images", str(image), "--out_dir", str(out_dir), "--min_size", "200"])
    assert rc == 0
    assert [p.name for p in out_dir.iterdir()] == ["superpix-MIDDLE_10.nii.gz"]
    assert "1 written" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["supervoxels"], "give --dataset_dir"),
        (["supervoxels", "--dataset_dir", "{tmp}/does_not_exist"], "dataset folder not found"),
        (["supervoxels", "--dataset_dir", "{tmp}/empty"], "no image_*.nii.gz files in"),
        (["supervoxels", "--images", "{tmp}/empty/image_1.nii.gz"], "--out_dir is required"),
        (["supervoxels", "--images", "{tmp}/empty/image_1.nii.gz", "--out_dir", "{tmp}/o"], "image file not found"),
        (["supervoxels", "--dataset_dir", "{tmp}/bad"], "cannot read"),
        (["supervoxels", "--dataset_dir", "{tmp}/bad", "--min_size", "0"], "min_size"),
    ],
)
def test_supervoxels_command_errors(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "image_1.nii.gz").write_bytes(b"garbage")
    rc = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 1
    last_line = err.strip().splitlines()[-1]  # a progress bar may come before it
    assert last_line.startswith("error: ") and message in last_line
    assert "Traceback" not in err


def test_unknown_command_and_missing_command_exit_through_argparse(capsys):
    for argv in (["nonsense"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "monai_sdfsmis", "supervoxels", "--dataset_dir", str(tmp_path / "missing")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 1
    assert "dataset folder not found" in res.stderr and str(tmp_path / "missing") in res.stderr
    assert "Traceback" not in res.stderr


@requires_chaos
def test_supervoxels_command_reproduces_published_chaos_supervoxels(tmp_path, capsys):
    dataset = tmp_path / "chaos"
    dataset.mkdir()
    (dataset / "image_2.nii.gz").symlink_to(chaos_dir() / "image_2.nii.gz")
    rc = main(["supervoxels", "--dataset_dir", str(dataset), "--no_progress"])
    assert rc == 0
    ours_nii = nib.load(str(dataset / "supervoxels_5000" / "superpix-MIDDLE_2.nii.gz"))
    ref = np.asarray(nib.load(str(chaos_dir() / "supervoxels_5000" / "superpix-MIDDLE_2.nii.gz")).dataobj)
    ours = np.asarray(ours_nii.dataobj)
    np.testing.assert_allclose(ours_nii.affine, nib.load(str(chaos_dir() / "image_2.nii.gz")).affine)
    # identical up to numbering: same order, gaps in the reference ids closed
    _, ref_consecutive = np.unique(ref, return_inverse=True)
    np.testing.assert_array_equal(ours, ref_consecutive.reshape(ref.shape))


@requires_chaos
def test_protocol_command_baseline_on_chaos_fold0_liver(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["protocol", "--dataset_dir", str(chaos_dir()), "--folds", "0", "--organs", "1",
                 "--output_dir", str(out), "--overlays", "0", "--no_progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "support-mask copy" in printed and "Liver" in printed
    assert (out / "protocol_cases.csv").is_file() and (out / "protocol_results.json").is_file()
    # 4 query volumes of fold 0 (support image_3 removed), one row each
    rows = (out / "protocol_cases.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4


def test_protocol_command_errors(tmp_path, capsys):
    assert main(["protocol", "--dataset_dir", str(tmp_path / "missing")]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["protocol", "--dataset_dir", str(tmp_path), "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_supervoxels_output_path_that_is_a_file(synthetic_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        rc = main(["supervoxels", "--dataset_dir", str(synthetic_dataset), "--out_dir", str(out), "--no_progress"])
        line = _one_line_error(capsys)
        assert rc == 1 and line.startswith("error: ") and str(out) in line
        assert "is a file" in line or "Not a directory" in line


@pytest.mark.parametrize(
    "exc, cause",
    [
        (OSError(30, "Read-only file system"), "Read-only file system"),
        (PermissionError(13, "Permission denied"), "Permission denied"),
    ],
)
def test_supervoxels_write_os_errors_are_one_line(synthetic_dataset, tmp_path, capsys, monkeypatch, exc, cause):
    import monai_sdfsmis.data.supervoxels as sv

    def failing_atomic_path(path):
        exc.filename = str(path)
        raise exc

    monkeypatch.setattr(sv, "atomic_path", failing_atomic_path)
    monkeypatch.setattr(sv, "compute_supervoxels", lambda data, spacing, min_size: np.ones(data.shape, np.int32))
    out = tmp_path / "out"
    rc = main(["supervoxels", "--dataset_dir", str(synthetic_dataset), "--out_dir", str(out), "--no_progress"])
    line = _one_line_error(capsys)
    assert rc == 1 and cause in line and str(out / "superpix-MIDDLE_2.nii.gz") in line


def test_supervoxels_output_folder_that_cannot_be_created(synthetic_dataset, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    def no_mkdir(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    out = tmp_path / "out"
    rc = main(["supervoxels", "--dataset_dir", str(synthetic_dataset), "--out_dir", str(out), "--no_progress"])
    line = _one_line_error(capsys)
    assert rc == 1 and "Permission denied" in line and str(out) in line


def test_supervoxels_dicom_folder_is_not_reported_missing(tmp_path, capsys):
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "IM0001.dcm").write_bytes(b"DICM")
    rc = main(["supervoxels", "--images", str(dicom), "--out_dir", str(tmp_path / "out"), "--no_progress"])
    line = _one_line_error(capsys)
    assert rc == 1 and str(dicom) in line and "not found" not in line and "folder" in line
