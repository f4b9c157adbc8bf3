"""No-prior SD-FSMIS on the paper's protocol, fold by fold, through the product's own training command.

For every requested fold this runs, as a user would::

    python -m monai_sdfsmis train --dataset_dir DATASET --output_dir OUT/fold_K --fold K [--minutes M] ...

(the bundle's recipe, ``configs/train.json`` + ``configs/no_prior.json``: both stages under one budget, then the
protocol on the fold's test volumes beside the support-mask copy), and merges the folds' ``results.json`` into
``OUT/results.json`` and ``OUT/results.md``. Nothing here trains, schedules or budgets: a fold's figures are the
figures that command gives a user. A fold whose ``results.json`` already exists is not run again, so folds can be
run at different times (or on different machines) and merged: each fold records its machine, threads and minutes.

Examples
--------
This CPU, fold 0 in one command, the CPU preset's 60 minutes::

    python benchmarks/no_prior_protocol.py --dataset_dir ../shared/data/chaos_t2spir --output_dir runs/np --folds 0

All five folds at 30 minutes each, then the merge of folders made elsewhere::

    python benchmarks/no_prior_protocol.py --dataset_dir ... --output_dir runs/np --minutes 30
    python benchmarks/no_prior_protocol.py --merge runs/np_a runs/np_b --output_dir runs/np_all
"""

from __future__ import annotations

__all__ = ["main", "parse_args", "merge_results", "render_markdown", "fold_command"]

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.engines.tables import ORGAN_COLUMNS, folds_title, format_table, summarize, write_json  # noqa: E402
from monai_sdfsmis.utils import atomic_write  # noqa: E402

METHOD = "SD-FSMIS no-prior"
BASELINE = "support-mask copy"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_dir", type=Path, help="ALPNet-layout dataset (image_N, label_N, supervoxels_5000/)")
    p.add_argument("--output_dir", type=Path, required=True, help="fold_K/ (one train run each), results.json/.md")
    p.add_argument("--merge", type=Path, nargs="+", help="only merge the results of these benchmark folders")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds to run")
    p.add_argument("--minutes", type=float, help="training minutes per fold (default: the preset's)")
    p.add_argument("--preset", choices=("cpu", "gpu"), help="recipe preset (default: the recipe's, cpu)")
    p.add_argument("--eval_at_minutes", type=float, nargs="+", help="learning-curve points (training minutes)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="recipe keys passed to the train command (--set of python -m monai_sdfsmis train)")
    p.add_argument("--note", default="", help="a line on how the run was made (what else ran), kept in the results")
    args = p.parse_args(argv)
    if args.merge is None and args.dataset_dir is None:
        p.error("--dataset_dir is required (unless --merge)")
    return args


def fold_command(args: argparse.Namespace, fold: int) -> list[str]:
    """The product command that trains and evaluates one fold."""
    command = [sys.executable, "-m", "monai_sdfsmis", "train", "--dataset_dir", str(args.dataset_dir),
               "--output_dir", str(args.output_dir / f"fold_{fold}"), "--fold", str(fold)]
    if args.minutes is not None:
        command += ["--minutes", f"{args.minutes:g}"]
    if args.preset:
        command += ["--preset", args.preset]
    if args.eval_at_minutes:
        command += ["--eval_at_minutes", *(f"{m:g}" for m in args.eval_at_minutes)]
    if args.overrides:
        command += ["--set", *args.overrides]
    return command


def _fold_records(folders: list[Path]) -> list[dict[str, Any]]:
    """The evaluated folds under ``folders``: their ``fold_K/results.json``, a merged ``results.json``'s folds, or a
    single train run's ``results.json``; for a fold found twice, the later folder wins."""
    records: dict[int, dict[str, Any]] = {}
    for folder in folders:
        found: list[dict[str, Any]] = []
        if (folder / RESULTS_JSON).is_file():
            content = json.loads((folder / RESULTS_JSON).read_text())
            found += content.get("fold_records", [content] if "rows" in content else [])
        found += [json.loads(path.read_text()) for path in sorted(folder.glob(f"fold_*/{RESULTS_JSON}"))]
        found = [record for record in found if "rows" in record]  # a fold without labels has no protocol rows
        if not found:
            raise FileNotFoundError(f"--merge: no evaluated fold in {folder} ({RESULTS_JSON} or fold_K/{RESULTS_JSON})")
        records.update({int(record["fold"]): record for record in found})
    return [records[k] for k in sorted(records)]


def merge_results(fold_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries (paper aggregation) over every fold record, per method."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in fold_records:
        for name, rows in record["rows"].items():
            by_method.setdefault(name, []).extend(rows)

    def measured(metric: str, rows: list[dict[str, Any]]) -> bool:
        return any(r.get(metric) is not None and math.isfinite(float(r[metric])) for r in rows)

    return {name: summarize(rows, metrics=[m for m in ("dice", "hd95", "assd") if measured(m, rows)])
            for name, rows in by_method.items()}


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the Table-1-style table, per-fold Dice, learning curves and how each fold was trained."""
    summaries = results["summaries"]
    lines = ["# No-prior SD-FSMIS on the few-shot protocol", "",
             f"Folds {results['folds_done']}, each trained and evaluated by `python -m monai_sdfsmis train`.", ""]
    if results.get("note"):
        lines += [f"Note: {results['note']}.", ""]
    lines.append(format_table({n: summaries[n] for n in (BASELINE, METHOD) if n in summaries}, metric="dice",
                              title=folds_title("Dice (%)", summaries)))
    if METHOD in summaries and "hd95" in summaries[METHOD]:
        lines.append(format_table({n: summaries[n] for n in (BASELINE, METHOD) if n in summaries}, metric="hd95",
                                  title=folds_title("HD95 (mm)", summaries)))
    organs = next(iter(summaries.values()))["organs"] if summaries else []
    organs = [o for o in ORGAN_COLUMNS if o in organs] + [o for o in organs if o not in ORGAN_COLUMNS]
    headings = [ORGAN_COLUMNS.get(o, o) for o in organs]
    header = "| " + " | ".join(headings) + " | Mean |"
    lines += ["Learning curves (training minutes, evaluations excluded), Dice (%):", "",
              "| Fold | training min | segmenter it " + header, "|---" * (len(organs) + 4) + "|"]
    for record in results["fold_records"]:
        for point in record.get("learning_curve") or []:
            cells = [_cell(point["dice"].get(o), 100) for o in organs] + [_cell(point["dice"].get("mean"), 100)]
            lines.append(f"| {record['fold']} | {point['minutes']:.1f} | {point['segmenter_iterations']} | "
                         + " | ".join(cells) + " |")
    lines += ["", "How each fold was trained:", "",
              "| Fold | device | threads | budget (min) | training (min) | stage 1 it | stage 2 it x batch | stopped by "
              "| episodes/s | date |", "|---" * 10 + "|"]
    for record in results["fold_records"]:
        t, env = record["training"], record.get("environment", {})
        ae, seg = t.get("autoencoder") or {}, t["segmenter"]
        device = env.get("gpu") or f"{env.get('device')} ({env.get('cpu')}, {env.get('cpu_count')} CPUs)"
        lines.append(f"| {record['fold']} | {device} | {t.get('threads')} | {_cell(t.get('budget_minutes'), digits=1)} | "
                     f"{t['training_minutes']:.1f} | {ae.get('iterations', '-')} | {seg['iterations']} x {seg['batch']} | "
                     f"{seg.get('stopped_by') or '-'} | {seg['episodes_per_second']:.2f} | {t.get('date', '-')} |")
    return "\n".join(lines) + "\n"


def _write(output_dir: Path, fold_records: list[dict[str, Any]], note: str) -> dict[str, Any]:
    results = {"folds_done": [r["fold"] for r in fold_records], "fold_records": fold_records,
               "summaries": merge_results(fold_records), "note": note}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / RESULTS_JSON, results)  # strict JSON: NaN -> null
    atomic_write(output_dir / RESULTS_MD, render_markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        results = _write(args.output_dir, _fold_records(args.merge), args.note)
        print(render_markdown(results))
        return results
    for fold in args.folds:
        done = args.output_dir / f"fold_{fold}" / RESULTS_JSON
        if done.is_file():
            print(f"fold {fold}: {done} exists, not run again", flush=True)
            continue
        command = fold_command(args, fold)
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
        _write(args.output_dir, _fold_records([args.output_dir]), args.note)
    results = _write(args.output_dir, _fold_records([args.output_dir]), args.note)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
