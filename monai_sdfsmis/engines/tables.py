"""Aggregate per-case protocol results the way the paper reports them, and write them to disk.

A *row* is one (fold, organ, query volume) case of one method: a dict with the keys of
:data:`ROW_FIELDS`. Aggregation follows the RPT/ADNet protocol: organ score of a fold = mean over the
fold's query volumes; fold score = mean over organs; the reported score = mean over folds (with one fold, that
fold's score: :func:`folds_title` says which it is).

An empty prediction is scored, not dropped: Dice 0, HD95/ASSD the volume's diagonal
(:func:`monai_sdfsmis.engines.metrics.empty_prediction_distance`), and every summary and table states how
many predictions were empty (``empty_prediction`` rows) and how many values were undefined (NaN, left out
of the means).
"""

from __future__ import annotations

__all__ = ["folds_title", "ROW_FIELDS", "ORGAN_COLUMNS", "summarize", "format_table", "rows_to_csv", "write_rows_csv", "write_json"]

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from monai_sdfsmis.utils import atomic_write

#: Columns of a per-case row, in CSV order (distances in mm; Dice as a fraction; ``empty_prediction``: the
#: prediction is empty while the ground truth is not).
ROW_FIELDS: tuple[str, ...] = (
    "method", "fold", "organ_id", "organ", "support_id", "query_id", "dice", "hd95", "assd", "empty_prediction"
)
#: Paper Table 1 column order and headings; organs not listed here follow in their own name.
ORGAN_COLUMNS: dict[str, str] = {"spleen": "Spleen", "liver": "Liver", "left_kidney": "LK", "right_kidney": "RK"}
_METRICS = ("dice", "hd95", "assd")


def _undefined(value: Any) -> bool:
    return value is None or value == "" or math.isnan(float(value))


def _mean(values: Sequence[float]) -> float:
    # Only undefined values (both masks empty, or not computed) are skipped; summarize counts them.
    finite = [float(v) for v in values if not _undefined(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _flag(value: Any) -> bool:
    # Rows read back from CSV hold "True"/"False"; rows written before the field existed lack it.
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if value is not None else False


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = _METRICS) -> dict[str, Any]:
    """Protocol summary of one method's rows.

    Parameters
    ----------
    rows
        Per-case rows (keys of :data:`ROW_FIELDS`; a missing ``empty_prediction`` counts as not empty).
    metrics
        Row fields to aggregate.

    Returns
    -------
    dict
        ``{"n_cases": N, "folds": [...], "organs": [...], "n_empty": E, "n_empty_per_fold": {fold: {organ: e, ...,
        "total": e}}, "n_empty_per_organ": {organ: e}, metric: {"per_fold": {fold: {organ: v, ..., "mean": v}},
        "per_organ": {organ: v}, "mean": v, "n_undefined": u}}`` for each metric; fold keys are strings
        (JSON-ready). ``n_empty`` counts the cases whose prediction is empty while the ground truth is not:
        they are in every mean (Dice 0, HD95/ASSD the volume's diagonal). ``n_undefined`` counts the NaN/``None``
        values of the metric (prediction and ground truth both empty, or the metric not computed), the only
        values left out of its means.
    """
    if not rows:
        raise ValueError("No protocol rows to summarize.")
    folds = sorted({int(r["fold"]) for r in rows})
    organs: list[str] = []
    for r in rows:
        if r["organ"] not in organs:
            organs.append(str(r["organ"]))
    empty = [(int(r["fold"]), str(r["organ"])) for r in rows if _flag(r.get("empty_prediction"))]
    empty_per_fold = {
        str(fold): {**{o: empty.count((fold, o)) for o in organs}, "total": sum(f == fold for f, _ in empty)}
        for fold in folds
    }
    summary: dict[str, Any] = {
        "n_cases": len(rows),
        "folds": folds,
        "organs": organs,
        "n_empty": len(empty),
        "n_empty_per_fold": empty_per_fold,
        "n_empty_per_organ": {o: sum(organ == o for _, organ in empty) for o in organs},
    }
    for metric in metrics:
        per_fold: dict[str, dict[str, float]] = {}
        for fold in folds:
            entry = {}
            for organ in organs:
                values = [r[metric] for r in rows if int(r["fold"]) == fold and r["organ"] == organ]
                if values:
                    entry[organ] = _mean(values)
            entry["mean"] = _mean(list(entry.values()))
            per_fold[str(fold)] = entry
        per_organ = {o: _mean([f[o] for f in per_fold.values() if o in f]) for o in organs}
        summary[metric] = {
            "per_fold": per_fold,
            "per_organ": per_organ,
            "mean": _mean([f["mean"] for f in per_fold.values()]),
            "n_undefined": sum(_undefined(r.get(metric)) for r in rows),
        }
    return summary


def folds_title(metric_title: str, summaries: Mapping[str, Any]) -> str:
    """``"Dice (%), fold 0"`` or ``"Dice (%), mean over folds 0, 1, 2"``: a table title that says what it averages."""
    folds = sorted({int(f) for s in summaries.values() for f in _as_summary(s)["folds"]})
    if len(folds) == 1:
        return f"{metric_title}, fold {folds[0]}"
    return f"{metric_title}, mean over folds {', '.join(str(f) for f in folds)}"


def _as_summary(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping) and "n_cases" in value:
        return value
    return summarize(list(value))


def format_table(
    results_by_method: Mapping[str, Any], metric: str = "dice", digits: int = 2, title: str | None = None
) -> str:
    """A Markdown table in the layout of the paper's Table 1.

    Parameters
    ----------
    results_by_method
        Method name -> its rows or its :func:`summarize` output; table rows follow this order.
    metric
        ``"dice"`` (printed in percent), ``"hd95"`` or ``"assd"`` (mm).
    digits
        Decimals printed.
    title
        Optional first line.

    Returns
    -------
    str
        ``| Method | Spleen | Liver | LK | RK | Mean |`` then one line per method (mean over its folds, which
        the row names unless they are all five); after a
        blank line, one note per method: how many of its predictions were empty and what they were counted
        as, and how many cases had no value (left out of the means) when there were any.
    """
    if not results_by_method:
        raise ValueError("format_table needs at least one method.")
    if metric not in _METRICS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {_METRICS}.")
    summaries = {name: _as_summary(value) for name, value in results_by_method.items()}
    organs: list[str] = []
    for s in summaries.values():
        organs.extend(o for o in s["organs"] if o not in organs)
    ordered = [o for o in ORGAN_COLUMNS if o in organs] + [o for o in organs if o not in ORGAN_COLUMNS]
    headings = [ORGAN_COLUMNS.get(o, o.replace("_", " ").title()) for o in ordered]
    scale = 100.0 if metric == "dice" else 1.0

    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"

    lines = [title] if title else []
    lines.append("| Method | " + " | ".join([*headings, "Mean"]) + " |")
    lines.append("|---" * (len(headings) + 2) + "|")
    for name, s in summaries.items():
        values = [s[metric]["per_organ"].get(o) for o in ordered]
        folds = ", ".join(str(f) for f in s["folds"])
        plural = "s" if len(s["folds"]) != 1 else ""
        label = name if s["folds"] == list(range(5)) else f"{name} (fold{plural} {folds})"
        lines.append("| " + " | ".join([label, *(cell(v) for v in values), cell(s[metric]["mean"])]) + " |")
    # A blank line ends the Markdown table; the notes keep the failures visible next to the means.
    notes = [note for name, s in summaries.items() if (note := _empty_note(name, s, metric))]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


#: Metric names in the table notes, and what an empty prediction scores.
_METRIC_LABELS = {"dice": "Dice", "hd95": "HD95", "assd": "ASSD"}
_EMPTY_SCORE = {
    "dice": "0",
    "hd95": "the volume's diagonal, sqrt(sum((shape * spacing)^2)) mm",
    "assd": "the volume's diagonal, sqrt(sum((shape * spacing)^2)) mm",
}


def _empty_note(name: str, summary: Mapping[str, Any], metric: str) -> str:
    """``"<name>: N of M predictions empty ...; <metric> of an empty prediction counted as ..."``, or ``""``."""
    total, label = int(summary["n_cases"]), _METRIC_LABELS[metric]
    parts = []
    if summary.get("n_empty") is not None:  # summaries written before the count existed lack it
        parts.append(
            f"{int(summary['n_empty'])} of {total} predictions empty (ground truth not); "
            f"{label} of an empty prediction counted as {_EMPTY_SCORE[metric]}"
        )
    undefined = int(summary.get(metric, {}).get("n_undefined", 0) or 0)
    if undefined:
        parts.append(
            f"{undefined} of {total} cases with no {label} value (prediction and ground truth both empty, "
            "or not computed), left out of the means"
        )
    return (f"{name}: " + "; ".join(parts) + ".") if parts else ""


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of the rows (columns :data:`ROW_FIELDS`, NaN written as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        clean = {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        writer.writerow(clean)
    return buffer.getvalue()


def write_rows_csv(path: str | PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write the rows as CSV, atomically."""
    return atomic_write(path, rows_to_csv(rows))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) or math.isinf(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | PathLike, content: Any) -> Path:
    """Write ``content`` as indented JSON, atomically; NaN/inf become ``null`` (strict JSON)."""
    return atomic_write(path, json.dumps(_jsonable(content), indent=2, allow_nan=False) + "\n")
