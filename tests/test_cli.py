"""Tests of the command line ``python -m monai_sdfsmis``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    assert f"checkpoint {tmp_path / 'none.pt'} not found" in capsys.readouterr().err
    (tmp_path / "model.pt").mkdir()
    assert main(["protocol", "--dataset_dir", str(tmp_path), "--checkpoint", str(tmp_path / "model.pt")]) == 1
    assert "model.pt is a folder, not a weights file" in capsys.readouterr().err
    # an unknown intensity preset names the flag (argparse: exit 2)
    with pytest.raises(SystemExit):
        main(["protocol", "--dataset_dir", str(tmp_path), "--intensity", "hounsfield"])
    assert "--intensity: invalid choice: 'hounsfield'" in capsys.readouterr().err


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


# ------------------------------------------------------------------------------------------------ infer and version
def build_no_prior_model_folder(folder, spatial_size: int = 64):
    """A tiny no-prior model folder written as training writes it: stage-1 ``autoencoder/`` (calibrated), then
    ``model_config.json`` (``ModelConfigSaver``, at the start) and ``model.pt`` (``AtomicCheckpointSaver``'s final
    save) from an engine run. Random weights: the tests check plumbing and geometry, not accuracy."""
    import torch
    from ignite.engine import Engine

    from monai_sdfsmis.engines import AtomicCheckpointSaver
    from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
    from monai_sdfsmis.engines.model_folder import ModelConfigSaver
    from monai_sdfsmis.networks.autoencoder import build_autoencoder, save_autoencoder
    from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = build_autoencoder("tiny", sample_size=spatial_size)
        freeze_and_calibrate(vae, torch.rand(4, 3, spatial_size, spatial_size) * 2 - 1)
    save_autoencoder(vae, folder / "autoencoder")
    net = build_no_prior_sdfsmis(folder / "autoencoder", unet_channels="tiny", seed=0)
    engine = Engine(lambda engine, batch: None)
    engine.network = net
    ModelConfigSaver(folder, network_type="no_prior", spatial_size=spatial_size, intensity="minmax").attach(engine)
    AtomicCheckpointSaver(str(folder), {"model": net}, save_final=True, final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    return folder


@pytest.fixture(scope="module")
def no_prior_model(tmp_path_factory):
    return build_no_prior_model_folder(tmp_path_factory.mktemp("no_prior_model"))


def test_version_flag_prints_the_installed_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("monai-sdfsmis")
    except PackageNotFoundError:
        pytest.skip("monai-sdfsmis is not installed (pip install -e .)")
    res = subprocess.run([sys.executable, "-m", "monai_sdfsmis", "--version"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"monai-sdfsmis {installed}"


def test_model_folder_records_the_training_network(no_prior_model):
    import json

    import torch

    config = json.loads((no_prior_model / "model_config.json").read_text())
    assert config["network_type"] == "no_prior" and config["spatial_size"] == 64 and config["intensity"] == "minmax"
    assert config["unet"]["block_out_channels"] == [16, 32, 32, 32]  # UNET_WIDTHS["tiny"]
    state = torch.load(no_prior_model / "model.pt", map_location="cpu", weights_only=True)
    assert "unet.conv_in.query.weight" in state and not any(k.startswith("vae.") for k in state)


def _independent_mask(model_dir, query, support, support_label, organ_id, spatial_size, channel=0):
    """The mask recomputed outside the inference code: nibabel reads and reorients (to RAS, and back to the file's
    own axes), the same network and inferer segment. ``channel=1``: the foreground probability instead."""
    import torch

    from monai_sdfsmis.engines.model_folder import build_network
    from monai_sdfsmis.inferers import SlidingSupportInferer
    from monai_sdfsmis.transforms.intensity import ScaleToUnitRanged

    def ras(path):
        return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.float32)

    def unit(volume):
        return ScaleToUnitRanged(keys="x", preset="minmax")({"x": torch.from_numpy(volume)[None]})["x"]

    net = build_network("no_prior", model_dir)
    net.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    net.eval()

    def organ(path):
        return torch.from_numpy((ras(path) == organ_id).astype(np.float32))[None, None]

    several = isinstance(support, (list, tuple))
    images = [unit(ras(p))[None] for p in support] if several else unit(ras(support))[None]
    organs = [organ(p) for p in support_label] if several else organ(support_label)
    inferer = SlidingSupportInferer(spatial_size=spatial_size, query_range="all", probabilities=channel == 1)
    with torch.no_grad():
        pred = inferer(unit(ras(query))[None], net, support_image=images, support_label=organs)
    pred_ras = np.asarray(pred[0, channel]).astype(np.uint8 if channel == 0 else np.float32)
    query_img = nib.load(str(query))
    to_file = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                              nib.orientations.io_orientation(query_img.affine))
    return nib.orientations.apply_orientation(pred_ras, to_file)


@requires_chaos
def test_infer_on_a_las_chaos_volume_matches_an_independent_recomputation(no_prior_model, tmp_path, capsys,
                                                                          monkeypatch):
    from monai_sdfsmis.inferers import SlidingSupportInferer

    sizes = []
    real_call = SlidingSupportInferer.__call__

    def spy(self, *args, **kwargs):
        sizes.append(self.spatial_size)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(SlidingSupportInferer, "__call__", spy)
    chaos = chaos_dir()
    out = tmp_path / "masks"
    rc = main(["infer", "--query", str(chaos / "image_1.nii.gz"), "--support", str(chaos / "image_2.nii.gz"),
               "--support_label", str(chaos / "label_2.nii.gz"), "--organ_id", "1", "--model", str(no_prior_model),
               "--output_dir", str(out), "--num_threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sizes == [64]  # the model's own training resolution, not 256, without --spatial_size
    assert [p.name for p in out.iterdir()] == ["image_1_seg.nii.gz"]
    assert "inference: 1/1" in captured.err and "1 mask written" in captured.out

    mask = nib.load(str(out / "image_1_seg.nii.gz"))
    label = nib.load(str(chaos / "label_1.nii.gz"))
    assert mask.get_data_dtype() == np.uint8 and np.asarray(mask.dataobj).dtype == np.uint8
    assert mask.shape == label.shape
    np.testing.assert_allclose(mask.affine, nib.load(str(chaos / "image_1.nii.gz")).affine, atol=1e-5)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(label.affine) == ("L", "A", "S")

    expected = _independent_mask(no_prior_model, chaos / "image_1.nii.gz", chaos / "image_2.nii.gz",
                                 chaos / "label_2.nii.gz", 1, 64)
    ours = np.asarray(mask.dataobj)
    assert 0 < expected.sum() < expected.size  # not empty nor full ...
    assert (expected != expected[::-1]).mean() > 0.01  # ... nor left-right symmetric, so a flip shows
    np.testing.assert_array_equal(ours, expected)


@requires_chaos
def test_infer_saves_probabilities_that_threshold_to_the_mask_on_the_query_grid(no_prior_model, tmp_path, capsys):
    chaos = chaos_dir()
    query, support, support_label = (chaos / f"{n}.nii.gz" for n in ("image_1", "image_2", "label_2"))
    out = tmp_path / "masks"
    args = ["infer", "--query", str(query), "--support", str(support), "--support_label", str(support_label),
            "--organ_id", "1", "--model", str(no_prior_model), "--output_dir", str(out), "--num_threads", "1"]
    assert main([*args, "--save_probabilities"]) == 0
    assert "1 mask (and their probability maps) written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["image_1_prob.nii.gz", "image_1_seg.nii.gz"]
    mask, prob = (nib.load(str(out / f"image_1_{k}.nii.gz")) for k in ("seg", "prob"))
    assert prob.get_data_dtype() == np.float32 and prob.shape == mask.shape == nib.load(str(query)).shape
    np.testing.assert_allclose(prob.affine, nib.load(str(query)).affine, atol=1e-5)  # LAS, as the query
    p = np.asarray(prob.dataobj)
    assert p.min() >= 0 and p.max() <= 1 and ((p > 0.05) & (p < 0.95)).any()  # a probability, not a mask
    np.testing.assert_array_equal(p > 0.5, np.asarray(mask.dataobj) == 1)
    expected = _independent_mask(no_prior_model, query, support, support_label, 1, 64, channel=1)
    np.testing.assert_allclose(p, expected, atol=1e-6)

    # an existing probability map is refused before anything is segmented; so is a DICOM-SEG with probabilities
    (out / "image_1_seg.nii.gz").unlink()
    assert main([*args, "--save_probabilities"]) == 1
    assert "image_1_prob.nii.gz already exists" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["image_1_prob.nii.gz"]
    assert main([*args, "--save_probabilities", "--format", "dicom_seg", "--output_dir", str(tmp_path / "d")]) == 1
    assert "--save_probabilities" in _one_line_error(capsys)


@requires_chaos
def test_infer_several_organs_writes_the_label_map_of_the_separate_calls(no_prior_model, tmp_path, capsys):
    chaos = chaos_dir()
    common = ["infer", "--query", str(chaos / "image_1.nii.gz"), "--support", str(chaos / "image_2.nii.gz"),
              "--support_label", str(chaos / "label_2.nii.gz"), "--model", str(no_prior_model), "--num_threads", "1",
              "--save_probabilities"]
    assert main([*common, "--organ_id", "1", "4", "--output_dir", str(tmp_path / "both")]) == 0
    for organ in (1, 4):
        assert main([*common, "--organ_id", str(organ), "--output_dir", str(tmp_path / str(organ))]) == 0
    capsys.readouterr()
    both = tmp_path / "both"
    assert sorted(p.name for p in both.iterdir()) == ["image_1_prob_1.nii.gz", "image_1_prob_4.nii.gz",
                                                      "image_1_seg.nii.gz"]
    labels = nib.load(str(both / "image_1_seg.nii.gz"))
    assert labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, nib.load(str(chaos / "image_1.nii.gz")).affine, atol=1e-5)
    got = np.asarray(labels.dataobj)
    masks = {o: np.asarray(nib.load(str(tmp_path / str(o) / "image_1_seg.nii.gz")).dataobj) == 1 for o in (1, 4)}
    probs = {o: np.asarray(nib.load(str(tmp_path / str(o) / "image_1_prob.nii.gz")).dataobj) for o in (1, 4)}
    expected = np.zeros_like(got)
    expected[masks[1]] = 1
    expected[masks[4] & (~masks[1] | (probs[4] > probs[1]))] = 4
    assert set(np.unique(expected)) == {0, 1, 4}
    np.testing.assert_array_equal(got, expected)
    for organ in (1, 4):
        p = np.asarray(nib.load(str(both / f"image_1_prob_{organ}.nii.gz")).dataobj)
        np.testing.assert_array_equal(p > 0.5, got == organ)


@requires_chaos
def test_infer_with_several_supports_averages_them(no_prior_model, tmp_path, capsys):
    chaos = chaos_dir()
    query = chaos / "image_1.nii.gz"
    supports = [chaos / "image_2.nii.gz", chaos / "image_3.nii.gz"]
    labels = [chaos / "label_2.nii.gz", chaos / "label_3.nii.gz"]
    common = ["infer", "--query", str(query), "--organ_id", "1", "--model", str(no_prior_model), "--num_threads", "1"]
    assert main([*common, "--support", *map(str, supports), "--support_label", *map(str, labels),
                 "--output_dir", str(tmp_path / "two")]) == 0
    assert main([*common, "--support", str(supports[0]), "--support_label", str(labels[0]),
                 "--output_dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two, one = (np.asarray(nib.load(str(tmp_path / k / "image_1_seg.nii.gz")).dataobj) for k in ("two", "one"))
    np.testing.assert_array_equal(two, _independent_mask(no_prior_model, query, supports, labels, 1, 64))
    assert (two != one).mean() > 1e-4  # the second support counts

    assert main([*common, "--support", *map(str, supports), "--support_label", str(labels[0]),
                 "--output_dir", str(tmp_path / "bad")]) == 1
    assert "got 2 --support volume(s) and 1 --support_label map(s)" in _one_line_error(capsys)
    assert not (tmp_path / "bad").exists()


def test_a_query_folder_skips_every_support_of_a_k_shot_call(tmp_path):
    from monai_sdfsmis.engines.inference import query_datalist

    for name in ("image_1", "image_2", "image_3", "label_2", "label_3"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    supports = [tmp_path / "image_2.nii.gz", tmp_path / "image_3.nii.gz"]
    labels = [tmp_path / "label_2.nii.gz", tmp_path / "label_3.nii.gz"]
    items = query_datalist(tmp_path, supports, labels)
    assert [Path(i["image"]).name for i in items] == ["image_1.nii.gz"]
    assert items[0]["support_image_2"] == str(supports[1]) and items[0]["support_label_2"] == str(labels[1])


@requires_chaos
def test_infer_takes_a_folder_or_a_datalist_and_refuses_existing_outputs_first(no_prior_model, tmp_path, capsys):
    import json

    chaos = chaos_dir()
    queries = tmp_path / "queries"
    queries.mkdir()
    for n in (1, 3):
        (queries / f"image_{n}.nii.gz").symlink_to(chaos / f"image_{n}.nii.gz")
    (queries / "label_1.nii.gz").symlink_to(chaos / "label_1.nii.gz")  # an ALPNet folder: labels are not queries
    support = ["--support", str(chaos / "image_2.nii.gz"), "--support_label", str(chaos / "label_2.nii.gz"),
               "--organ_id", "2", "--model", str(no_prior_model / "model.pt"), "--num_threads", "1"]
    out = tmp_path / "out"
    assert main(["infer", "--query", str(queries), "--output_dir", str(out), *support]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["image_1_seg.nii.gz", "image_3_seg.nii.gz"]
    assert "inference: 1/2" in err and "inference: 2/2" in err
    for n in (1, 3):
        assert nib.load(str(out / f"image_{n}_seg.nii.gz")).shape == nib.load(str(chaos / f"image_{n}.nii.gz")).shape

    # a datalist (relative paths) whose second output already exists: refused before the first is segmented
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": "queries/image_3.nii.gz"}, "queries/image_1.nii.gz"]}))
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "image_1_seg.nii.gz").write_bytes(b"an annotation")
    assert main(["infer", "--query", str(datalist), "--output_dir", str(out2), *support]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("error: ") and "image_1_seg.nii.gz already exists" in line
    assert sorted(p.name for p in out2.iterdir()) == ["image_1_seg.nii.gz"]
    assert (out2 / "image_1_seg.nii.gz").read_bytes() == b"an annotation"
    assert main(["infer", "--query", str(datalist), "--output_dir", str(out2), "--overwrite", *support]) == 0
    capsys.readouterr()
    for n in (1, 3):
        np.testing.assert_array_equal(np.asarray(nib.load(str(out2 / f"image_{n}_seg.nii.gz")).dataobj),
                                      np.asarray(nib.load(str(out / f"image_{n}_seg.nii.gz")).dataobj))


def test_infer_errors_are_one_line(no_prior_model, tmp_path, capsys):
    vol = tmp_path / "v.nii.gz"
    _write_nifti(vol, _synthetic_volume(0))
    base = ["infer", "--query", str(vol), "--support", str(vol), "--support_label", str(vol), "--organ_id", "1"]
    assert main([*base, "--model", str(tmp_path / "nowhere")]) == 1
    assert "model folder not found" in _one_line_error(capsys)
    assert main([*base, "--model", str(no_prior_model), "--network", "pretrained"]) == 1
    line = _one_line_error(capsys)
    assert "model_config.json" in line and "'no_prior' network, not 'pretrained'" in line
    assert main(["infer", "--query", str(tmp_path / "missing.nii.gz"), *base[3:], "--model", str(no_prior_model)]) == 1
    assert "missing.nii.gz not found" in _one_line_error(capsys)


def test_infer_error_met_inside_the_transforms_is_one_line(no_prior_model, tmp_path):
    # CheckLabelIdsd runs inside MONAI's Compose, which wraps its ValueError in RuntimeErrors: still one line.
    vol = tmp_path / "v.nii.gz"
    _write_nifti(vol, _synthetic_volume(0))
    label = tmp_path / "label.nii.gz"
    _write_nifti(label, (_synthetic_volume(0) > 0.5).astype(np.uint8))
    args = ["infer", "--query", str(vol), "--support", str(vol), "--support_label", str(label), "--organ_id", "9",
            "--model", str(no_prior_model), "--output_dir", str(tmp_path / "out")]
    # As a user runs it: a fresh interpreter, so that no logger of an earlier test holds a closed capture stream.
    proc = subprocess.run([sys.executable, "-m", "monai_sdfsmis", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("sd_fsmis error: organ id 9 absent from") and str(label) in line
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@requires_chaos
def test_protocol_command_evaluates_a_no_prior_model(no_prior_model, tmp_path, capsys):
    import json

    out = tmp_path / "results"
    rc = main(["protocol", "--dataset_dir", str(chaos_dir()), "--folds", "0", "--organs", "2", "--overlays", "0",
               "--checkpoint", str(no_prior_model / "model.pt"), "--network", "no_prior", "--output_dir", str(out),
               "--no_progress", "--num_threads", "1", "--flip_axes", "0", "--postprocess", "largest_component"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    results = json.loads((out / "protocol_results.json").read_text())
    assert results["inference"]["flip_axes"] == [0] and results["inference"]["postprocess"] == ["largest_component"]
    rows = results["methods"]["SD-FSMIS"]["rows"]
    cases = sorted((r["support_id"], r["query_id"]) for r in rows)
    assert len(rows) == 4 and cases == sorted((r["support_id"], r["query_id"]) for r in
                                              results["methods"]["support-mask copy"]["rows"])
    assert all(r["organ"] == "right_kidney" and 0.0 <= r["dice"] <= 1.0 for r in rows)


def test_a_checkpoint_of_another_network_is_one_line_naming_the_file(no_prior_model, tmp_path, capsys):
    import shutil

    # the weights of a no-prior model, in a folder without model_config.json, loaded as the tiny demo network
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shutil.copy(no_prior_model / "model.pt", folder / "model.pt")
    rc = main(["protocol", "--dataset_dir", str(tmp_path), "--checkpoint", str(folder / "model.pt"),
               "--network", "tiny", "--num_threads", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tiny demo model" in err  # the demo network is announced
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(err.strip().splitlines()[-1]) < 800
    assert str(folder / "model.pt") in errors[0] and "weights do not match the tiny network" in errors[0]
    assert "of another shape" in errors[0] and "unet.conv_in.query.weight" in errors[0]


def _uninstalled(folder):
    """A folder that, first on ``sys.path``, makes numba, itk and tensorboard fail to import as if not installed."""
    for name in ("numba", "itk", "tensorboard"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ModuleNotFoundError({name!r}, name={name!r})\n")
    return folder


def test_core_works_without_the_extras_and_names_the_extra_where_needed(tmp_path):
    """With numba, itk and tensorboard unimportable: the package imports, NIfTI loads, and the features that need
    them fail with one line naming the extra."""
    vol = tmp_path / "image_1.nii.gz"
    _write_nifti(vol, _synthetic_volume(0))
    nrrd = tmp_path / "v.nrrd"
    nrrd.write_bytes(b"NRRD0004\n")
    blocker = _uninstalled(tmp_path / "uninstalled")
    script = f"""
import sys
sys.path.insert(0, {str(blocker)!r})
import monai_sdfsmis.data, monai_sdfsmis.engines, monai_sdfsmis.networks
from monai_sdfsmis.extras import MissingExtraError, tensorboard_available
from monai_sdfsmis.transforms.io import load_volume
assert load_volume({str(vol)!r}).shape == (1, 28, 24, 6)
try:
    load_volume({str(nrrd)!r})
except MissingExtraError as err:
    print('NRRD:', err)
print('TB:', tensorboard_available())
from monai_sdfsmis.__main__ import main
sys.exit(main(['supervoxels', '--dataset_dir', {str(tmp_path)!r}, '--no_progress']))
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f'NRRD: reading {nrrd} needs itk, which is not installed: pip install "monai-sdfsmis[itk]"' in res.stdout
    assert "TB: False" in res.stdout and 'pip install "monai-sdfsmis[tensorboard]"' in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        'error: computing supervoxels needs numba, which is not installed: pip install "monai-sdfsmis[supervoxels]"'
    )
    assert not (tmp_path / "supervoxels_5000" / "superpix-MIDDLE_1.nii.gz").exists()


def test_infer_on_a_no_prior_folder_without_its_config_says_what_to_pass(no_prior_model, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(no_prior_model, folder)
    (folder / "model_config.json").unlink()
    query = tmp_path / "q.nii.gz"
    _write_nifti(query, _synthetic_volume(1))
    rc = main(["infer", "--query", str(query), "--support", str(query), "--support_label", str(query),
               "--organ_id", "1", "--model", str(folder), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (
        f"error: {folder} has no model_config.json but holds autoencoder/: it looks like a no-prior model folder; "
        "pass --network no_prior (network_type 'no_prior'), or train it with python -m monai_sdfsmis train")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("held_out, message", [
    (["--fold", "0"], r"--fold 0: RPT folds exist for 20 \(CHAOS T2-SPIR\) or 30 \(Synapse/BTCV\) volumes, and .* has 2; "
                      r"choose the held-out volumes with --holdout"),
    (["--holdout", "2"], r"--holdout \[2\]: .* has 2 volumes \(indices 0-1\)"),
    (["--holdout", "0", "1"], "holds out all 2 volumes"),
])
def test_train_refuses_a_held_out_set_the_dataset_cannot_have_before_any_work(synthetic_dataset, tmp_path, capsys,
                                                                              held_out, message):
    rc = main(["train", "--dataset_dir", str(synthetic_dataset), "--output_dir", str(tmp_path / "run"), *held_out])
    assert rc == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (synthetic_dataset / "supervoxels_5000").exists()  # refused before supervoxels were computed
    assert not (tmp_path / "run").exists()
