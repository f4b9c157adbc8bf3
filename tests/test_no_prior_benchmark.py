"""The no-prior benchmark's learning curve, shared time budget, latent cache and stage-1 reuse, on real CHAOS volumes."""

from __future__ import annotations

import json

from tests.test_no_prior import _load_benchmark as _load
from tests.utils import link_chaos_subset, requires_chaos

SIZE = 64


@requires_chaos
def test_learning_curve_cache_and_reused_autoencoder(tmp_path):
    data = link_chaos_subset(tmp_path / "chaos4")
    bench = _load("no_prior_protocol")
    out = tmp_path / "run"
    common = ["--dataset_dir", str(data), "--width", "tiny", "--folds", "0", "--fold_definition", "[[0, 1, 2]]",
              "--spatial_size", str(SIZE), "--num_workers", "0", "--no_progress", "--threads", "1"]
    # An evaluation point that the first segmenter iteration already passes: the curve gets it plus the final one.
    bench.main(common + ["--output_dir", str(out), "--ae_iters", "4", "--seg_iters", "4", "--eval_at_minutes", "1e-6"])
    record = json.loads((out / "results.json").read_text())["fold_records"][0]
    curve = record["learning_curve"]
    assert [c["target_minutes"] for c in curve] == [1e-6, None]
    assert curve[0]["segmenter_iterations"] == 1 and curve[1]["segmenter_iterations"] == 4
    assert 0 <= curve[0]["dice"]["mean"] <= 1 and (out / "fold_0" / "protocol_1e-06min").is_dir()
    # The evaluations are not training time: the stage-2 loop time excludes them.
    assert record["timing"]["stage2_loop_seconds"] < record["timing"]["stage2_seconds"] + curve[0]["evaluation_seconds"]
    cache = record["segmenter"]["latent_cache"]
    assert cache is not None and cache["entries"] > 0 and 0 <= cache["hit_rate"] <= 1
    assert record["segmenter"]["stopped_by"] == "iterations" and record["segmenter"]["episodes_per_second"] > 0
    markdown = (out / "results.md").read_text()
    assert "Learning curve of fold 0" in markdown and "episodes/s" in markdown and "latent cache hit rate" in markdown

    # Stage 2 alone on the saved autoencoder, no cache, posterior samples (recalibrated on samples).
    reused = tmp_path / "reused"
    bench.main(common + ["--output_dir", str(reused), "--autoencoder", str(out / "fold_0" / "autoencoder"),
                         "--seg_iters", "2", "--no_latent_cache", "--vae_sample", "--no_augment"])
    second = json.loads((reused / "results.json").read_text())["fold_records"][0]
    assert second["autoencoder"]["reused_from"] == str(out / "fold_0" / "autoencoder")
    assert second["autoencoder"]["iterations"] == 0 and second["segmenter"]["latent_cache"] is None
    assert second["autoencoder"]["scaling_factor"] != record["autoencoder"]["scaling_factor"]  # samples, not means
    assert not (reused / "fold_0" / "autoencoder").exists()  # the reused folder is not copied or overwritten


def test_latent_cache_speed_script_runs_its_three_passes(tmp_path):
    speed = _load("latent_cache_speed")
    data = link_chaos_subset(tmp_path / "chaos4")
    results = speed.main(["--dataset_dir", str(data), "--spatial_size", str(SIZE), "--ae_width", "tiny",
                          "--unet_width", "tiny", "--iters", "2", "--batch", "2", "--threads", "1", "--volumes", "all"])
    assert set(results) == {"no cache", "cache, cold", "cache, warm"}
    assert results["no cache"]["hit_rate"] == 0 and results["cache, warm"]["hit_rate"] == 1.0
