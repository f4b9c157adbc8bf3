"""Inference-time settings (flip test-time augmentation, 3D clean-up) on trained fold models, through the product.

For every variant and fold this runs, as a user would::

    python -m monai_sdfsmis protocol --dataset_dir DATASET --folds K --checkpoint MODEL_K/model.pt \
        --output_dir OUT/<variant>/fold_K --overlays 0 <the variant's flags>

and merges each variant's folds (the protocol's own rows, the paper's aggregation of
:func:`monai_sdfsmis.engines.tables.summarize`) into ``OUT/results.json`` and ``OUT/results.md``: one row per variant,
the support-mask copy first. Nothing here segments or scores; a fold already evaluated (its
``protocol_results.json`` exists) is not run again, so series can be split and resumed.

Example: the five 30-minute fold models, raw against flip TTA and flip TTA + largest component::

    python benchmarks/inference_variants.py --dataset_dir ../shared/data/chaos_t2spir --output_dir runs/tta \
        --models 0=runs/np30b/fold_0/model 1=runs/np30/fold_1/model ... \
        --variant "raw=--postprocess none" --variant "flip=--flip_axes 0 --postprocess none" \
        --variant "flip+lcc=--flip_axes 0 --postprocess largest_component"
"""

from __future__ import annotations

__all__ = ["main", "parse_args", "merge_variants", "render_markdown"]

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.engines.tables import ORGAN_COLUMNS, summarize, write_json  # noqa: E402
from monai_sdfsmis.utils import atomic_write  # noqa: E402

BASELINE = "support-mask copy"
PROTOCOL_JSON = "protocol_results.json"


def _model(text: str) -> tuple[int, Path]:
    fold, _, folder = text.partition("=")
    if not fold.isdigit() or not folder:
        raise argparse.ArgumentTypeError(f"--models takes FOLD=MODEL_FOLDER, got {text!r}")
    return int(fold), Path(folder)


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    if not name or "/" in name:
        raise argparse.ArgumentTypeError(f"--variant takes NAME=FLAGS (a name without '/'), got {text!r}")
    return name, shlex.split(flags)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_dir", type=Path, required=True, help="ALPNet-layout dataset of the folds")
    p.add_argument("--output_dir", type=Path, required=True, help="<variant>/fold_K/ per run, results.json/.md")
    p.add_argument("--models", type=_model, nargs="+", required=True, help="FOLD=MODEL_FOLDER, one per fold")
    p.add_argument("--variant", type=_variant, action="append", required=True,
                   help="NAME=FLAGS of python -m monai_sdfsmis protocol (repeat for several)")
    p.add_argument("--num_threads", type=int, default=2, help="CPU threads of each protocol run")
    p.add_argument("--fold_volumes", help="the protocol command's --fold_volumes (JSON; default: RPT's folds)")
    p.add_argument("--note", default="", help="a line on how the runs were made (what else ran), kept in the results")
    return p.parse_args(argv)


def _protocol_command(args: argparse.Namespace, fold: int, model: Path, flags: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "monai_sdfsmis", "protocol", "--dataset_dir", str(args.dataset_dir),
            "--folds", str(fold), "--checkpoint", str(model / "model.pt"), "--output_dir", str(out),
            "--overlays", "0", "--no_progress", "--num_threads", str(args.num_threads),
            *(["--fold_volumes", args.fold_volumes] if args.fold_volumes else []), *flags]


def merge_variants(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``{variant: [protocol_results.json content per fold]}`` -> summaries of the method per variant, the copy once.

    The copy is always raw and one pass, so every variant's copy is the same, except under ``--shots K`` (a majority
    vote of K support masks): a variant whose copy differs from every copy row so far gets its own row,
    ``"support-mask copy (<variant>)"``.
    """
    summaries: dict[str, Any] = {}
    for name, results in runs.items():
        copy_rows = [row for r in results for row in r["methods"].get(BASELINE, {}).get("rows", [])]
        if copy_rows:
            copy_summary = summarize(copy_rows, metrics=["dice", "hd95"])
            copies = [v for k, v in summaries.items() if k.startswith(BASELINE)]
            if not copies:
                summaries[BASELINE] = copy_summary
            elif all(copy_summary != v for v in copies):
                summaries[f"{BASELINE} ({name})"] = copy_summary
        method_rows = [row for r in results for m, v in r["methods"].items() if not m.startswith(BASELINE) for row in v["rows"]]
        summaries[name] = summarize(method_rows, metrics=["dice", "hd95"])
    return summaries


def render_markdown(results: dict[str, Any]) -> str:
    summaries = results["summaries"]
    organs = next(iter(summaries.values()))["organs"]
    organs = [o for o in ORGAN_COLUMNS if o in organs] + [o for o in organs if o not in ORGAN_COLUMNS]
    lines = ["# Inference settings on the trained fold models", "",
             f"Folds {results['folds']}; each cell is `python -m monai_sdfsmis protocol` with the variant's flags.", ""]
    if results.get("note"):
        lines += [f"Note: {results['note']}.", ""]
    head = " | ".join(ORGAN_COLUMNS.get(o, o) for o in organs)
    lines += [f"| Variant | flags | {head} | Mean Dice (%) | Mean HD95 (mm) | wall s, all folds |", "|---" * (len(organs) + 5) + "|"]
    for name, summary in summaries.items():
        cells = " | ".join(f"{100 * summary['dice']['per_organ'][o]:.2f}" for o in organs)
        if name.startswith(BASELINE):
            variant = name[len(BASELINE):].strip(" ()")
            flags = "(raw, one pass)" + (f" with {' '.join(results['flags'][variant])}" if variant else "")
        else:
            flags = " ".join(results["flags"][name]) or "(model's)"
        seconds = results["seconds"].get(name)
        lines.append(f"| {name} | `{flags}` | {cells} | {100 * summary['dice']['mean']:.2f} | "
                     f"{summary['hd95']['mean']:.2f} | {'-' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    models = dict(args.models)
    runs: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for name, flags in args.variant:
        runs[name] = []
        for fold, model in sorted(models.items()):
            out = args.output_dir / name / f"fold_{fold}"
            if not (out / PROTOCOL_JSON).is_file():
                command = _protocol_command(args, fold, model, flags, out)
                print("$ " + " ".join(command), flush=True)
                start = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            runs[name].append(json.loads((out / PROTOCOL_JSON).read_text()))
    results = {"folds": sorted(models), "models": {k: str(v) for k, v in sorted(models.items())},
               "flags": dict(args.variant), "seconds": seconds, "note": args.note,
               "inference": {name: [r.get("inference") for r in results] for name, results in runs.items()},
               "summaries": merge_variants(runs)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "results.json", results)
    markdown = render_markdown(results)
    atomic_write(args.output_dir / "results.md", markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
