"""Several organs in one ``infer`` call against one call per organ: time and Dice, through the product.

Runs, as a user would, on the query volumes of an ALPNet-layout dataset with one annotated support volume::

    python -m monai_sdfsmis infer --query Q1 Q2 ... --support S --support_label S_LABEL --organ_id 1 2 3 4 \
        --model MODEL --output_dir OUT/together
    python -m monai_sdfsmis infer ... --organ_id K --output_dir OUT/organ_K        # for each organ K

and scores every written mask against the queries' label maps (Dice per query volume and organ over the whole
volume, deployment mode: no query label is used to choose slices). Writes ``OUT/results.json`` and
``OUT/results.md``. Nothing here segments: the masks are the command's files.

Example (fold 0's test volumes, its support volume 3, the 30-minute fold-0 model)::

    python benchmarks/multi_organ.py --dataset_dir ../shared/data/chaos_t2spir --model runs/np30b/fold_0/model \
        --support 3 --queries 1 2 5 8 --output_dir runs/multi_organ
"""

from __future__ import annotations

__all__ = ["main", "parse_args", "dice"]

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.engines.tables import write_json  # noqa: E402
from monai_sdfsmis.utils import atomic_write  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_dir", type=Path, required=True, help="ALPNet-layout dataset (image_N, label_N)")
    p.add_argument("--model", type=Path, required=True, help="trained model folder")
    p.add_argument("--support", required=True, help="volume id of the annotated support")
    p.add_argument("--queries", nargs="+", required=True, help="volume ids of the queries")
    p.add_argument("--organs", type=int, nargs="+", default=[1, 2, 3, 4], help="organ label ids")
    p.add_argument("--output_dir", type=Path, required=True, help="masks per run, results.json/.md")
    p.add_argument("--num_threads", type=int, default=2, help="CPU threads of each infer call")
    p.add_argument("--note", default="", help="a line on how the runs were made (what else ran), kept in the results")
    return p.parse_args(argv)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean volumes; 1 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def _infer(args: argparse.Namespace, organs: list[int], out: Path) -> float:
    data = args.dataset_dir
    command = [sys.executable, "-m", "monai_sdfsmis", "infer",
               "--query", *(str(data / f"image_{q}.nii.gz") for q in args.queries),
               "--support", str(data / f"image_{args.support}.nii.gz"),
               "--support_label", str(data / f"label_{args.support}.nii.gz"),
               "--organ_id", *map(str, organs), "--model", str(args.model), "--output_dir", str(out),
               "--overwrite", "--no_progress", "--num_threads", str(args.num_threads)]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _scores(args: argparse.Namespace, folder_of: dict[int, Path], label_map: bool) -> dict[str, dict[str, float]]:
    """``{organ: {query: Dice}}`` of the files in each organ's folder: a 0/1 mask (one organ per call) or, with
    ``label_map``, a label map holding the organs' ids."""
    scores: dict[str, dict[str, float]] = {}
    for organ, folder in folder_of.items():
        scores[str(organ)] = {}
        for q in args.queries:
            truth = np.asarray(nib.load(str(args.dataset_dir / f"label_{q}.nii.gz")).dataobj) == organ
            written = np.asarray(nib.load(str(folder / f"image_{q}_seg.nii.gz")).dataobj)
            scores[str(organ)][q] = dice(written == (organ if label_map else 1), truth)
    return scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    together = args.output_dir / "together"
    seconds_together = _infer(args, args.organs, together)
    seconds_each = {organ: _infer(args, [organ], args.output_dir / f"organ_{organ}") for organ in args.organs}
    one_call = _scores(args, {organ: together for organ in args.organs}, label_map=True)
    separate = _scores(args, {organ: args.output_dir / f"organ_{organ}" for organ in args.organs}, label_map=False)
    mean = {name: {o: float(np.mean(list(v.values()))) for o, v in s.items()}
            for name, s in (("one call", one_call), ("one call per organ", separate))}
    results = {
        "support": args.support, "queries": args.queries, "organs": args.organs, "model": str(args.model),
        "note": args.note, "seconds": {"one call": seconds_together, "one call per organ": seconds_each},
        "dice": {"one call": one_call, "one call per organ": separate}, "mean_dice": mean,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "results.json", results)
    total_each = sum(seconds_each.values())
    lines = ["# Several organs in one infer call", "",
             f"Support {args.support}, queries {', '.join(args.queries)}, model `{args.model}`; Dice (%) per organ, "
             "mean over the queries, on the whole volume (deployment mode).", ""]
    if args.note:
        lines += [f"Note: {args.note}.", ""]
    lines += ["| run | " + " | ".join(f"organ {o}" for o in args.organs) + " | wall s |",
              "|---" * (len(args.organs) + 2) + "|",
              "| one call, `--organ_id " + " ".join(map(str, args.organs)) + "` | "
              + " | ".join(f"{100 * mean['one call'][str(o)]:.2f}" for o in args.organs) + f" | {seconds_together:.0f} |",
              "| one call per organ | " + " | ".join(f"{100 * mean['one call per organ'][str(o)]:.2f}" for o in args.organs)
              + f" | {total_each:.0f} |"]
    markdown = "\n".join(lines) + "\n"
    atomic_write(args.output_dir / "results.md", markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
