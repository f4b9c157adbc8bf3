from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from PIL import Image

from monai_sdfsmis.data.layouts import find_alpnet_volumes
from monai_sdfsmis.engines import (
    OverlaySaver,
    ProtocolDataset,
    ProtocolEvaluator,
    ProtocolResultsSaver,
    SpacedHausdorffDistanceMetric,
    SpacedSurfaceDistanceMetric,
    evaluate_protocol,
    format_table,
    protocol_items,
    summarize,
    volume_metrics,
    write_json,
    write_rows_csv,
)
from monai_sdfsmis.engines.overlays import overlay_size
from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.networks.support_copy import SupportMaskCopy
from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

#: Support-mask-copy Dice on CHAOS T2-SPIR fold 0 (support image_3, queries 1, 2, 5, 8), measured with
#: this protocol; the 5-fold mean is 48.62 (the issue quotes 48.6).
FOLD0_COPY_DICE = {"liver": 0.51478, "right_kidney": 0.44868, "left_kidney": 0.48500, "spleen": 0.22758}


def _copy_dice(support_label: np.ndarray, query_label: np.ndarray) -> float:
    """RPT's evaluation protocol written out for the copy baseline (independent of the package)."""
    s_slices = np.flatnonzero(support_label.any(axis=(0, 1)))
    picks = [s_slices[int((1 / 6 + k / 3) * len(s_slices))] for k in range(3)]
    q_slices = np.flatnonzero(query_label.any(axis=(0, 1)))
    edges = np.linspace(0, len(q_slices), 4).astype(int)
    tp = fp_fn = 0
    for j in range(3):
        for d in q_slices[edges[j] : edges[j + 1]]:
            pred, gt = support_label[..., picks[j]], query_label[..., d]
            tp += np.logical_and(pred, gt).sum()
            fp_fn += pred.sum() + gt.sum()
    return 2 * tp / fp_fn


@requires_chaos
def test_protocol_items_follow_the_rpt_folds():
    items = protocol_items(find_alpnet_volumes(chaos_dir()), fold_ids=[0, 4])
    assert len(items) == 2 * 4 * 4
    fold0 = [i for i in items if i["fold"] == 0]
    assert {i["support_id"] for i in fold0} == {"3"}
    assert [i["query_id"] for i in fold0[:4]] == ["1", "2", "5", "8"]
    assert [i["organ"] for i in fold0[::4]] == ["liver", "right_kidney", "left_kidney", "spleen"]
    fold4 = [i for i in items if i["fold"] == 4]  # [0, 16, 17, 18, 19] -> ids 1, 36, 37, 38, 39
    assert {i["support_id"] for i in fold4} == {"37"}
    assert [i["query_id"] for i in fold4[:4]] == ["1", "36", "38", "39"]


@requires_chaos
def test_copy_baseline_fold0_all_organs_and_files(tmp_path):
    result = evaluate_protocol(
        None, chaos_dir(), fold_ids=[0], output_dir=tmp_path, overlays=1, surface_metrics=False, progress=False
    )
    rows = result["methods"]["support-mask copy"]["rows"]
    summary = result["methods"]["support-mask copy"]["summary"]
    assert len(rows) == 16
    dataset = ProtocolDataset(chaos_dir(), fold_ids=[0])
    store = dataset.store
    for row in rows:
        expected = _copy_dice(store.label(row["support_id"]) == row["organ_id"], store.label(row["query_id"]) == row["organ_id"])
        assert row["dice"] == pytest.approx(expected, abs=1e-6)
    for organ, dice in FOLD0_COPY_DICE.items():
        assert summary["dice"]["per_organ"][organ] == pytest.approx(dice, abs=1e-4)
    assert summary["dice"]["mean"] == pytest.approx(np.mean(list(FOLD0_COPY_DICE.values())), abs=1e-4)

    with open(result["files"]["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 16 and table[0]["method"] == "support-mask copy" and table[0]["hd95"] == ""
    assert float(table[0]["dice"]) == pytest.approx(rows[0]["dice"])
    content = json.loads((tmp_path / "protocol_results.json").read_text())
    assert content["methods"]["support-mask copy"]["summary"]["dice"]["per_fold"]["0"]["mean"] == pytest.approx(
        summary["dice"]["mean"]
    )
    markdown = (tmp_path / "protocol_table.md").read_text()
    assert "| Method | Spleen | Liver | LK | RK | Mean |" in markdown
    assert "| support-mask copy (fold 0) | 22.76 | 51.48 | 48.50 | 44.87 | 41.90 |" in markdown
    pngs = result["files"]["overlays"]
    assert len(pngs) == 16 and all(p.endswith(".png") for p in pngs)
    with Image.open(pngs[0]) as png:
        assert png.size == overlay_size(256, 256) and png.mode == "RGB"  # tests/test_overlays.py checks the layout
    assert not [p for p in tmp_path.rglob(".*.tmp")]


@requires_chaos
def test_surface_metrics_are_in_millimetres(tmp_path):
    dataset = ProtocolDataset(chaos_dir(), fold_ids=[0], organ_ids=[3])
    item = dataset[0]
    assert item["image"].shape == item["label"].shape and item["image"].shape[0] == 1
    assert item["support_id"] == "3" and item["query_id"] == "1" and item["organ"] == "left_kidney"
    spacing = dataset.store.spacing("1")
    np.testing.assert_allclose(spacing, (1.25, 1.25, 7.7), rtol=1e-3)
    assert torch.allclose(item["label"].affine.diagonal()[:3].float(), torch.tensor(spacing, dtype=torch.float32))

    saver = ProtocolResultsSaver(output_dir=tmp_path, method="copy")
    evaluator = ProtocolEvaluator(
        device="cpu",
        val_data_loader=DataLoader(torch.utils.data.Subset(dataset, [0]), batch_size=1),
        network=SupportMaskCopy(),
        val_handlers=[saver],
    )
    evaluator.run()
    row = saver.rows[0]
    pred = SlidingSupportInferer()(
        item["image"][None], SupportMaskCopy(), support_image=item["support_image"][None],
        support_label=item["support_label"][None], query_label=item["label"][None],
    )
    expected = volume_metrics(pred[0], item["label"], spacing)
    unit = volume_metrics(pred[0], item["label"], None)
    for key in ("dice", "hd95", "assd"):
        assert row[key] == pytest.approx(expected[key], rel=1e-4)
    assert row["hd95"] != pytest.approx(unit["hd95"])  # the spacing is used
    assert evaluator.state.metrics["val_hd95"] == pytest.approx(row["hd95"], rel=1e-4)
    written = json.loads((tmp_path / "protocol_copy.json").read_text())
    assert written["rows"][0]["query_id"] == "1" and written["summary"]["n_cases"] == 1
    assert (tmp_path / "protocol_copy_cases.csv").read_text().startswith("method,fold,organ_id,organ")


@requires_chaos
def test_tiny_sdfsmis_through_the_evaluator(tmp_path):
    sdfsmis = pytest.importorskip("monai_sdfsmis.networks.sdfsmis")
    net = sdfsmis.SDFSMIS.tiny(seed=0).eval()
    dataset = ProtocolDataset(chaos_dir(), fold_ids=[0], organ_ids=[2])
    item = dataset[0]
    organ = item["label"][0].flatten(0, 1).any(dim=0).nonzero().flatten()
    # keep two organ slices of the query and of the support so the CPU run stays short
    q = slice(max(int(organ[0]) - 1, 0), int(organ[0]) + 2)
    s_organ = item["support_label"][0].flatten(0, 1).any(dim=0).nonzero().flatten()
    s = slice(int(s_organ[0]), int(s_organ[0]) + 2)
    small = {
        **item,
        "image": item["image"][..., q],
        "label": item["label"][..., q],
        "support_image": item["support_image"][..., s],
        "support_label": item["support_label"][..., s],
    }
    saver = ProtocolResultsSaver(output_dir=tmp_path, method="SD-FSMIS tiny")
    overlays = OverlaySaver(tmp_path / "png", method="SD-FSMIS tiny", n_slices=1)
    evaluator = ProtocolEvaluator(
        device="cpu",
        val_data_loader=DataLoader([small], batch_size=1),
        network=net,
        inferer=SlidingSupportInferer(n_chunks=1),
        val_handlers=[saver, overlays],
    )
    evaluator.run()
    row = saver.rows[0]
    assert row["method"] == "SD-FSMIS tiny" and row["organ"] == "right_kidney" and row["fold"] == 0
    assert 0.0 <= row["dice"] <= 1.0
    assert len(overlays.written) == 1 and overlays.written[0].parent.name == "SD-FSMIS_tiny"
    assert (tmp_path / "protocol_SD-FSMIS_tiny_cases.csv").exists()


def _rows():
    rows = []
    values = {  # fold -> organ -> per-query Dice
        0: {"liver": [0.8, 0.6], "spleen": [0.5, 0.3]},
        1: {"liver": [0.9, 0.9], "spleen": [0.1, 0.3]},
    }
    for fold, organs in values.items():
        for organ, dices in organs.items():
            for q, dice in enumerate(dices):
                hd = float("nan") if (fold, organ, q) == (1, "spleen", 0) else 10.0 * (q + 1)  # NaN: undefined
                rows.append({"method": "m", "fold": fold, "organ_id": 1, "organ": organ, "support_id": "s",
                             "query_id": str(q), "dice": dice, "hd95": hd, "assd": 1.0})
    return rows


def test_summarize_follows_the_paper_aggregation():
    summary = summarize(_rows())
    dice = summary["dice"]
    assert dice["per_fold"]["0"] == pytest.approx({"liver": 0.7, "spleen": 0.4, "mean": 0.55})
    assert dice["per_fold"]["1"] == pytest.approx({"liver": 0.9, "spleen": 0.2, "mean": 0.55})
    assert dice["per_organ"] == pytest.approx({"liver": 0.8, "spleen": 0.3})
    assert dice["mean"] == pytest.approx(0.55)
    assert summary["hd95"]["per_fold"]["1"]["spleen"] == pytest.approx(20.0)  # NaN (undefined) left out...
    assert summary["hd95"]["n_undefined"] == 1 and summary["dice"]["n_undefined"] == 0  # ...and counted
    assert summary["n_empty"] == 0  # rows without the empty_prediction field
    assert summary["n_cases"] == 8 and summary["folds"] == [0, 1]
    with pytest.raises(ValueError, match="No protocol rows"):
        summarize([])


def test_format_table_has_the_paper_layout():
    dice = {"liver": 0.7, "right_kidney": 0.75, "left_kidney": 0.65, "spleen": 0.4}
    rows = [
        {"method": "m", "fold": f, "organ_id": 0, "organ": organ, "support_id": "s", "query_id": str(q),
         "dice": value + (0.1 if q else -0.1), "hd95": 5.0, "assd": 1.0}
        for f in range(5) for organ, value in dice.items() for q in range(2)
    ]
    better = [dict(r, dice=r["dice"] + 0.1) for r in rows]
    text = format_table({"support-mask copy": rows, "SD-FSMIS": summarize(better)}, title="Abd-MRI")
    lines = text.strip().splitlines()
    assert lines[0] == "Abd-MRI"
    assert lines[1] == "| Method | Spleen | Liver | LK | RK | Mean |"
    assert lines[2] == "|---|---|---|---|---|---|"
    assert lines[3] == "| support-mask copy | 40.00 | 70.00 | 65.00 | 75.00 | 62.50 |"
    assert lines[4] == "| SD-FSMIS | 50.00 | 80.00 | 75.00 | 85.00 | 72.50 |"
    partial = format_table({"m": _rows()}, metric="hd95", digits=1)
    assert partial.splitlines()[0] == "| Method | Spleen | Liver | Mean |"
    assert partial.splitlines()[2] == "| m (folds 0, 1) | 17.5 | 15.0 | 16.2 |"
    with pytest.raises(ValueError, match="at least one method"):
        format_table({})
    with pytest.raises(ValueError, match="Unknown metric"):
        format_table({"m": _rows()}, metric="iou")


def test_result_files_are_strict_and_atomic(tmp_path):
    rows = _rows()
    csv_path = write_rows_csv(tmp_path / "out" / "rows.csv", rows)
    json_path = write_json(tmp_path / "out" / "rows.json", {"rows": rows, "x": float("inf")})
    text = csv_path.read_text()
    assert text.splitlines()[0] == "method,fold,organ_id,organ,support_id,query_id,dice,hd95,assd,empty_prediction"
    assert ",,1.0," in text  # NaN HD95 as an empty cell
    content = json.loads(json_path.read_text())  # strict JSON: no NaN/Infinity tokens
    assert content["x"] is None and content["rows"][6]["hd95"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rows.csv", "rows.json"]


def test_volume_metrics_and_spaced_metrics():
    gt = torch.zeros(20, 20, 10, dtype=torch.bool)
    gt[5:15, 5:15, 2:8] = True
    pred = torch.zeros_like(gt)
    pred[7:15, 5:15, 2:8] = True  # 2 voxels short along the first axis
    unit = volume_metrics(pred, gt)
    assert unit["dice"] == pytest.approx(2 * 480 / (480 + 600))
    assert 0.0 < unit["hd95"] <= 2.0  # no surface point is farther than the 2-voxel shortfall
    doubled = volume_metrics(pred, gt, (2.0, 2.0, 2.0))  # isotropic spacing scales every distance
    assert doubled["hd95"] == pytest.approx(2 * unit["hd95"]) and doubled["assd"] == pytest.approx(2 * unit["assd"])
    assert doubled["dice"] == unit["dice"]
    scaled = volume_metrics(pred, gt, (3.0, 1.0, 1.0))
    assert scaled["hd95"] > unit["hd95"] and scaled["assd"] > unit["assd"]
    empty = volume_metrics(torch.zeros_like(gt), gt)
    diagonal = math.sqrt(20**2 + 20**2 + 10**2)  # the penalty: the volume's diagonal at unit spacing
    assert empty["dice"] == 0.0 and empty["hd95"] == pytest.approx(diagonal) and empty["assd"] == pytest.approx(diagonal)
    assert empty["empty_prediction"] and not unit["empty_prediction"]
    with pytest.raises(ValueError, match="same shape"):
        volume_metrics(pred[..., :5], gt)

    affine = torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    y_pred = MetaTensor(pred[None, None].float(), affine=affine)
    y = MetaTensor(gt[None, None].float(), affine=affine)
    hd = SpacedHausdorffDistanceMetric()(y_pred, y)
    asd = SpacedSurfaceDistanceMetric()(y_pred, y)
    assert float(hd) == pytest.approx(scaled["hd95"]) and float(asd) == pytest.approx(scaled["assd"])
    penalty = SpacedHausdorffDistanceMetric()(torch.zeros_like(y.as_tensor()), y.as_tensor())
    assert float(penalty) == pytest.approx(diagonal)  # empty prediction: the penalty, not inf/NaN
    nan = SpacedHausdorffDistanceMetric()(torch.zeros_like(y.as_tensor()), torch.zeros_like(y.as_tensor()))
    assert torch.isnan(nan).all()  # both empty: undefined, skipped by mean reductions


def test_bad_requests_raise(tmp_path):
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        evaluate_protocol(None, [], baseline=False)


@requires_chaos
def test_missing_organ_names_the_label_file():
    dataset = ProtocolDataset(chaos_dir(), fold_ids=[0], organ_ids=[9])
    with pytest.raises(ValueError, match=r"label_1\.nii\.gz.*organ label 9"):
        dataset[0]


@requires_chaos
def test_results_saver_gathers_the_cases_of_every_process(tmp_path):
    """torchrun, 2 CPU processes: each evaluates part of 5 cases; every rank ends with all 5 rows, rank 0 writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               str(REPO_ROOT / "tests" / "dist_protocol_worker.py"), str(chaos_dir()), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    ranks = [json.loads((tmp_path / f"rank{r}_rows.json").read_text()) for r in (0, 1)]
    assert [r["local_cases"] for r in ranks] == [3, 2]
    assert ranks[0]["rows"] == ranks[1]["rows"]
    written = json.loads((tmp_path / "protocol_copy.json").read_text())
    assert written["summary"]["n_cases"] == 5

    # The same cases in one process give the same per-case Dice.
    dataset = torch.utils.data.Subset(ProtocolDataset(chaos_dir(), fold_ids=[0], organ_ids=[2, 3]), range(5))
    saver = ProtocolResultsSaver(method="copy")
    ProtocolEvaluator(device="cpu", val_data_loader=DataLoader(dataset, batch_size=1), network=SupportMaskCopy(),
                      val_handlers=[saver], surface_metrics=False).run()

    def by_case(rows):
        return {(r["organ"], r["query_id"]): r["dice"] for r in rows}

    single = by_case(saver.rows)
    assert len(single) == 5
    assert by_case(written["rows"]) == pytest.approx(single, rel=1e-6)
