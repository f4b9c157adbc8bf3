"""The no-prior benchmark (a fold loop over the product's train command, and the merge) and the latent-cache speed script."""

from __future__ import annotations

import json

import pytest

from tests.test_no_prior import _load_benchmark as _load
from tests.utils import link_chaos_subset, requires_chaos

SIZE = 64


@requires_chaos
def test_benchmark_runs_the_product_command_per_fold_and_merges(tmp_path):
    """Two folds of 4 real CHAOS volumes through `python -m monai_sdfsmis train` (tiny widths, 64 px), a learning-curve
    point, the merge, a fold that is not run twice, and the merge of folders made at different times."""
    data = link_chaos_subset(tmp_path / "chaos6", volumes=(1, 2, 3, 5, 8, 10))
    bench = _load("no_prior_protocol")
    out = tmp_path / "run"
    tiny = ["spatial_size=64", "ae_width=tiny", "unet_width=tiny", "ae_iterations=3", "iterations=4", "ae_batch_size=2",
            "batch_size=2", "calibration_slices=8", "num_workers=0", "num_threads=1", "surface_metrics=false",
            "n_overlays=0", "progress=false", "folds=[[0,1,2],[3,4,5]]"]
    args = ["--dataset_dir", str(data), "--output_dir", str(out), "--eval_at_minutes", "1e-6", "--set", *tiny]
    assert bench.fold_command(bench.parse_args(args + ["--folds", "0"]), 0)[1:5] == [
        "-m", "monai_sdfsmis", "train", "--dataset_dir"]
    results = bench.main(args + ["--folds", "0", "--note", "nothing else ran"])
    record = results["fold_records"][0]
    assert results["folds_done"] == [0] and record["test_ids"] == ["1", "2", "3"]
    # The figures are the product's: the train command's own results.json, unchanged.
    assert record == json.loads((out / "fold_0" / "results.json").read_text())
    assert record["training"]["segmenter"]["iterations"] == 4 and record["training"]["dataset"]["training_volumes"] == [
        "5", "8", "10"]
    curve = record["learning_curve"]
    assert len(curve) == 2 and curve[0]["segmenter_iterations"] == 1 and curve[1]["segmenter_iterations"] == 4
    assert (out / "fold_0" / "evaluation" / "at_1e-06min" / "protocol_table.md").is_file()
    markdown = (out / "results.md").read_text()
    assert "| support-mask copy" in markdown and "| SD-FSMIS no-prior" in markdown and "Note: nothing else ran." in markdown
    assert "How each fold was trained" in markdown and "Learning curves" in markdown

    # inference variants on the trained fold model, through the protocol command
    variants = _load("inference_variants").main([
        "--dataset_dir", str(data), "--output_dir", str(tmp_path / "variants"), "--models",
        f"0={out / 'fold_0' / 'model'}", "--num_threads", "1", "--fold_volumes", "[[0,1,2],[3,4,5]]",
        "--variant", "raw=--postprocess none",
        "--variant", "flip=--flip_axes 0 --postprocess largest_component"])
    runs = {name: json.loads((tmp_path / "variants" / name / "fold_0" / "protocol_results.json").read_text())
            for name in ("raw", "flip")}
    assert runs["flip"]["inference"]["flip_axes"] == [0] and runs["raw"]["inference"]["flip_axes"] == []
    for name, run in runs.items():  # each organ's figure is the mean of the protocol's own rows, recomputed here
        rows = next(v["rows"] for m, v in run["methods"].items() if m != "support-mask copy")
        for organ, value in variants["summaries"][name]["dice"]["per_organ"].items():
            assert value == pytest.approx(sum(r["dice"] for r in rows if r["organ"] == organ)
                                          / sum(r["organ"] == organ for r in rows))
    # the raw variant re-scores the train command's own final evaluation: the same masks, the same figures
    trained = {(r["organ"], r["query_id"]): r["dice"] for r in record["rows"]["SD-FSMIS no-prior"]}
    rescored = {(r["organ"], r["query_id"]): r["dice"]
                for r in runs["raw"]["methods"]["SD-FSMIS"]["rows"]}
    assert rescored == pytest.approx(trained)
    assert "| flip | `--flip_axes 0 --postprocess largest_component` |" in (tmp_path / "variants" / "results.md").read_text()

    # k-shot as a variant: its copy (the vote of two supports' masks) differs from the 1-shot copy, and gets its row
    kshot = _load("inference_variants").main([
        "--dataset_dir", str(data), "--output_dir", str(tmp_path / "kshot"), "--models", f"0={out / 'fold_0' / 'model'}",
        "--num_threads", "1", "--fold_volumes", "[[0,1,2],[3,4,5]]", "--variant", "k1=", "--variant", "k2=--shots 2",
        "--variant", "k2net=--shots 2 --support_fusion network"])
    # the fused variant's copy is the same vote as k2's (the copy always averages), so it gets no row of its own
    assert {"support-mask copy", "support-mask copy (k2)", "k1", "k2", "k2net"} == set(kshot["summaries"])
    assert kshot["summaries"]["k2net"] != kshot["summaries"]["k2"]
    k2 = json.loads((tmp_path / "kshot" / "k2" / "fold_0" / "protocol_results.json").read_text())
    assert k2["inference"]["shots"] == 2 and {r["support_id"] for r in k2["methods"]["SD-FSMIS"]["rows"]} == {
        "3+1", "3+2"}

    # several organs in one infer call against one call per organ, scored from the written files
    import nibabel as nib
    import numpy as np

    multi_out = tmp_path / "multi"
    multi = _load("multi_organ").main([
        "--dataset_dir", str(data), "--model", str(out / "fold_0" / "model"), "--support", "3", "--queries", "1", "2",
        "--organs", "1", "2", "--output_dir", str(multi_out), "--num_threads", "1"])
    written = np.asarray(nib.load(str(multi_out / "together" / "image_2_seg.nii.gz")).dataobj) == 2
    truth = np.asarray(nib.load(str(data / "label_2.nii.gz")).dataobj) == 2
    by_hand = 2 * (written & truth).sum() / (written.sum() + truth.sum())
    assert multi["dice"]["one call"]["2"]["2"] == pytest.approx(by_hand)
    assert set(multi["seconds"]["one call per organ"]) == {1, 2}
    assert (multi_out / "organ_1" / "image_1_seg.nii.gz").is_file() and (multi_out / "results.md").is_file()

    # fold 0 is not trained again; fold 1 goes into another folder and the two merge
    other = tmp_path / "other"
    bench.main(["--dataset_dir", str(data), "--output_dir", str(other), "--folds", "1", "--set", *tiny])
    again = bench.main(args + ["--folds", "0"])
    assert again["fold_records"][0]["training"]["date"] == record["training"]["date"]
    merged = bench.main(["--merge", str(out), str(other), "--output_dir", str(tmp_path / "merged")])
    assert merged["folds_done"] == [0, 1]
    assert set(merged["summaries"]["SD-FSMIS no-prior"]["dice"]["per_fold"]) == {"0", "1"}
    with pytest.raises(FileNotFoundError, match="no evaluated fold"):
        bench.main(["--merge", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "m2")])


def test_latent_cache_speed_script_runs_its_three_passes(tmp_path):
    speed = _load("latent_cache_speed")
    data = link_chaos_subset(tmp_path / "chaos4")
    results = speed.main(["--dataset_dir", str(data), "--spatial_size", str(SIZE), "--ae_width", "tiny",
                          "--unet_width", "tiny", "--iters", "2", "--batch", "2", "--threads", "1", "--volumes", "all"])
    assert set(results) == {"no cache", "cache, cold", "cache, warm"}
    assert results["no cache"]["hit_rate"] == 0 and results["cache, warm"]["hit_rate"] == 1.0
