"""The no-prior training recipe as a user runs it: ``python -m monai_sdfsmis train`` (the bundle's train.json +
no_prior.json), the model folder it writes, ``infer`` and ``evaluate.json`` loading that folder with no other flag,
and the warnings a user must see (a demo model, training cut short, an empty mask)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_sdfsmis.engines.model_folder import model_warnings
from tests.utils import REPO_ROOT

BUNDLE = REPO_ROOT / "bundles" / "sd_fsmis"
# Small enough for a test: 64 px, toy widths, a few iterations, no loader workers, no time budget.
TINY = ["spatial_size=64", "ae_width=tiny", "unet_width=tiny", "ae_iterations=3", "ae_batch_size=4",
        "calibration_slices=8", "batch_size=2", "num_workers=0", "total_minutes=null", "surface_metrics=false",
        "n_overlays=0", "progress=false"]


# The 15-minute candidates of the recipe, switched on in the one end-to-end run: a 4x autoencoder, the weighted loss,
# and the 3D clean-up stored in the model folder for inference.
CANDIDATES = ["ae_downsampling=4", "foreground_weight=4", 'postprocess=["largest_component"]', "amp_on_cpu=true"]
# The network works at 32 px on the 64 px phantoms: every evaluation path must measure on the labels' own grid.
NETWORK_SIZE = ["spatial_size=32"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", SDFSMIS_NUM_THREADS="1")


def _cli(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "monai_sdfsmis", *args], cwd=cwd or REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from monai_sdfsmis.data import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root, n_volumes=6, shape=(64, 64, 16), seed=0)
    return root


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    """One short recipe run: volumes 1-3 held out (labelled, so the protocol runs at the end)."""
    out = tmp_path_factory.mktemp("run")
    proc = _cli("train", "--dataset_dir", str(phantoms), "--output_dir", str(out), "--holdout", "0", "1", "2",
                "--iterations", "3", "--set", *TINY, *CANDIDATES, *NETWORK_SIZE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_writes_a_model_folder_with_its_provenance(trained, phantoms):
    out, proc = trained
    model = out / "model"
    assert sorted(p.name for p in model.iterdir()) == ["autoencoder", "model.pt", "model_config.json"]
    config = json.loads((model / "model_config.json").read_text())
    assert config["network_type"] == "no_prior" and config["spatial_size"] == 32
    assert config["unet"]["block_out_channels"] == [16, 32, 32, 32]
    assert config["postprocess"] == ["largest_component"] and config["settings"]["foreground_weight"] == 4.0
    autoencoder = json.loads((model / "autoencoder" / "config.json").read_text())
    assert autoencoder["block_out_channels"] == [8, 16, 16]  # AUTOENCODER_WIDTHS["tiny"], first three levels: 4x
    training = config["training"]
    assert training["dataset"] == {"path": str(phantoms.resolve()), "volumes": 6, "phantoms": True,
                                   "training_volumes": ["4", "5", "6"]}
    assert training["folds"] == [[0, 1, 2]] and training["threads"] == 1
    assert training["autoencoder"]["iterations"] == training["autoencoder"]["planned_iterations"] == 3
    assert training["segmenter"]["iterations"] == training["segmenter"]["planned_iterations"] == 3
    assert training["segmenter"]["stopped_by"] == "iterations"
    assert training["settings"]["unet_width"] == "tiny" and training["monai_sdfsmis_version"]
    assert training["settings"]["ae_downsampling"] == 4 and training["budget_minutes"] is None  # --set KEY=null kept
    assert training["settings"]["amp_on_cpu"] is True
    # the end of the run: the protocol on the held-out volumes, the results file, one summary line and where to go
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"support-mask copy", "SD-FSMIS no-prior"} and results["test_ids"] == ["1", "2", "3"]
    assert 0.0 <= results["autoencoder_check"]["organ_mask_dice"] <= 1.0
    assert (out / "evaluation" / "final" / "protocol_table.md").is_file()
    lines = proc.stdout.strip().splitlines()
    summary = [line for line in lines if line.startswith("training done:")]
    assert len(summary) == 1 and "stage 1 3/3 iterations, stage 2 3/3 iterations (stopped by iterations)" in summary[0]
    assert str(model) in summary[0] and "episodes/s" in summary[0]
    assert lines[-2] == f"train: model folder {model}; segment a scan with:"
    # 3 iterations are far below what the recipe needs: said at the end of training
    assert "WARNING: training was cut short: stage 2 (segmenter) ran 3 iterations, fewer than the 300" in proc.stdout
    assert "WARNING: this model is a demo: it was trained on synthetic phantoms" in proc.stdout


def test_infer_loads_the_trained_folder_with_no_other_flag(trained, phantoms, tmp_path):
    out, _ = trained
    proc = _cli("infer", "--query", str(phantoms / "image_1.nii.gz"), "--support", str(phantoms / "image_2.nii.gz"),
                "--support_label", str(phantoms / "label_2.nii.gz"), "--organ_id", "1", "--model", str(out / "model"),
                "--output_dir", str(tmp_path / "masks"))
    assert proc.returncode == 0
    mask = nib.load(str(tmp_path / "masks" / "image_1_seg.nii.gz"))
    assert mask.shape == nib.load(str(phantoms / "image_1.nii.gz")).shape and mask.get_data_dtype() == np.uint8
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:")]
    assert any("demo: it was trained on synthetic phantoms" in w for w in warnings)
    assert any("cut short: stage 2 (segmenter) ran 3 iterations" in w for w in warnings)
    assert "1 mask written" in proc.stdout


def test_a_run_stopped_far_below_its_planned_iterations_says_so(phantoms, tmp_path):
    """A budget of 3 seconds for 100000 planned iterations: stopped by time, recorded and warned about."""
    out = tmp_path / "short"
    settings = [s for s in TINY if not s.startswith("total_minutes")] + ["total_minutes=0.05", "ae_iterations=2"]
    proc = _cli("train", "--dataset_dir", str(phantoms), "--output_dir", str(out), "--iterations", "100000",
                "--set", *settings)
    assert proc.returncode == 0
    segmenter = json.loads((out / "model" / "model_config.json").read_text())["training"]["segmenter"]
    assert segmenter["stopped_by"] == "time" and segmenter["planned_iterations"] == 100000
    assert segmenter["iterations"] < 50000
    assert f"stage 2 (segmenter) ran {segmenter['iterations']} of 100000 planned iterations (stopped by time;" in proc.stdout
    # nothing was held out: no evaluation, and the run says why
    assert "evaluation skipped: 0 test volume(s) held out" in proc.stdout
    assert not (out / "evaluation").exists()


def test_model_warnings_read_the_training_record():
    assert model_warnings({}) == []
    trained_well = {"training": {"dataset": {"phantoms": False},
                                 "segmenter": {"iterations": 1000, "planned_iterations": None, "min_useful_iterations": 300},
                                 "autoencoder": {"iterations": 240, "planned_iterations": 240}}}
    assert model_warnings(trained_well) == []
    half = {"training": {"autoencoder": {"iterations": 119, "planned_iterations": 240, "stopped_by": "time"}}}
    assert model_warnings(half) == [
        "WARNING: training was cut short: stage 1 (autoencoder) ran 119 of 240 planned iterations (stopped by time; "
        "model_config.json); its masks may be poor"]
    assert model_warnings({"training": {"autoencoder": {"iterations": 120, "planned_iterations": 240}}}) == []


def test_evaluate_json_takes_the_size_from_the_folder_and_refuses_another(trained, phantoms, tmp_path):
    out, _ = trained
    common = ["run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--dataset_dir", str(phantoms),
              "--ckpt_dir", str(out / "model"), "--folds", "[[0,1,2]]", "--n_overlays", "0"]
    refused = subprocess.run([sys.executable, "-m", "monai.bundle", *common, "--output_dir", str(tmp_path / "e1"),
                              "--spatial_size", "128"], cwd=BUNDLE, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert "spatial_size 128 disagrees with the model folder" in last and "model_config.json" in last
    assert "trained at 32" in last and "Traceback" not in refused.stderr
    assert not (tmp_path / "e1" / "evaluation").exists()

    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *common, "--output_dir", str(tmp_path / "e2")],
                          cwd=BUNDLE, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "e2" / "evaluation" / "fold_0" / "protocol_table.md").read_text()
    # the same network (32 px) as the recipe's own final evaluation, both measured against the 64 px labels: the same
    # Dice, case by case
    recipe = json.loads((out / "results.json").read_text())["rows"]
    evaluated = json.loads((tmp_path / "e2" / "evaluation" / "fold_0" / "protocol_results.json").read_text())

    def dice(rows):
        return sorted((r["query_id"], r["organ"], round(r["dice"], 6)) for r in rows)

    assert dice(evaluated["methods"]["SD-FSMIS"]["rows"]) == dice(recipe["SD-FSMIS no-prior"])
    assert len(recipe["SD-FSMIS no-prior"]) == 8 and "SD-FSMIS" in table
    assert dice(evaluated["methods"]["support-mask copy"]["rows"]) == dice(recipe["support-mask copy"])


def test_an_empty_mask_is_written_and_said(trained, phantoms, tmp_path):
    """A model whose decoder draws only background (its last convolution set to a constant -5): the mask is all
    zeros, and infer says so on its own line and in its summary."""
    import torch

    from monai_sdfsmis.networks.autoencoder import load_autoencoder, save_autoencoder

    model = tmp_path / "model"
    shutil.copytree(trained[0] / "model", model)
    vae = load_autoencoder(model / "autoencoder")
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.fill_(-5.0)
    shutil.rmtree(model / "autoencoder")
    save_autoencoder(vae, model / "autoencoder")
    proc = _cli("infer", "--query", str(phantoms / "image_1.nii.gz"), "--support", str(phantoms / "image_2.nii.gz"),
                "--support_label", str(phantoms / "label_2.nii.gz"), "--organ_id", "3", "--model", str(model),
                "--output_dir", str(tmp_path / "masks"))
    assert proc.returncode == 0
    written = tmp_path / "masks" / "image_1_seg.nii.gz"
    assert not np.asarray(nib.load(str(written)).dataobj).any()
    assert (f"WARNING: empty mask: no voxel of organ 3 found in {phantoms / 'image_1.nii.gz'} ({written} holds only "
            "zeros)") in proc.stderr
    assert proc.stdout.strip().endswith("infer: 1 mask written to " + str(tmp_path / "masks")
                                        + ", 1 empty: no voxel of organ 3 found")


def test_train_computes_missing_supervoxels_and_refuses_to_replace_a_model(phantoms, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for n in (1, 2, 3):
        shutil.copy(phantoms / f"image_{n}.nii.gz", scans / f"image_{n}.nii.gz")
    out = tmp_path / "run"
    proc = _cli("train", "--dataset_dir", str(scans), "--output_dir", str(out), "--iterations", "2",
                "--set", *TINY, "supervoxel_min_size=300")
    assert proc.returncode == 0
    assert sorted(p.name for p in (scans / "supervoxels_5000").iterdir()) == [
        f"superpix-MIDDLE_{n}.nii.gz" for n in (1, 2, 3)]
    assert "supervoxels: computing 3 of 3 volumes" in proc.stdout
    before = (out / "model" / "model.pt").read_bytes()
    again = _cli("train", "--dataset_dir", str(scans), "--output_dir", str(out), "--iterations", "2", "--set", *TINY)
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {out / 'model'} already holds a trained model; choose another --output_dir (or --resume)"
    assert (out / "model" / "model.pt").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--minutes", "0"], "--minutes must be positive, got 0"),
        (["--set", "preset=laptop"], "preset 'laptop' is not one of ['cpu', 'gpu']"),
        (["--set", "spatial_size"], "--set 'spatial_size': expected KEY=VALUE"),
    ],
)
def test_train_refuses_bad_settings_in_one_line(phantoms, tmp_path, args, message):
    proc = _cli("train", "--dataset_dir", str(phantoms), "--output_dir", str(tmp_path / "out"), *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in proc.stderr


def test_loss_curve_averages_tenths_of_training():
    from monai_sdfsmis.engines.recipe import loss_curve

    assert loss_curve([1.0, 2.0, 3.0, 4.0], points=2) == [1.5, 3.5]
    assert loss_curve(list(range(100))) == [4.5 + 10 * k for k in range(10)]
    assert loss_curve([5.0]) == [5.0] and loss_curve([]) == []


def test_training_clock_shares_one_budget_and_pauses():
    import time

    from monai_sdfsmis.engines.recipe import TrainingClock

    clock = TrainingClock(total_minutes=1)
    assert clock.share_seconds(0.25) == 15.0 and clock.seconds() == 0.0
    clock.start()
    with clock.paused():
        time.sleep(0.2)
    assert clock.seconds() < 0.1 and 59.9 < clock.remaining_seconds() <= 60.0
    assert TrainingClock(None).remaining_seconds() is None and TrainingClock(None).share_seconds(0.5) is None
    spent = TrainingClock(total_minutes=1e-3)
    spent.start()
    time.sleep(0.1)
    with pytest.raises(ValueError, match="stage 1 used the whole budget"):
        spent.remaining_seconds()
    with pytest.raises(ValueError, match="total_minutes must be positive"):
        TrainingClock(0)


def test_recipe_keys_presets_and_a_dataset_length_that_no_iteration_count_sets():
    from monai.bundle import ConfigParser

    def parsed(**values):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "no_prior.json")])
        for key, value in values.items():
            parser[key] = value
        return parser

    for iterations in (3, 30000, None):
        assert parsed(iterations=iterations).get_parsed_content("train::dataset::length") == 10**7
    cpu, gpu = parsed(), parsed(preset="gpu")
    assert [cpu.get_parsed_content(k) for k in ("spatial_size", "unet_width", "batch_size", "total_minutes")] == [
        128, "small", 8, 60]
    assert [gpu.get_parsed_content(k) for k in ("spatial_size", "unet_width", "batch_size", "total_minutes")] == [
        256, "default", 16, 10]
    assert parsed(preset="gpu", spatial_size=192).get_parsed_content("spatial_size") == 192  # a key beats the preset


def test_a_few_shot_model_without_a_support_is_one_line(trained, phantoms, tmp_path):
    out, _ = trained
    proc = _cli("infer", "--query", str(phantoms / "image_1.nii.gz"), "--organ_id", "1", "--model", str(out / "model"),
                "--output_dir", str(tmp_path / "masks"))
    assert proc.returncode != 0
    assert "is a few-shot (no_prior) model: give an annotated example with --support" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "masks").exists() or not any((tmp_path / "masks").iterdir())
