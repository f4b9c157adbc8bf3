"""The no-prior mode through the bundle, run as a user types it: the README's quick start (the training recipe
``no_prior.json`` on phantoms, both stages and one evaluation from one command), and its model folder in ``infer``."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_bundle import _bundle_cli, _env, _overrides
from tests.utils import REPO_ROOT

# The README's main job: both stages, then one evaluation, from one command.
QUICKSTART = "['configs/train.json','configs/quickstart.json','configs/no_prior.json','configs/quickstart_no_prior.json']"


def test_no_prior_quickstart_as_the_readme_runs_it_ends_in_its_table(tmp_path):
    """The README command at reduced size (fewer iterations, output in tmp): stage 1, stage 2, one evaluation; the
    folder it writes loads in infer, which says that it is a demo."""
    readme = (REPO_ROOT / "README.md").read_text()
    command = f'(cd bundles/sd_fsmis && python -m monai.bundle run training --config_file "{QUICKSTART}")'
    assert command in readme, "the README's main job is not this quick start"
    out = tmp_path / "run"
    proc = _bundle_cli(
        "run", "training", "--config_file", QUICKSTART,
        *_overrides({"output_dir": str(out), "ae_iterations": 3, "calibration_slices": 8, "iterations": 3}),
    )
    assert proc.returncode == 0
    # SD-FSMIS is evaluated once: two protocol runs (the baseline, then the model), no validation during training.
    assert (proc.stdout + proc.stderr).count("ProtocolEvaluator - INFO - Engine run finished") == 2
    table = (out / "evaluation" / "final" / "protocol_table.md").read_text()
    assert table.rstrip() in proc.stdout.replace("\r", "")
    rows = [line.split("|")[1].strip() for line in table.splitlines() if "(fold 0) |" in line]
    assert rows == ["support-mask copy (fold 0)", "SD-FSMIS no-prior (fold 0)"] * 3
    assert (out / "models" / "autoencoder" / "calibration.json").is_file()
    assert sorted(p.name for p in (out / "models").glob("*.pt")) == ["checkpoint_iteration=3.pt", "model.pt"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"support-mask copy", "SD-FSMIS no-prior"}
    config = json.loads((out / "models" / "model_config.json").read_text())
    assert config["network_type"] == "no_prior" and config["spatial_size"] == 64
    assert config["training"]["dataset"]["phantoms"] is True
    assert config["training"]["segmenter"]["iterations"] == 3 and config["training"]["autoencoder"]["iterations"] == 3

    phantoms = out / "phantoms"
    infer = subprocess.run(
        [sys.executable, "-m", "monai_sdfsmis", "infer", "--query", str(phantoms / "image_1.nii.gz"),
         "--support", str(phantoms / "image_4.nii.gz"), "--support_label", str(phantoms / "label_4.nii.gz"),
         "--organ_id", "1", "--model", str(out / "models"), "--output_dir", str(tmp_path / "masks")],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert "WARNING: this model is a demo: it was trained on synthetic phantoms" in infer.stderr
    assert (tmp_path / "masks" / "image_1_seg.nii.gz").is_file()


def test_the_tiny_quickstart_alone_records_its_network_type(tmp_path):
    """configs/quickstart.json alone trains the tiny SD-FSMIS: its folder says 'tiny', and infer --network tiny takes it."""
    out = tmp_path / "run"
    proc = _bundle_cli(
        "run", "training", "--config_file", "['configs/train.json','configs/quickstart.json']",
        *_overrides({"output_dir": str(out), "iterations": 1, "ckpt_interval": 1, "spatial_size": 64, "n_phantoms": 4}),
        "--run", "['$@train::trainer.run()']",
    )
    assert proc.returncode == 0
    config = json.loads((out / "models" / "model_config.json").read_text())
    assert config["network_type"] == "tiny"
    phantoms = out / "phantoms"
    infer = subprocess.run(
        [sys.executable, "-m", "monai_sdfsmis", "infer", "--query", str(phantoms / "image_1.nii.gz"),
         "--support", str(phantoms / "image_3.nii.gz"), "--support_label", str(phantoms / "label_3.nii.gz"),
         "--organ_id", "1", "--model", str(out / "models"), "--network", "tiny", "--output_dir", str(tmp_path / "m")],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert "tiny demo model" in infer.stderr
