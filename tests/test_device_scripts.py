"""The prepared GPU-machine scripts in ``benchmarks/device/``, rehearsed on the CPU with tiny widths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO_ROOT, link_chaos_subset, requires_chaos

DEVICE_DIR = REPO_ROOT / "benchmarks" / "device"


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # The scripts call python3, as on the GPU machine: here, the interpreter running the tests (a venv's, say).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(["bash", str(DEVICE_DIR / script), *args], env={**os.environ, "PATH": path, **env},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@requires_chaos
def test_all_folds_script_runs_folds_concurrently_and_merges(tmp_path):
    data = link_chaos_subset(tmp_path / "chaos6", volumes=(1, 2, 3, 5, 8, 10))
    out, runs = tmp_path / "out", tmp_path / "runs"
    tiny = ("--preset cpu --set spatial_size=64 ae_width=tiny unet_width=tiny ae_iterations=2 iterations=2 "
            "ae_batch_size=2 batch_size=2 calibration_slices=8 num_workers=0 surface_metrics=false n_overlays=0 "
            "num_threads=1 folds=[[0,1,2],[3,4,5]]")
    env = {"OUT": str(out), "RUN_DIR": str(runs), "DATASET_DIR": str(data), "FOLDS": "0 1", "DEADLINE": "300",
           "EXTRA_ARGS": tiny, "WHEEL_DIR": str(tmp_path / "no_wheels")}
    result = _run("no_prior_h100.sh", env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    merged = json.loads((out / "results.json").read_text())
    assert merged["folds_done"] == [0, 1]
    assert {r["fold"] for r in merged["fold_records"]} == {0, 1}
    assert all(r["training"]["segmenter"]["iterations"] == 2 for r in merged["fold_records"])
    assert merged["note"].startswith("2 fold(s) trained at the same time")
    assert "Note: 2 fold(s) trained at the same time" in (out / "results.md").read_text()
    for name in ("nvidia-smi.txt", "runs.tar.gz"):
        assert (out / name).is_file()
    assert (runs / "fold_0.log").is_file() and (runs / "fold_1" / "fold_1" / "results.json").is_file()


@requires_chaos
def test_all_folds_script_reports_folds_stopped_at_the_deadline(tmp_path):
    data = link_chaos_subset(tmp_path / "chaos4")
    env = {"OUT": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "runs"), "DATASET_DIR": str(data), "FOLDS": "0",
           "DEADLINE": "3", "EXTRA_ARGS": "--preset cpu --set ae_width=tiny ae_iterations=100000 spatial_size=64 num_workers=0",
           "WHEEL_DIR": str(tmp_path / "no_wheels")}
    result = _run("no_prior_h100.sh", env)
    assert result.returncode == 1
    assert "folds that did not finish: 0" in result.stdout and "no fold finished" in result.stdout
    assert (tmp_path / "out" / "runs.tar.gz").is_file()
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("script", ["no_prior_h100.sh", "stage.sh"])
def test_scripts_name_a_missing_dataset(tmp_path, script):
    missing = tmp_path / "nowhere"
    if script == "stage.sh":
        result = _run(script, {}, str(missing))
    else:
        result = _run(script, {"OUT": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "runs"),
                               "DATASET_DIR": str(missing), "WHEEL_DIR": str(tmp_path / "no_wheels")})
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_speed_script_rehearsed_on_cpu_keeps_finished_runs_when_one_fails(tmp_path):
    # Each run of the GPU script, with the tiny network on the CPU; the compile run with the tracing-only backend.
    out = tmp_path / "out"
    env = {"OUT": str(out), "WHEEL_DIR": str(tmp_path / "no_wheels"),
           "COMMON_ARGS": "--cpu --tiny --size 64 --slices 4 --reference_slices 2 --batch 2 --threads 1",
           "SD15_ARGS": "--train --train_batches 1 --train_iterations 1",
           "NO_PRIOR_ARGS": "--model bogus",  # rejected by the argument check: this run fails
           "COMPILE_ARGS": "--compile --compile_backend eager"}
    result = _run("speed_gpu.sh", env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no_prior: exit 2" in result.stdout
    for name in ("sd15", "sd15_compile"):
        saved = json.loads((out / name / "results.json").read_text())
        assert saved["comparison"]["ok"] and saved["fast_volume"]["slices"] == 4
    compiled = json.loads((out / "sd15_compile" / "results.json").read_text())
    assert compiled["config"]["compile"] and compiled["compile_s"] is not None
    assert json.loads((out / "sd15" / "results.json").read_text())["training"][0]["batch"] == 1
    summary = (out / "summary.md").read_text()
    assert summary.count("# SD-FSMIS speed") == 2 and "torch.compile (UNet + VAE, backend eager)" in summary
    assert not (out / "no_prior").exists() and (out / "nvidia-smi.txt").is_file()
