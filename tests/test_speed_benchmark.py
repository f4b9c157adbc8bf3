"""``benchmarks/speed.py`` in its CPU mode with small networks (no timing claims: only that it runs, reports
consistently and fails when the fast path drifts from the reference)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.utils import REPO_ROOT


def _speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", REPO_ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--cpu", "--size", "64", "--slices", "6", "--reference_slices", "3", "--batch", "4", "--threads", "1"]


def test_tiny_cpu_mode_reports_inference_and_training(tmp_path):
    speed = _speed()
    result = speed.main(["--tiny", *SMALL, "--train", "--train_batches", "1", "2", "--train_iterations", "1",
                         "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"] == {**result["config"]} and saved["config"]["model"] == "tiny"
    assert "Tiny test network" in (tmp_path / "results.md").read_text()
    volume, call = saved["fast_volume"], saved["fast_call"]
    assert volume["slices"] == 6 and call["batch"] == 4
    assert volume["ms_per_slice_end_to_end"] == pytest.approx(1e3 * volume["volume_s"] / 6)
    flops = saved["flops"]
    assert flops["query_slice_gflop"] > 0 and flops["support_gflop"] > 0
    assert flops["volume_tflop"] == pytest.approx((3 * flops["support_gflop"] + 6 * flops["query_slice_gflop"]) / 1e3)
    assert "volume_40_s_extrapolated" in saved and "extrapolated from 6 measured slices" in (tmp_path / "results.md").read_text()
    cmp_ = saved["comparison"]
    assert cmp_["ok"] and cmp_["slices"] == 3 and cmp_["max_abs_diff"] <= 2e-3  # fp32 fast path on CPU
    assert [t["batch"] for t in saved["training"]] == [1, 2] and all(t["s_per_episode"] > 0 for t in saved["training"])
    assert saved["training_best"]["batch"] in (1, 2)


def test_fast_path_with_the_wrong_support_fails_the_comparison(tmp_path, monkeypatch):
    speed = _speed()
    pairs = speed.protocol_pairs
    # the reference uses a neighbouring support slice: the fast path (right slice) must then be "beyond tolerance"
    monkeypatch.setattr(speed, "protocol_pairs", lambda case, n: [(d, z + 1) for d, z in pairs(case, n)])
    with pytest.raises(SystemExit) as stop:
        speed.main(["--tiny", *SMALL, "--output_dir", str(tmp_path)])
    assert stop.value.code == 1
    assert not json.loads((tmp_path / "results.json").read_text())["comparison"]["ok"]


def test_protocol_pairs_follow_the_rpt_chunks():
    speed = _speed()
    case = speed.synthetic_case(32, 9)
    # support organ slices 2..9 (8 slices): RPT middles int((1/6) * 8), int(0.5 * 8), int((5/6) * 8) -> 1, 4, 6
    picks = [2 + 1, 2 + 4, 2 + 6]
    assert speed.protocol_pairs(case, 9) == [(d, picks[d // 3]) for d in range(9)]


def test_no_prior_model_builds_and_runs(tmp_path):
    speed = _speed()
    result = speed.main(["--model", "no_prior", "--ae_width", "tiny", "--unet_width", "tiny", *SMALL[:-4],
                         "--reference_slices", "1", "--threads", "1"])
    assert result["config"]["model"] == "no_prior" and result["comparison"]["ok"]
    assert result["parameters_m"]["unet"] < 5
    torch.set_num_threads(1)
