"""Issue 18's hostile cases not covered elsewhere: a full disk under the real command lines, a DICOM series whose
file names are in any order (the written mask checked against pydicom's slice positions, not the project's loader),
temporaries of a killed write removed at the next write, and bad model-folder and input values in one line.

A full disk is a file-size limit (``RLIMIT_FSIZE``) set in the subprocess: CPython ignores ``SIGXFSZ``, so a write
past the limit fails with ``EFBIG`` as a write to a full disk fails with ``ENOSPC``, after a short write.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.errors import format_error
from monai_sdfsmis.networks.support_copy import SupportMaskCopy
from tests.test_transforms_io import LAS_ORIENTATION, write_dicom_series
from tests.utils import REPO_ROOT, requires_totalseg, totalseg_dir

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
INFERENCE = str(BUNDLE / "configs" / "inference.json")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SDFSMIS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SDFSMIS_DEBUG", None)
    return env


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _on_a_full_disk(args: list[str], limit: int, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run ``args`` with every file it writes limited to ``limit`` bytes."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, proc.stdout[-2000:]
    return lines[-1]


def _save(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.25, 1.25, 4.0, 1.0]) if affine is None else affine), str(path))
    return path


@pytest.fixture()
def noisy_case(tmp_path):
    """Query, support and a support label of random noise: the support-mask copy's mask does not compress below
    a few KiB, so a 2 KiB file-size limit cuts its write short."""
    rng = np.random.default_rng(18)
    data = tmp_path / "data"
    data.mkdir()
    shape = (128, 128, 6)
    _save(data / "query.nii.gz", rng.normal(size=shape).astype(np.float32))
    _save(data / "support.nii.gz", rng.normal(size=shape).astype(np.float32))
    _save(data / "support_label.nii.gz", (rng.random(shape) < 0.5).astype(np.uint8))
    return data


def test_bundle_inference_on_a_full_disk_is_one_line_and_publishes_nothing(noisy_case, tmp_path):
    """Issue 18 row 1, the bundle: exit 1, one line naming the mask, no file under its name nor a temporary."""
    before = _digest(noisy_case)
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--network_def", '{"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}',
        "--load_checkpoint", "False", "--query_image", str(noisy_case / "query.nii.gz"),
        "--support_image", str(noisy_case / "support.nii.gz"),
        "--support_label", str(noisy_case / "support_label.nii.gz"), "--organ_id", "1", "--spatial_size", "128",
        "--output_dir", str(out), "--progress", "False",
    ]
    proc = _on_a_full_disk(args, 2048, cwd=BUNDLE)
    line = _last_line(proc)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert line.startswith(f"sd_fsmis error: could not write {out / 'query_seg.nii.gz'}: "), line
    assert "disk full" in line
    assert list(out.iterdir()) == []  # neither a truncated mask under its name nor a temporary
    assert _digest(noisy_case) == before


def test_infer_on_a_full_disk_is_one_line_and_publishes_nothing(noisy_case, tmp_path):
    """Issue 18 row 1, ``python -m monai_sdfsmis infer`` (a tiny no-prior model folder): the same."""
    from tests.test_cli import build_no_prior_model_folder

    model = build_no_prior_model_folder(tmp_path / "model")
    before = _digest(noisy_case)
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "monai_sdfsmis", "infer", "--query", str(noisy_case / "query.nii.gz"),
        "--support", str(noisy_case / "support.nii.gz"), "--support_label", str(noisy_case / "support_label.nii.gz"),
        "--organ_id", "1", "--model", str(model), "--output_dir", str(out), "--no_progress",
    ]
    proc = _on_a_full_disk(args, 16)  # below gzip's header: even an empty mask cannot be written
    line = _last_line(proc)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert f"could not write {out / 'query_seg.nii.gz'}: " in line and "disk full" in line, line
    assert "mask written" not in proc.stdout
    assert list(out.iterdir()) == []
    assert _digest(noisy_case) == before


@requires_totalseg
def test_a_dicom_seg_on_a_full_disk_is_one_line_and_publishes_nothing(tmp_path):
    """Issue 18 row 1 for ``--format dicom_seg`` (the bundle's output_format): pydicom's write fails outright."""
    pytest.importorskip("highdicom")
    data, out = totalseg_dir(), tmp_path / "out"
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--network_def", '{"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}',
        "--load_checkpoint", "False", "--query_image", str(data / "ct_dicom"),
        "--support_image", str(data / "example_ct_sm.nii.gz"), "--support_label", str(data / "example_seg.nii.gz"),
        "--organ_id", "5", "--spatial_size", "128", "--output_format", "dicom_seg", "--output_dir", str(out),
        "--progress", "False",
    ]
    proc = _on_a_full_disk(args, 2048, cwd=BUNDLE)
    line = _last_line(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert line.startswith(f"sd_fsmis error: [Errno 27] could not write {out / 'ct_dicom_seg.dcm'}: File too large"), line
    assert list(out.iterdir()) == []


def test_supervoxels_on_a_full_disk_is_one_line_and_publishes_nothing(tmp_path):
    """Issue 18 row 1, the ``supervoxels`` command (its Felzenszwalb kernel replaced by random ids: the write is what
    is tested, and the kernel's compilation would take minutes)."""
    image = _save(tmp_path / "image_1.nii.gz", np.random.default_rng(0).normal(size=(64, 64, 8)).astype(np.float32))
    out = tmp_path / "supervoxels"
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import monai_sdfsmis.data.supervoxels as sv
        from monai_sdfsmis.__main__ import main
        sv.compute_supervoxels = lambda data, spacing, min_size: np.random.default_rng(0).integers(
            0, 30000, size=data.shape).astype(np.int32)
        sys.exit(main(sys.argv[1:]))
        """
    )
    proc = _on_a_full_disk([sys.executable, "-c", script, "supervoxels", "--images", str(image), "--out_dir", str(out),
                            "--no_progress"], 4096)
    line = _last_line(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith(f"error: cannot write {out / 'superpix-MIDDLE_1.nii.gz'}: "), line
    assert list(out.iterdir()) == []


def test_a_results_table_on_a_full_disk_names_the_file_and_publishes_nothing(tmp_path):
    """Results tables, JSON and model_config.json go through ``atomic_write``: the error names the file written."""
    script = textwrap.dedent(
        """
        import sys
        from monai_sdfsmis.utils import atomic_write
        try:
            atomic_write(sys.argv[1], "| organ | Dice |\\n" * 2000)
        except OSError as error:
            print(f"{type(error).__name__} {error.errno}: {error.strerror}")
            sys.exit(3)
        """
    )
    table = tmp_path / "protocol_table.md"
    proc = _on_a_full_disk([sys.executable, "-c", script, str(table)], 4096)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip() == f"OSError 27: could not write {table}: File too large", proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    """The model folder's model.pt and the interval checkpoints (``AtomicDiskSaver``): torch reports a full disk as
    a RuntimeError ("unexpected pos") whose context is the OSError; the error must name the checkpoint."""
    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        import torch
        from monai_sdfsmis.engines.checkpoints import AtomicDiskSaver
        saver = AtomicDiskSaver(sys.argv[1], filename="model.pt")
        saver({"model": torch.nn.Linear(2, 1).state_dict()}, "model.pt")  # the previous model, before the disk fills
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            saver({"model": torch.nn.Linear(100, 100).state_dict()}, "model.pt")
        except OSError as error:
            print(f"{type(error).__name__} {error.errno}: {error.strerror}")
            sys.exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip() == f"OSError 27: could not write {tmp_path / 'model.pt'}: File too large", proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    import torch

    assert torch.load(tmp_path / "model.pt", weights_only=True)["model"]["weight"].shape == (1, 2)  # the previous one


def test_atomic_write_removes_what_a_killed_write_of_the_same_file_left(tmp_path):
    """Issue 18 row 12 for model_config.json and results tables: a SIGKILL between the temporary's creation and its
    rename leaves ``.<name>.<random><suffix>``; the next write of that file removes it (another file's stays)."""
    from monai_sdfsmis.utils import atomic_write

    ours = tmp_path / ".model_config.json.k3x_9ab.json"
    other = tmp_path / ".protocol_table.md.k3x_9ab.md"
    ours.write_text('{"half": ')
    other.write_text("| another run's |")
    atomic_write(tmp_path / "model_config.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "model_config.json"]


def test_atomic_folder_removes_the_temporary_folder_a_killed_write_left(tmp_path):
    """The same for a model folder's ``autoencoder/`` (``atomic_folder``); a copy moved aside (``.old``) is kept."""
    from monai_sdfsmis.utils import atomic_folder

    killed = tmp_path / ".autoencoder.k3x_9ab.tmp"
    killed.mkdir()
    (killed / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    other = tmp_path / ".model.k3x_9ab.tmp"  # another folder's: maybe being written now
    other.mkdir()
    aside = tmp_path / ".autoencoder.a1b2c3.old"
    (aside / "folder").mkdir(parents=True)
    with atomic_folder(tmp_path / "autoencoder") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name, other.name, "autoencoder"]


# ------------------------------------------------------------------------------------------------------ DICOM geometry
class QueryBrightPixels(SupportMaskCopy):
    """A 'network' whose mask is the query slice's own bright pixels: each mask voxel then shows which DICOM pixel
    it was computed from (the support only has to be valid)."""

    def segment(self, query_image, context):
        return query_image[:, :1].clone()  # minmax-scaled: 1 where the pixel is bright, -1 elsewhere


BRIGHT = 1000
# Rows and columns tilted against the patient axes (30 degrees about z, then 20 about the row direction).
_ROW = np.array([np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0])
_COL = np.array([-np.sin(np.pi / 6), np.cos(np.pi / 6), 0.0]) * np.cos(np.pi / 9) + np.array([0, 0, -np.sin(np.pi / 9)])
OBLIQUE = tuple(round(float(v), 6) for v in (*_ROW, *_COL))  # DICOM decimal strings of at most 16 characters


def _mask_at_dicom_pixels(mask_path: Path, folder: Path) -> None:
    """Each pixel of each DICOM file, placed by pydicom's ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing, must fall on a voxel centre of the written mask whose value says whether the pixel is bright; and
    every mask voxel must be such a pixel."""
    pydicom = pytest.importorskip("pydicom")
    mask = nib.load(str(mask_path))
    data, inverse = np.asarray(mask.dataobj), np.linalg.inv(mask.affine)
    covered = np.zeros(data.shape, bool)
    for file in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(file))
        x, y = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = np.asarray(ds.ImagePositionPatient, float) + c[..., None] * dc * x + r[..., None] * dr * y
        ijk = (lps * [-1.0, -1.0, 1.0]) @ inverse[:3, :3].T + inverse[:3, 3]  # DICOM's LPS to the NIfTI's RAS
        np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-3, err_msg=f"{file.name} is off the mask's grid")
        i, j, k = np.rint(ijk).astype(int).transpose(2, 0, 1)
        assert (i >= 0).all() and (j >= 0).all() and (k >= 0).all(), file.name
        assert (i < data.shape[0]).all() and (j < data.shape[1]).all() and (k < data.shape[2]).all(), file.name
        np.testing.assert_array_equal(data[i, j, k] > 0, ds.pixel_array == BRIGHT, err_msg=file.name)
        covered[i, j, k] = True
    assert covered.all()


@pytest.mark.parametrize("orientation", [LAS_ORIENTATION, OBLIQUE], ids=["las", "oblique"])
@pytest.mark.parametrize("numbers", [[5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]], ids=["reversed", "shuffled"])
def test_a_dicom_query_mask_lands_on_the_acquired_pixels_whatever_the_file_names(tmp_path, orientation, numbers):
    """Issue 18 rows 2-3 ("the mask must land on the voxels the scanner acquired, for any order of file names"):
    bundle inference on a DICOM series query, the mask checked against pydicom's positions of every pixel."""
    from monai.bundle import run

    rng = np.random.default_rng(7)
    pixels = np.where(rng.random((16, 16, 6)) < 0.4, BRIGHT, 0).astype(np.int16)
    pixels[0, 0, :], pixels[1, 0, :] = BRIGHT, 0  # each slice has both values
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [np.round(np.array([-20.0, 30.0, 5.0]) + 4.0 * k * normal, 4) for k in range(6)]
    folder = write_dicom_series(tmp_path / "series", pixels, "1.2.826.0.1.3680043.99.18", "hostile",
                                orientation=orientation, file_numbers=numbers, positions=positions)
    support = _save(tmp_path / "support.nii.gz", rng.normal(size=(16, 16, 6)).astype(np.float32))
    label = np.zeros((16, 16, 6), np.uint8)
    label[4:10, 5:12, 1:5] = 1
    support_label = _save(tmp_path / "support_label.nii.gz", label)
    out = tmp_path / "out"
    run(
        config_file=INFERENCE, logging_file=False, bundle_root=str(BUNDLE), output_dir=str(out),
        network_def={"_target_": f"{__name__}.QueryBrightPixels"}, load_checkpoint=False, query_image=str(folder),
        support_image=str(support), support_label=str(support_label), organ_id=1, spatial_size=16, progress=False,
    )
    written = out / "series_seg.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == [written.name]
    _mask_at_dicom_pixels(written, folder)


# ------------------------------------------------------------------------------------------ bad model-folder values
@pytest.mark.parametrize("key, value, message", [
    ("intensity", "hounsfield", "intensity must be one of ct, mr, minmax, zscore, got 'hounsfield'"),
    ("spatial_size", "big", "spatial_size must be a positive integer, got 'big'"),
    ("postprocess", ["smooth"], "smooth"),
    ("support_alignment", "atlas", "atlas"),
])
def test_a_bad_value_in_model_config_json_is_one_line_naming_the_file_and_key(tmp_path, capsys, key, value, message):
    """Issue 18 row 11 / last bullet: a hand-edited model folder; the line names model_config.json and the key."""
    from monai_sdfsmis.__main__ import main
    from tests.test_cli import build_no_prior_model_folder

    model = build_no_prior_model_folder(tmp_path / "model")
    config_path = model / "model_config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    data = tmp_path / "data"
    data.mkdir()
    query = _save(data / "query.nii.gz", np.random.default_rng(1).normal(size=(16, 16, 6)).astype(np.float32))
    label = np.zeros((16, 16, 6), np.uint8)
    label[4:10, 4:10, 2:4] = 1
    support_label = _save(data / "label.nii.gz", label)
    before = _digest(data)
    rc = main(["infer", "--query", str(query), "--support", str(query), "--support_label", str(support_label),
               "--organ_id", "1", "--model", str(model), "--output_dir", str(tmp_path / "out"), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert str(config_path) in err[0] and key in err[0] and message in err[0], err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert _digest(data) == before


def test_an_rgb_volume_is_refused_in_one_line(tmp_path):
    """Issue 18 bullet 4: an RGB NIfTI (RGB24 voxels) is refused naming the file, not read as three channels or as
    bytes."""
    from monai.bundle import run

    rgb = np.zeros((16, 16, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.random.default_rng(2).integers(0, 255, size=(16, 16, 6))
    query = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(query))
    support = _save(tmp_path / "support.nii.gz", np.random.default_rng(3).normal(size=(16, 16, 6)).astype(np.float32))
    label = np.zeros((16, 16, 6), np.uint8)
    label[4:10, 4:10, 2:4] = 1
    support_label = _save(tmp_path / "support_label.nii.gz", label)
    with pytest.raises(Exception) as info:
        run(config_file=INFERENCE, logging_file=False, bundle_root=str(BUNDLE), output_dir=str(tmp_path / "out"),
            network_def={"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}, load_checkpoint=False,
            query_image=str(query), support_image=str(support), support_label=str(support_label), organ_id=1,
            spatial_size=16, progress=False)
    line = format_error(info.value)
    assert line is not None and "\n" not in line, repr(info.value)
    assert f"{query} holds RGB colour voxels; a single-channel grey-value volume is required" in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_dicom_series_with_uneven_slice_spacing_is_refused_naming_the_first_bad_slice(tmp_path):
    """Issue 18 bullet 2, non-uniform spacing that is no whole number of missing slices (5 mm among 4 mm steps)."""
    from monai_sdfsmis.transforms import load_volume

    volume = np.random.default_rng(5).integers(0, 500, size=(12, 10, 6)).astype(np.int16)
    folder = write_dicom_series(tmp_path / "uneven", volume, "1.2.826.0.1.3680043.99.19", "uneven",
                                offsets=[0.0, 4.0, 8.0, 13.0, 17.0, 21.0], file_numbers=[5, 0, 4, 1, 3, 2])
    with pytest.raises(ValueError) as info:
        load_volume(folder)
    message = str(info.value)
    assert message.startswith(f"DICOM series in {folder} is not evenly spaced: 5.000 mm from IM00004.dcm to "
                              "IM00001.dcm, 4.000 mm between the other slices; ") and "missing" not in message


def test_large_finite_values_are_scaled_not_called_non_finite(tmp_path):
    """Issue 18 row 10 (extra case): values near 3e38 with a finite range load; the zscore preset's float32
    statistics overflowed and the inferer then called the query 'non-finite'. The mask is written now."""
    import torch
    from monai.bundle import run

    from monai_sdfsmis.transforms import ScaleToUnitRange

    huge = torch.full((1, 8, 8, 4), 3e38)
    huge[:, :4] = 1e38  # mean 2e38, standard deviation 1e38
    scaled = ScaleToUnitRange("zscore", zscore_clip=2.0)(huge)
    np.testing.assert_allclose(scaled[:, 4:].numpy(), 0.5, rtol=1e-5)
    np.testing.assert_allclose(scaled[:, :4].numpy(), -0.5, rtol=1e-5)

    volume = np.full((16, 16, 6), 3e38, np.float32)
    volume[4:12, 4:12] = 1e38
    query = _save(tmp_path / "huge.nii.gz", volume)
    label = np.zeros((16, 16, 6), np.uint8)
    label[4:12, 4:12, 1:5] = 1
    support_label = _save(tmp_path / "label.nii.gz", label)
    out = tmp_path / "out"
    run(config_file=INFERENCE, logging_file=False, bundle_root=str(BUNDLE), output_dir=str(out),
        network_def={"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}, load_checkpoint=False,
        query_image=str(query), support_image=str(query), support_label=str(support_label), organ_id=1,
        intensity="zscore", spatial_size=16, progress=False)
    assert np.asarray(nib.load(str(out / "huge_seg.nii.gz")).dataobj).any()


def test_train_with_organ_ids_given_as_a_name_is_one_line_naming_it(tmp_path, capsys):
    """Issue 18 row 11: ``--set organ_ids=liver`` in Setting 2 was reported as ``invalid literal for int(): 'l'``."""
    from monai_sdfsmis.__main__ import main
    from monai_sdfsmis.data import make_phantom_dataset

    phantoms = tmp_path / "phantoms"
    make_phantom_dataset(phantoms, n_volumes=2, shape=(32, 32, 8), seed=0)
    before = _digest(phantoms)
    rc = main(["train", "--dataset_dir", str(phantoms), "--output_dir", str(tmp_path / "run"), "--iterations", "2",
               "--set", "spatial_size=32", "ae_width=tiny", "unet_width=tiny", "ae_iterations=1", "num_workers=0",
               "total_minutes=null", "progress=false", "setting=2", "organ_ids=liver"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "Traceback" not in "\n".join(err)
    assert "exclude_labels: 'liver' is not a label id" in err[-1] and "'l'" not in err[-1], err[-1]
    assert _digest(phantoms) == before


def _budgeted_engine(folder: Path, planned: int, resume: bool, crash_at: int | None = None):
    """The recipe's stage 2 in miniature: checkpoints every 2 iterations, a cosine budget of ``planned`` iterations
    over a loader far longer than the run (the recipe's dataset_length), the learning rate of each iteration kept."""
    import torch
    from ignite.engine import Engine, Events

    from monai_sdfsmis.engines import AtomicCheckpointSaver, ResumeFromCheckpoint, attach_budget

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()

    engine = Engine(step)
    if resume:
        ResumeFromCheckpoint(folder, {"model": model, "optimizer": optimizer}).attach(engine)
    AtomicCheckpointSaver(str(folder), {"model": model, "optimizer": optimizer}, engine_key="trainer",
                          epoch_level=False, save_interval=2, n_saved=2).attach(engine)
    budget = attach_budget(engine, optimizer, max_iterations=planned, schedule="cosine", warmup_iterations=2)
    lrs: dict[int, float] = {}
    engine.add_event_handler(Events.ITERATION_STARTED, lambda e: lrs.__setitem__(e.state.iteration, optimizer.param_groups[0]["lr"]))
    if crash_at is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=crash_at), lambda e: e.terminate())
    return engine, budget, lrs


@pytest.mark.filterwarnings("ignore:Resuming in the middle of an epoch")  # a plain range() loader cannot skip
@pytest.mark.parametrize("planned", [8, 12])
def test_a_budgeted_resume_stops_at_the_planned_iteration_on_the_uninterrupted_schedule(tmp_path, planned):
    """Issue 18 row 6 for ``train --resume --iterations N`` (the no-prior recipe's budget): the resumed run trains to
    iteration N, not N more, and its learning rates are the uninterrupted run's, not a new warm-up."""
    reference, _, expected = _budgeted_engine(tmp_path / "reference", planned, resume=False)
    reference.run(range(1000), max_epochs=1)
    assert reference.state.iteration == planned
    crashed, _, _ = _budgeted_engine(tmp_path / "run", 10, resume=False, crash_at=6)
    crashed.run(range(1000), max_epochs=1)
    engine, budget, lrs = _budgeted_engine(tmp_path / "run", planned, resume=True)
    engine.run(range(1000), max_epochs=1)
    assert engine.state.iteration == planned and budget.start_iteration == 6 and budget.iterations == planned - 6
    assert budget.stopped_by == "iterations"
    assert sorted(lrs) == list(range(7, planned + 1))
    np.testing.assert_allclose([lrs[i] for i in sorted(lrs)], [expected[i] for i in sorted(lrs)], rtol=1e-12)


@pytest.mark.filterwarnings("ignore:Resuming in the middle of an epoch")
def test_a_budgeted_resume_beyond_the_planned_iterations_is_one_line(tmp_path):
    crashed, _, _ = _budgeted_engine(tmp_path, 10, resume=False, crash_at=6)
    crashed.run(range(1000), max_epochs=1)
    engine, _, lrs = _budgeted_engine(tmp_path, 4, resume=True)
    with pytest.raises(ValueError) as info:
        engine.run(range(1000), max_epochs=1)
    assert str(info.value) == ("the resumed checkpoint is at iteration 6, beyond the 4 iterations this run plans; plan at "
                               "least 6 iterations (--iterations) to resume from it, or start afresh elsewhere")
    assert format_error(info.value).startswith("sd_fsmis error: the resumed checkpoint is at iteration 6") and not lrs


@pytest.mark.parametrize("size", ["0", "-64"])
def test_a_spatial_size_that_is_no_size_is_called_so(tmp_path, capsys, size):
    """``infer --spatial_size 0`` was told it 'disagrees with the model folder'; it is no size at all."""
    from monai_sdfsmis.__main__ import main
    from tests.test_cli import build_no_prior_model_folder

    model = build_no_prior_model_folder(tmp_path / "model")
    query = _save(tmp_path / "query.nii.gz", np.random.default_rng(1).normal(size=(16, 16, 6)).astype(np.float32))
    rc = main(["infer", "--query", str(query), "--support", str(query), "--support_label", str(query), "--organ_id", "1",
               "--model", str(model), "--output_dir", str(tmp_path / "out"), "--spatial_size", size, "--no_progress"])
    assert rc == 1
    # the last line: a logging handler an earlier test left on its closed capture stream may complain above it
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: spatial_size (--spatial_size) must be a positive integer, got {size}"
