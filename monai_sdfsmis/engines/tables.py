"""Aggregate per-case protocol results the way the paper reports them, and write them to disk.

A *row* is one (fold, organ, query volume) case of one method: a dict with the keys of
:data:`ROW_FIELDS`. Aggregation follows METHOD.md 7.1 step 6: organ score of a fold = mean over the
fold's query volumes; fold score = mean over organs; the reported score = mean over folds.
"""

from __future__ import annotations

__all__ = ["ROW_FIELDS", "ORGAN_COLUMNS", "summarize", "format_table", "rows_to_csv", "write_rows_csv", "write_json"]

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

#: Columns of a per-case row, in CSV order (distances in mm; Dice as a fraction).
ROW_FIELDS: tuple[str, ...] = ("method", "fold", "organ_id", "organ", "support_id", "query_id", "dice", "hd95", "assd")
#: Paper Table 1 column order and headings; organs not listed here follow in their own name.
ORGAN_COLUMNS: dict[str, str] = {"spleen": "Spleen", "liver": "Liver", "left_kidney": "LK", "right_kidney": "RK"}
_METRICS = ("dice", "hd95", "assd")


def _mean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = _METRICS) -> dict[str, Any]:
    """Protocol summary of one method's rows.

    Returns
    -------
    dict
        ``{"n_cases": N, "folds": [...], "organs": [...], metric: {"per_fold": {fold: {organ: v, ..., "mean": v}},
        "per_organ": {organ: v}, "mean": v}}`` for each metric; fold keys are strings (JSON-ready). NaN values
        (e.g. HD95 of an empty prediction) are left out of the means.
    """
    if not rows:
        raise ValueError("No protocol rows to summarize.")
    folds = sorted({int(r["fold"]) for r in rows})
    organs: list[str] = []
    for r in rows:
        if r["organ"] not in organs:
            organs.append(str(r["organ"]))
    summary: dict[str, Any] = {"n_cases": len(rows), "folds": folds, "organs": organs}
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
        }
    return summary


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
        ``| Method | Spleen | Liver | LK | RK | Mean |`` then one line per method (mean over folds).
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
        folds = ",".join(str(f) for f in s["folds"])
        label = name if s["folds"] == list(range(5)) else f"{name} (folds {folds})"
        lines.append("| " + " | ".join([label, *(cell(v) for v in values), cell(s[metric]["mean"])]) + " |")
    return "\n".join(lines) + "\n"


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
