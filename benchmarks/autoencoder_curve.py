"""Learning curve of the no-prior autoencoder (stage 1): held-out reconstruction quality against iterations.

Trains a stage-1 autoencoder from scratch on one fold's training volumes (image slices and supervoxel masks,
L1 + KL, AdamW, linear warm-up then cosine decay over ``--iters``) with the package's stage-1 trainer
(:func:`monai_sdfsmis.engines.autoencoder.build_autoencoder_trainer`), and every ``--every`` iterations (and at the
last one) prints, on the fold's test volumes, the image PSNR, the decoded supervoxel-mask Dice and the decoded
organ-mask Dice (ground truth used for this diagnostic only: it caps the Dice stage 2 can reach). One JSON line per
measurement.

    python benchmarks/autoencoder_curve.py --dataset_dir ../shared/data/chaos_t2spir --width small \\
        --spatial_size 128 --batch 8 --lr 1e-3 --warmup 20 --iters 300
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT,):  # run as a script from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from monai_sdfsmis.data.layouts import find_alpnet_volumes  # noqa: E402
from monai_sdfsmis.data.protocol import CHAOS_ORGANS, fold_split, rpt_folds  # noqa: E402
from monai_sdfsmis.data.slices import SliceDataset, holdout_slices, organ_mask_slices  # noqa: E402
from monai_sdfsmis.data.volumes import VolumeStore  # noqa: E402
from monai_sdfsmis.engines.autoencoder import build_autoencoder_trainer  # noqa: E402
from monai_sdfsmis.networks.autoencoder import build_autoencoder, reconstruction_metrics  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_dir", type=Path, required=True, help="ALPNet-layout dataset")
    p.add_argument("--fold", type=int, default=0, help="RPT fold whose test volumes are held out")
    p.add_argument("--width", default="small", help="autoencoder width preset")
    p.add_argument("--spatial_size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="measure every this many iterations")
    p.add_argument("--mask_fraction", type=float, default=0.5)
    p.add_argument("--holdout_slices", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.every < 1 or args.iters < 1:
        raise ValueError(f"--every and --iters must be positive, got {args.every} and {args.iters}.")
    torch.set_num_threads(args.threads)
    records = find_alpnet_volumes(args.dataset_dir, supervoxel_dir="supervoxels_5000", require_labels=True,
                                  require_supervoxels=True)
    store = VolumeStore(records, intensity="minmax", spatial_size=args.spatial_size)
    store.preload(kinds=("image", "supervoxel", "label"), progress=False)
    train, test = fold_split(store.records, args.fold, rpt_folds(len(records)))
    train_ids, test_ids = [r.id for r in train], [r.id for r in test]

    torch.manual_seed(args.seed)
    vae = build_autoencoder(args.width, sample_size=args.spatial_size)
    slices = SliceDataset(store, train_ids, mask_fraction=args.mask_fraction, length=args.iters * args.batch, seed=args.seed)
    held_out = holdout_slices(store, test_ids, num_slices=args.holdout_slices, seed=args.seed)
    organ_masks = organ_mask_slices(store, test_ids, list(CHAOS_ORGANS), args.holdout_slices, args.seed)
    loader = torch.utils.data.DataLoader(slices, batch_size=args.batch, num_workers=0)
    trainer, _ = build_autoencoder_trainer(
        vae, loader, device="cpu", lr=args.lr, weight_decay=0.0, max_iterations=args.iters, max_seconds=None,
        schedule="cosine", warmup_iterations=args.warmup, progress=False,
    )
    curve: list[dict] = []
    start = time.perf_counter()

    def measure(engine: Engine) -> None:
        recon = reconstruction_metrics(vae, held_out["images"], held_out["masks"], batch_size=16)
        organ = reconstruction_metrics(vae, masks=organ_masks, batch_size=16)["mask_dice"]
        point = {"it": engine.state.iteration, "s": round(time.perf_counter() - start),
                 "l1": round(float(engine.state.output["l1"]), 4), "psnr": round(recon["image_psnr"], 2),
                 "sv_dice": round(100 * recon["mask_dice"], 1), "organ_dice": round(100 * organ, 1)}
        curve.append(point)
        print(json.dumps(point), flush=True)

    # The training step puts the network back in train mode at every iteration, after measure's eval().
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=args.every), measure)
    if args.iters % args.every:  # the last iteration is measured too (once: not twice when it is a multiple)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=args.iters), measure)
    trainer.run()
    return curve


if __name__ == "__main__":
    main()
