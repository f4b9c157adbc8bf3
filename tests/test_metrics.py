"""Empty predictions are scored with a stated penalty and counted, not dropped from the means."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch
from monai.data import DataLoader, MetaTensor

from monai_sdfsmis.engines import (
    ProtocolEvaluator,
    ProtocolResultsSaver,
    SpacedHausdorffDistanceMetric,
    SpacedSurfaceDistanceMetric,
    format_table,
    rows_to_csv,
    summarize,
    volume_metrics,
)
from monai_sdfsmis.engines.metrics import empty_prediction_distance
from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.networks.support_copy import SupportMaskCopy

SHAPE = (10, 20, 5)
SPACING = (1.25, 1.25, 7.7)  # CHAOS T2-SPIR voxels (mm)
#: The penalty written out: the diagonal of a 12.5 x 25 x 38.5 mm box.
PENALTY = math.sqrt((10 * 1.25) ** 2 + (20 * 1.25) ** 2 + (5 * 7.7) ** 2)


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    label = torch.zeros(SHAPE, dtype=torch.bool)
    label[2:8, 5:15, 1:4] = True
    pred = torch.zeros_like(label)
    pred[3:8, 5:15, 1:4] = True  # one voxel (1.25 mm) short along the first axis
    return pred, label


def _row(query_id: str, metrics: dict) -> dict:
    return {"method": "m", "fold": 0, "organ_id": 1, "organ": "liver", "support_id": "s", "query_id": query_id,
            **metrics}


def test_penalty_is_the_diagonal_of_the_volume():
    assert empty_prediction_distance(SHAPE, SPACING) == pytest.approx(PENALTY)
    assert empty_prediction_distance((3, 4), None) == pytest.approx(5.0)
    assert empty_prediction_distance((3, 4, 12), 2.0) == pytest.approx(26.0)
    with pytest.raises(ValueError, match="one value per spatial axis"):
        empty_prediction_distance(SHAPE, (1.0, 1.0))


def test_volume_metrics_penalize_an_empty_prediction():
    pred, label = _masks()
    empty = volume_metrics(torch.zeros_like(label), label, SPACING)
    assert empty == {"dice": 0.0, "hd95": pytest.approx(PENALTY), "assd": pytest.approx(PENALTY),
                     "empty_prediction": True}
    normal = volume_metrics(pred, label, SPACING)
    assert normal["empty_prediction"] is False and 0.0 < normal["hd95"] < PENALTY and 0.0 < normal["assd"] < PENALTY
    spurious = volume_metrics(pred, torch.zeros_like(label), SPACING)  # organ predicted where there is none
    assert spurious["dice"] == 0.0 and spurious["hd95"] == pytest.approx(PENALTY) and not spurious["empty_prediction"]
    both = volume_metrics(torch.zeros_like(label), torch.zeros_like(label), SPACING)
    assert all(math.isnan(both[k]) for k in ("dice", "hd95", "assd")) and not both["empty_prediction"]


def test_table_mean_counts_the_empty_prediction_with_its_penalty():
    pred, label = _masks()
    normal = volume_metrics(pred, label, SPACING)
    rows = [_row("1", volume_metrics(torch.zeros_like(label), label, SPACING)), _row("2", normal)]
    summary = summarize(rows)
    # Before the penalty, the empty case was NaN and the mean was the normal case's value alone.
    assert summary["hd95"]["mean"] == pytest.approx((PENALTY + normal["hd95"]) / 2)
    assert summary["assd"]["mean"] == pytest.approx((PENALTY + normal["assd"]) / 2)
    assert summary["dice"]["mean"] == pytest.approx(normal["dice"] / 2)
    assert summary["n_empty"] == 1 and summary["n_empty_per_organ"] == {"liver": 1}
    assert summary["n_empty_per_fold"] == {"0": {"liver": 1, "total": 1}}
    assert summary["hd95"]["n_undefined"] == 0

    text = format_table({"m": rows}, metric="hd95")
    lines = text.splitlines()
    assert lines[2] == f"| m (fold 0) | {(PENALTY + normal['hd95']) / 2:.2f} | {(PENALTY + normal['hd95']) / 2:.2f} |"
    assert lines[3] == ""  # the note is outside the Markdown table
    assert lines[4].startswith("m: 1 of 2 predictions empty (ground truth not); HD95 of an empty prediction counted as")
    assert "1 of 2 predictions empty" in format_table({"m": summary}, metric="dice")

    table = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert [r["empty_prediction"] for r in table] == ["True", "False"]
    assert summarize(table, metrics=["dice"])["n_empty"] == 1  # rows read back from the CSV


def test_undefined_cases_are_counted():
    label = torch.zeros(SHAPE, dtype=torch.bool)
    pred, real = _masks()
    rows = [_row("1", volume_metrics(label, label, SPACING)), _row("2", volume_metrics(pred, real, SPACING))]
    summary = summarize(rows)
    assert summary["n_empty"] == 0 and summary["hd95"]["n_undefined"] == 1 and summary["dice"]["n_undefined"] == 1
    note = format_table({"m": summary}, metric="assd").splitlines()[-1]
    assert note == ("m: 0 of 2 predictions empty (ground truth not); ASSD of an empty prediction counted as the "
                    "volume's diagonal, sqrt(sum((shape * spacing)^2)) mm; 1 of 2 cases with no ASSD value "
                    "(prediction and ground truth both empty, or not computed), left out of the means.")
    old = {k: v for k, v in summary.items() if not k.startswith("n_empty")}  # a summary saved before the count
    assert "predictions empty" not in format_table({"m": old}, metric="dice")


def test_ignite_metrics_use_the_penalty_of_each_item():
    pred, label = _masks()
    zero = torch.zeros_like(label)
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    y = MetaTensor(torch.stack([label, label, zero])[:, None].float(), affine=affine)
    y_pred = torch.stack([zero, pred, zero])[:, None].float()
    normal = volume_metrics(pred, label, SPACING)
    for metric, key in ((SpacedHausdorffDistanceMetric(reduction="none"), "hd95"),
                        (SpacedSurfaceDistanceMetric(reduction="none"), "assd")):
        values = metric(y_pred, y).flatten()
        assert values[0].item() == pytest.approx(PENALTY, rel=1e-6)  # empty prediction: inf/NaN in MONAI
        assert values[1].item() == pytest.approx(normal[key], rel=1e-5)
        assert math.isnan(values[2].item())  # both empty: undefined
    unit = SpacedHausdorffDistanceMetric()(zero[None, None].float(), label[None, None].float(), spacing=2.0)
    assert float(unit) == pytest.approx(2 * math.sqrt(10**2 + 20**2 + 5**2))


class _PredictNothing(SupportMaskCopy):
    """A network that never finds the organ."""

    @staticmethod
    def binarize(soft: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(soft, dtype=torch.bool)


def test_evaluator_rows_flag_and_penalize_an_empty_prediction():
    _, label = _masks()
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.linspace(-1, 1, label.numel()).reshape(1, *SHAPE), affine=affine)
    mask = MetaTensor(label[None].float(), affine=affine)
    item = {"image": image, "label": mask, "support_image": image.clone(), "support_label": mask.clone(),
            "fold": 0, "organ_id": 1, "organ": "liver", "support_id": "s", "query_id": "q"}
    rows = {}
    for name, net in (("nothing", _PredictNothing()), ("copy", SupportMaskCopy())):
        saver = ProtocolResultsSaver(method=name)
        ProtocolEvaluator(device="cpu", val_data_loader=DataLoader([item], batch_size=1), network=net,
                          inferer=SlidingSupportInferer(n_chunks=1, spatial_size=16), val_handlers=[saver]).run()
        rows[name] = saver.rows[0]
    assert rows["nothing"]["empty_prediction"] is True and rows["copy"]["empty_prediction"] is False
    assert rows["nothing"]["dice"] == 0.0
    assert rows["nothing"]["hd95"] == pytest.approx(PENALTY, rel=1e-6)
    assert rows["nothing"]["assd"] == pytest.approx(PENALTY, rel=1e-6)
    assert rows["copy"]["hd95"] < PENALTY
    assert summarize([rows["nothing"], dict(rows["copy"], query_id="q2")])["n_empty"] == 1


def test_table_title_says_which_folds_it_averages():
    from monai_sdfsmis.engines.tables import folds_title

    def row(fold: int) -> dict:
        return {"method": "m", "fold": fold, "organ_id": 1, "organ": "liver", "support_id": "3", "query_id": "1",
                "dice": 0.5, "hd95": 1.0, "assd": 1.0}

    assert folds_title("Dice (%)", {"m": [row(0)]}) == "Dice (%), fold 0"
    assert folds_title("Dice (%)", {"m": [row(0), row(2)], "b": [row(1)]}) == "Dice (%), mean over folds 0, 1, 2"
