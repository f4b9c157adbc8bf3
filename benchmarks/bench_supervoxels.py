"""Speed and fidelity of ``compute_supervoxels`` against the published ADNet/RPT supervoxels (CHAOS T2-SPIR).

For every ``image_{N}.nii.gz`` with a reference ``supervoxels_5000/superpix-MIDDLE_{N}.nii.gz`` it prints the run time,
the supervoxel counts (ours / reference), the adjusted Rand index on the reference foreground, the foreground Dice and
the fraction of voxels whose label is identical once both label sets are renumbered consecutively.

    python benchmarks/bench_supervoxels.py [--data_dir ../shared/data/chaos_t2spir] [--ids 1 2 3]
"""

from __future__ import annotations

__all__ = ["adjusted_rand_index", "main"]

import argparse
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_sdfsmis.data.supervoxels import compute_supervoxels, felzenszwalb_3d, header_spacing

REPO_ROOT = Path(__file__).resolve().parents[1]


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of the same voxels, from their contingency table."""
    _, ia = np.unique(a.ravel(), return_inverse=True)
    _, ib = np.unique(b.ravel(), return_inverse=True)
    table = np.bincount(ia * (ib.max() + 1) + ib, minlength=(ia.max() + 1) * (ib.max() + 1)).astype(np.float64)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    table = table.reshape(ia.max() + 1, ib.max() + 1)
    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([float(ia.size)]))
    top = (rows + cols) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "chaos_t2spir")
    parser.add_argument("--ids", type=int, nargs="*", help="volume numbers N (default: all with a reference)")
    args = parser.parse_args(argv)

    ref_dir = args.data_dir / "supervoxels_5000"
    ids = args.ids or sorted(int(m.group(1)) for p in ref_dir.glob("superpix-MIDDLE_*.nii.gz")
                             if (m := re.match(r"superpix-MIDDLE_(\d+)\.nii\.gz", p.name)))
    if not ids:
        raise SystemExit(f"no reference supervoxels found in {ref_dir}")

    start = time.perf_counter()
    felzenszwalb_3d(np.random.default_rng(0).random((6, 7, 5)), (1.0, 1.0, 2.0), min_size=10)
    print(f"warm-up (numba compile or cache load): {time.perf_counter() - start:.2f} s\n")

    print("| volume | Z | time s | CPU s | count ours/ref | ARI | fg Dice | identical voxels |")
    print("|---|---|---|---|---|---|---|---|")
    times, cpus, aris, dices, same = [], [], [], [], []
    for n in ids:
        nii = nib.load(str(args.data_dir / f"image_{n}.nii.gz"))
        image = np.asarray(nii.dataobj, dtype=np.float64)
        reference = np.asarray(nib.load(str(ref_dir / f"superpix-MIDDLE_{n}.nii.gz")).dataobj).astype(np.int64)
        start, start_cpu = time.perf_counter(), time.process_time()
        ours = compute_supervoxels(image, header_spacing(nii), min_size=5000)
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        fg_ref, fg_ours = reference > 0, ours > 0
        aris.append(adjusted_rand_index(ours[fg_ref], reference[fg_ref]))
        dices.append(2 * np.logical_and(fg_ref, fg_ours).sum() / (fg_ref.sum() + fg_ours.sum()))
        same.append(float((_consecutive(ours) == _consecutive(reference)).mean()))
        print(f"| {n} | {image.shape[2]} | {times[-1]:.2f} | {cpus[-1]:.2f} | {ours.max()}/{len(np.unique(reference)) - 1} | "
              f"{aris[-1]:.4f} | {dices[-1]:.4f} | {same[-1]:.4f} |")
    print(f"\nmean time {np.mean(times):.2f} s (max {np.max(times):.2f}), CPU {np.mean(cpus):.2f} s "
          f"(max {np.max(cpus):.2f}); ARI min {np.min(aris):.4f}; "
          f"fg Dice min {np.min(dices):.4f}; identical voxels min {np.min(same):.4f}")


if __name__ == "__main__":
    main()
