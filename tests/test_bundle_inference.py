"""Bundle inference (``configs/inference.json``) on tiny synthetic volumes: bad inputs and safe writing of masks.

Runs in-process through ``monai.bundle.run`` with the support-mask copy network (no weights), 16x16 slices; the
``network_type`` tests build a tiny no-prior model folder and segment a real (LAS) CHAOS volume with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
INFERENCE = str(BUNDLE / "configs" / "inference.json")
COPY = {"_target_": "monai_sdfsmis.networks.support_copy.SupportMaskCopy"}
AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])


def _write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _image(shape=(12, 12, 6)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 100, size=shape).astype(np.float32)


def _label(shape=(12, 12, 6)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[3:8, 3:8, 1:5] = 1
    label[8:10, 8:10, 2:4] = 2
    return label


@pytest.fixture()
def case(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return {
        "query_image": str(_write(data / "query.nii.gz", _image())),
        "support_image": str(_write(data / "support.nii.gz", _image())),
        "support_label": str(_write(data / "support_label.nii.gz", _label())),
    }


def _run(output_dir: Path, case: dict, **overrides) -> Path:
    from monai.bundle import run

    settings = {"organ_id": 1, "spatial_size": 16, "progress": False, "network_def": COPY, "load_checkpoint": False}
    settings.update(overrides)
    if settings["network_def"] is None:  # the bundle's own network_def (chosen by network_type)
        del settings["network_def"]
    run(
        config_file=INFERENCE,
        logging_file=False,
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        **case,
        **settings,
    )
    return output_dir / "query_seg.nii.gz"


def _text(error: BaseException) -> str:
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def test_inference_writes_the_mask(case, tmp_path):
    written = _run(tmp_path / "out", case)
    assert written.is_file()
    assert [p.name for p in written.parent.iterdir()] == ["query_seg.nii.gz"]  # no temporary file left
    values = np.asarray(nib.load(str(written)).dataobj)
    assert values.shape == (12, 12, 6) and set(np.unique(values)) == {0, 1}


def test_save_probabilities_writes_a_float_map_beside_the_mask(case, tmp_path):
    """The copy network's soft mask is -1/1, so its probability is exactly 0/1, and > 0.5 is the mask."""
    written = _run(tmp_path / "out", case, save_probabilities=True)
    assert sorted(p.name for p in written.parent.iterdir()) == ["query_prob.nii.gz", "query_seg.nii.gz"]
    mask, prob = nib.load(str(written)), nib.load(str(written.parent / "query_prob.nii.gz"))
    assert prob.get_data_dtype() == np.float32 and prob.shape == mask.shape == (12, 12, 6)
    np.testing.assert_allclose(prob.affine, AFFINE)
    p, m = np.asarray(prob.dataobj), np.asarray(mask.dataobj)
    assert m.sum() > 0 and set(np.unique(p)) <= {0.0, 1.0} and np.array_equal(p > 0.5, m == 1)


def test_several_organs_and_supports_from_the_bundle(case, tmp_path):
    """organ_id [1, 2] writes one label map; with the copy network and disjoint organs it is the support's label map
    copied chunk by chunk. Two identical supports (k-shot lists) give the same map."""
    written = _run(tmp_path / "out", case, organ_id=[1, 2])
    got = np.asarray(nib.load(str(written)).dataobj)
    # by hand: every support slice of organ 1 is the 5x5 square, of organ 2 the 2x2 one, and every query slice has
    # a copy in the first pass, so the extent is the whole volume
    expected = np.zeros((12, 12, 6), dtype=np.uint8)
    expected[3:8, 3:8] = 1
    expected[8:10, 8:10] = 2
    np.testing.assert_array_equal(got, expected)
    k_shot = _run(tmp_path / "k", {**case, "support_image": [case["support_image"]] * 2,
                                   "support_label": [case["support_label"]] * 2}, organ_id=[1, 2])
    np.testing.assert_array_equal(np.asarray(nib.load(str(k_shot)).dataobj), got)


@pytest.mark.parametrize("organ_id", [0, -1])
def test_organ_id_zero_or_negative_is_refused(case, tmp_path, organ_id):
    with pytest.raises(Exception) as info:
        _run(tmp_path / "out", case, organ_id=organ_id)
    text = _text(info.value)
    assert f"organ_id: {organ_id} is not a label id (a positive integer; 0 is the background)" in text
    assert not (tmp_path / "out" / "query_seg.nii.gz").exists()


def test_organ_id_absent_names_the_file_and_the_present_ids(case, tmp_path):
    with pytest.raises(Exception) as info:
        _run(tmp_path / "out", case, organ_id=5)
    text = _text(info.value)
    assert "organ id 5 absent from" in text and "support_label.nii.gz" in text and "[0, 1, 2]" in text


def test_support_label_of_another_grid_is_refused(case, tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] = 51.0  # same shape, another patient's grid 51 mm away
    other = _write(tmp_path / "data" / "other_label.nii.gz", _label(), shifted)
    with pytest.raises(Exception) as info:
        _run(tmp_path / "out", {**case, "support_label": str(other)})
    text = _text(info.value)
    assert "different voxel grids" in text and "other_label.nii.gz" in text and "support.nii.gz" in text


def test_support_label_of_another_shape_names_both_files(case, tmp_path):
    other = _write(tmp_path / "data" / "small_label.nii.gz", _label((10, 12, 6)))
    with pytest.raises(Exception) as info:
        _run(tmp_path / "out", {**case, "support_label": str(other)})
    text = _text(info.value)
    assert "spatial shape" in text and "small_label.nii.gz" in text and "support.nii.gz" in text


def test_a_failing_save_leaves_no_file_under_the_final_name(case, tmp_path, monkeypatch):
    """Stands in for a SIGKILL while saving: the writer dies after writing half of the file.

    ``Killed`` is a ``BaseException`` so that MONAI's ``SaveImage`` does not fall back to its next writer.
    """
    real_save = nib.save

    class Killed(BaseException):
        pass

    def half_save(img, filename, *args, **kwargs):
        real_save(img, filename, *args, **kwargs)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise Killed("killed while writing")

    monkeypatch.setattr(nib, "save", half_save)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        _run(out, case)
    assert not (out / "query_seg.nii.gz").exists()
    assert list(out.iterdir()) == []  # the temporary file is removed too


def test_an_existing_output_is_not_replaced_unless_overwrite(case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    annotation = out / "query_seg.nii.gz"
    annotation.write_bytes(b"an annotation, not to be lost")
    with pytest.raises(Exception) as info:
        _run(out, case)
    assert "query_seg.nii.gz already exists" in _text(info.value)
    assert annotation.read_bytes() == b"an annotation, not to be lost"
    _run(out, case, overwrite=True)
    assert np.asarray(nib.load(str(annotation)).dataobj).shape == (12, 12, 6)


def test_an_input_is_never_written_over(case, tmp_path):
    data = Path(case["query_image"]).parent
    label = _write(data / "query_seg.nii.gz", _label())  # the support label happens to be named like the output
    before = label.read_bytes()
    with pytest.raises(Exception) as info:
        _run(data, {**case, "support_label": str(label)}, overwrite=True)
    assert "it is an input file" in _text(info.value) and "query_seg.nii.gz" in _text(info.value)
    assert label.read_bytes() == before


def test_an_unwritable_output_folder_fails_before_inference(case, tmp_path, monkeypatch):
    from monai_sdfsmis.inferers import SlidingSupportInferer

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before the output folder was checked")

    monkeypatch.setattr(SlidingSupportInferer, "__call__", no_inference)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for folder in (blocker, blocker / "sub"):
        with pytest.raises(Exception) as info:
            _run(folder, case)
        text = _text(info.value)
        assert f"output folder {folder}" in text and "inference ran" not in text


def test_bundle_command_line_overwrite_flag(case, tmp_path):
    """``--overwrite True`` on the bundle command line replaces an existing output; without it: exit 1, one line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "query_seg.nii.gz").write_bytes(b"old")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
            "--output_dir", str(out), "--network_def", json.dumps(COPY), "--load_checkpoint", "False",
            "--spatial_size", "16", "--progress", "False"]
    for key, value in case.items():
        args += [f"--{key}", value]
    proc = subprocess.run([*args, "--overwrite", "True"], cwd=BUNDLE, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.asarray(nib.load(str(out / "query_seg.nii.gz")).dataobj).shape == (12, 12, 6)


# ------------------------------------------------------------------------------------------------ network_type
@pytest.fixture(scope="module")
def no_prior_model(tmp_path_factory):
    from tests.test_cli import build_no_prior_model_folder

    return build_no_prior_model_folder(tmp_path_factory.mktemp("no_prior_model"))


@requires_chaos
def test_network_type_no_prior_segments_a_chaos_volume_at_the_models_resolution(no_prior_model, tmp_path):
    """The bundle command as a user types it (no --spatial_size) gives the independently recomputed mask (at the
    stored 64 px) on the LAS grid; another --spatial_size is refused."""
    from tests.test_cli import _independent_mask

    chaos = chaos_dir()
    case = ["--query_image", str(chaos / "image_1.nii.gz"), "--support_image", str(chaos / "image_2.nii.gz"),
            "--support_label", str(chaos / "label_2.nii.gz"), "--organ_id", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--network_type", "no_prior", "--model_dir", str(no_prior_model), "--output_dir", str(out),
         "--num_threads", "1", *case],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inference: 1/1" in proc.stderr
    mask = nib.load(str(out / "image_1_seg.nii.gz"))
    assert mask.get_data_dtype() == np.uint8 and nib.aff2axcodes(mask.affine) == ("L", "A", "S")
    np.testing.assert_allclose(mask.affine, nib.load(str(chaos / "image_1.nii.gz")).affine, atol=1e-5)
    expected = _independent_mask(no_prior_model, chaos / "image_1.nii.gz", chaos / "image_2.nii.gz",
                                 chaos / "label_2.nii.gz", 1, 64)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)

    # a resolution other than the folder's is refused, before any mask is written
    refused = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--model_dir", str(no_prior_model), "--output_dir", str(tmp_path / "refused"), "--spatial_size", "128",
         "--num_threads", "1", *case],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode != 0
    assert "spatial_size 128 disagrees with the model folder" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "refused" / "image_1_seg.nii.gz").exists()


def test_network_type_that_contradicts_the_model_folder_is_one_clear_line(no_prior_model, case, tmp_path):
    with pytest.raises(Exception) as info:
        _run(tmp_path / "out", case, network_def=None, network_type="pretrained", model_dir=str(no_prior_model),
             load_checkpoint=True)
    text = _text(info.value)
    assert str(no_prior_model / "model_config.json") in text and "'no_prior' network, not 'pretrained'" in text
    assert not (tmp_path / "out" / "query_seg.nii.gz").exists()


def test_the_tiny_demo_network_is_announced_loudly(case, tmp_path, capsys, caplog):
    written = _run(tmp_path / "out", case, network_def=None, network_type="tiny", model_dir=str(tmp_path / "none"))
    assert written.is_file()
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "tiny demo model" in r.getMessage()]
    assert warnings and "meaningless on real scans" in warnings[0].getMessage()
    assert "tiny demo model" in capsys.readouterr().err  # also on stderr, whatever the logging set-up
