"""No-prior SD-FSMIS on the paper's protocol: both training stages and the evaluation, fold by fold.

For every requested fold of a dataset in the ALPNet layout (``image_N``, ``label_N``,
``supervoxels_5000/``), with no pretrained weights at all:

1. **stage 1**: a KL autoencoder of SD's layout (``--ae_width``) is trained from scratch on the fold's
   training volumes: image slices and supervoxel masks (never ground truth), L1 + KL, for
   ``--ae_iters`` iterations or ``--ae_seconds``, whichever ends first (the cosine schedule runs over the
   iterations, or over the seconds when no iteration budget is given); then frozen, its latent scaling
   factor measured on the training slices, and saved (``fold_K/autoencoder/``, a diffusers folder);
2. **reconstruction check**: image PSNR and decoded-mask Dice on slices and supervoxel masks of the
   fold's test volumes (held out from both stages), and, as an evaluation-only diagnostic, decoded-mask
   Dice of their ground-truth organ masks (an upper bound on what stage 2 can reach);
3. **stage 2**: the SD-FSMIS UNet (``--unet_width``, SII/kv_concat, QE, VTCT's learned condition) is
   trained from scratch on supervoxel episodes (Setting 1 or 2) in batches, bf16 on CUDA, for
   ``--seg_iters`` iterations or ``--seg_seconds``; saved as ``fold_K/model.safetensors``;
4. **protocol**: the fold is evaluated with ``monai_sdfsmis.engines.evaluate_protocol`` (all four
   organs, support position 2, 3 chunks) beside the support-mask-copy baseline.

``results.json`` and ``results.md`` (Table-1-style table, per-fold per-organ Dice, timings, VAE
quality, GPU name) are rewritten atomically after every fold, so a long run can be followed and an
interrupted one keeps what finished.

Examples
--------
H100, CHAOS T2-SPIR, Setting 1, all five folds (target: mean Dice >= 72 with <= 10 min training per fold)::

    python benchmarks/no_prior_protocol.py --dataset_dir ../shared/data/chaos_t2spir --output_dir runs/no_prior_s1

One fold per command (e.g. to spread folds over machines; then ``--merge`` the folders)::

    python benchmarks/no_prior_protocol.py --dataset_dir ... --output_dir runs/np_f0 --folds 0
    python benchmarks/no_prior_protocol.py --merge runs/np_f0 runs/np_f1 ... --output_dir runs/no_prior_s1

CPU smoke run (tiny widths, no accuracy claims)::

    python benchmarks/no_prior_protocol.py --dataset_dir ... --output_dir /tmp/np --width tiny \\
        --ae_iters 5 --seg_iters 5 --folds 0
"""

from __future__ import annotations

__all__ = ["main", "parse_args", "run_fold", "merge_results", "render_markdown", "loss_curve", "held_out_organ_masks"]

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.data.episodes import EpisodeDataset  # noqa: E402
from monai_sdfsmis.data.layouts import find_alpnet_volumes  # noqa: E402
from monai_sdfsmis.data.protocol import (  # noqa: E402
    CHAOS_ORGANS,
    SABS_ORGANS,
    fold_split,
    rpt_folds,
    support_and_queries,
)
from monai_sdfsmis.data.slices import SliceDataset, holdout_slices  # noqa: E402
from monai_sdfsmis.data.volumes import VolumeStore  # noqa: E402
from monai_sdfsmis.engines.autoencoder import (  # noqa: E402
    build_autoencoder_trainer,
    freeze_and_calibrate,
    load_autoencoder,
    save_autoencoder,
)
from monai_sdfsmis.engines.budget import attach_budget  # noqa: E402
from monai_sdfsmis.engines.evaluator import evaluate_protocol  # noqa: E402
from monai_sdfsmis.engines.tables import ORGAN_COLUMNS, folds_title, format_table, summarize, write_json  # noqa: E402
from monai_sdfsmis.engines.trainer import EpisodeTrainer  # noqa: E402
from monai_sdfsmis.inferers.sliding_support import SlidingSupportInferer  # noqa: E402
from monai_sdfsmis.networks.autoencoder import build_autoencoder, reconstruction_metrics  # noqa: E402
from monai_sdfsmis.networks.latent_cache import LatentCache  # noqa: E402
from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis  # noqa: E402
from monai_sdfsmis.transforms.augmentation import RPTAugmentd  # noqa: E402
from monai_sdfsmis.utils import atomic_write  # noqa: E402

METHOD = "SD-FSMIS no-prior"
BASELINE = "support-mask copy"
#: ``--width`` sets both stages: autoencoder width, UNet width. The default pairs the ``small`` autoencoder
#: (32/64/128/128) with the ``default`` UNet. Measured with torch's FLOP counter at 256x256: an autoencoder
#: training step costs 167.5 GFLOP per slice against 668.5 for the ``default`` autoencoder (4.0x), and a
#: stage-2 episode 187.1 GFLOP against 390.1 (2.1x; the four frozen encodings are 68.0 against 271.1), so in
#: a fixed time budget both stages see more data. See RESULTS.md section 5.
WIDTHS = {"default": ("small", "default"), "wide": ("default", "wide"), "small": ("small", "small"),
          "tiny": ("tiny", "tiny")}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_dir", type=Path, help="ALPNet-layout dataset (image_N, label_N, supervoxels_5000/)")
    p.add_argument("--output_dir", type=Path, required=True, help="results.json, results.md and fold_K/ go here")
    p.add_argument("--merge", type=Path, nargs="+", help="only merge the results.json of these run folders")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds to run")
    p.add_argument("--fold_definition", default="rpt",
                   help="'rpt', 'famnet', or a JSON list of folds (indices into the sorted volumes)")
    p.add_argument("--setting", type=int, choices=(1, 2), default=1)
    p.add_argument("--organs", choices=("chaos", "sabs"), default="chaos", help="label ids/names of the 4 test organs")
    p.add_argument("--supervoxel_dir", default="supervoxels_5000")
    p.add_argument("--intensity", default="minmax", help="intensity to [-1, 1]: minmax (each volume's min..max; for already-preprocessed volumes such as the published CHAOS/SABS), ct (window [-125, 275] HU), mr (0.5..99.5th percentiles), zscore")
    p.add_argument("--spatial_size", type=int, default=256, help="in-plane size (256 as the paper; smaller for smoke runs)")
    p.add_argument("--width", choices=sorted(WIDTHS), default="default", help="sets --ae_width and --unet_width")
    p.add_argument("--ae_width", help="autoencoder width (default from --width)")
    p.add_argument("--unet_width", help="UNet width (default from --width)")
    # stage 1
    p.add_argument("--ae_iters", type=int, default=None,
                   help="stage-1 iterations (sets the schedule; default: none, the time budget does)")
    p.add_argument("--ae_seconds", type=float, default=150.0, help="stage-1 time budget (<= 0: none)")
    p.add_argument("--ae_batch", type=int, default=None, help="slices per iteration (default 32; 4 with --width tiny)")
    p.add_argument("--ae_lr", type=float, default=1e-3)
    p.add_argument("--ae_warmup", type=int, default=20)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--mask_fraction", type=float, default=0.5, help="share of supervoxel masks in stage-1 batches")
    p.add_argument("--calibration_slices", type=int, default=None, help="default 512 (32 with --width tiny)")
    p.add_argument("--holdout_slices", type=int, default=None,
                   help="test-volume slices and masks for the VAE check (default 64; 8 with --width tiny)")
    # stage 2
    p.add_argument("--seg_iters", type=int, default=None,
                   help="stage-2 iterations (sets the schedule; default: none, the time budget does)")
    p.add_argument("--seg_seconds", type=float, default=None,
                   help="stage-2 time budget (<= 0: none; default 400, or what --total_minutes leaves)")
    p.add_argument("--seg_batch", type=int, default=None, help="episodes per iteration (default 16; 2 with --width tiny)")
    p.add_argument("--seg_lr", type=float, default=2e-4)
    p.add_argument("--seg_warmup", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--sii_mode", choices=("sii", "kv_concat"), default="sii")
    p.add_argument("--no_sii", action="store_true")
    p.add_argument("--no_qe", action="store_true")
    p.add_argument("--no_vtct", action="store_true")
    p.add_argument("--no_augment", action="store_true", help="no RPT augmentation of episodes")
    p.add_argument("--no_latent_cache", action="store_true",
                   help="encode all four episode images every iteration instead of caching the frozen encoder's output")
    p.add_argument("--vae_sample", action="store_true",
                   help="stage 2 on posterior samples (and the latent scale measured on samples) instead of means")
    p.add_argument("--autoencoder", type=Path, default=None,
                   help="reuse this stage-1 autoencoder folder (fold_K/autoencoder of an earlier run) instead of training one")
    p.add_argument("--total_minutes", type=float, default=None,
                   help="wall-clock budget of both stages together (evaluations excluded): stage 2 stops when it is spent")
    p.add_argument("--eval_at_minutes", type=float, nargs="*", default=[],
                   help="also evaluate the protocol when training (both stages, evaluations excluded) reaches these minutes")
    # evaluation / runtime
    p.add_argument("--sw_batch_size", type=int, default=None, help="query slices per network call (default 32; 8 tiny)")
    p.add_argument("--surface_metrics", action="store_true", help="also HD95/ASSD (slower)")
    p.add_argument("--overlays", type=int, default=0, help="PNG overlays per query volume")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: CPUs - 1, at most 12)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: the CPU count, at most 8)")
    p.add_argument("--seg_threads", type=int, default=None,
                   help="torch threads in stage 2 and the evaluations (default: --threads); the small ops of the "
                        "segmenter gain little from a second thread on a shared CPU")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--note", default="", help="a line on how the run was made (e.g. folds sharing one GPU), kept in the results")
    args = p.parse_args(argv)
    # CPU smoke runs use --width tiny: small batches keep them to minutes.
    tiny = args.width == "tiny"
    for name, normal, small in (("ae_batch", 32, 4), ("seg_batch", 16, 2), ("calibration_slices", 512, 32),
                                ("holdout_slices", 64, 8), ("sw_batch_size", 32, 8)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else normal)
    if args.merge is None and args.dataset_dir is None:
        p.error("--dataset_dir is required (unless --merge)")
    if args.merge is None:
        if args.ae_iters is None and not (args.ae_seconds and args.ae_seconds > 0) and args.autoencoder is None:
            p.error("stage 1 needs --ae_iters or --ae_seconds (or --autoencoder to reuse one)")
        if args.seg_iters is None and not (args.seg_seconds and args.seg_seconds > 0) and not args.total_minutes:
            p.error("stage 2 needs --seg_iters, --seg_seconds or --total_minutes")
    if args.seg_seconds is None and not args.total_minutes:
        args.seg_seconds = 400.0
    for name in ("ae_iters", "ae_batch", "seg_iters", "seg_batch", "spatial_size", "calibration_slices",
                 "holdout_slices", "sw_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.spatial_size % 8:
        p.error("--spatial_size must be a multiple of 8 (the autoencoder downsamples 8x)")
    return args


def _folds(definition: str, n_volumes: int) -> list[list[int]]:
    if definition in ("rpt", "famnet"):
        return rpt_folds(n_volumes, scheme=definition)
    try:
        folds = json.loads(definition)
    except json.JSONDecodeError as err:
        raise ValueError(f"--fold_definition must be 'rpt', 'famnet' or a JSON list of lists, got {definition!r}.") from err
    if not isinstance(folds, list) or not all(isinstance(f, list) for f in folds):
        raise ValueError(f"--fold_definition JSON must be a list of lists of volume indices, got {definition!r}.")
    return folds


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine.")
    return device


def _loader(dataset: Any, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # items are already random draws (seeded per index)
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=False,
    )


def _virtual_length(iterations: int | None) -> int:
    """Iterations a stage's dataset must cover: its budget, or enough for any time budget."""
    return iterations if iterations is not None else 10**7


def _warmup(warmup: int, iterations: int | None) -> int:
    return warmup if iterations is None else min(warmup, iterations // 5)


def _budget_seconds(value: float) -> float | None:
    return float(value) if value and value > 0 else None


def _loss_of(output: Any) -> float:
    """The loss from a trainer output: a dict, or MONAI's decollated list of per-item dicts."""
    if isinstance(output, (list, tuple)):
        output = output[0]
    return float(output["loss"])


def _record_losses(engine: Any) -> list[float]:
    """Attach a handler that appends every iteration's loss to the returned list."""
    from ignite.engine import Events

    losses: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(_loss_of(e.state.output)))
    return losses


def loss_curve(losses: list[float], points: int = 10) -> list[float]:
    """Mean loss over each of ``points`` equal parts of training (fewer when there are fewer iterations)."""
    if not losses:
        return []
    parts = [chunk for chunk in np.array_split(np.asarray(losses, dtype=np.float64), min(points, len(losses))) if len(chunk)]
    return [round(float(chunk.mean()), 6) for chunk in parts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def held_out_organ_masks(store: VolumeStore, ids: list[str], organ_ids: list[int], count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` ground-truth organ masks ``[N, 1, H, W]`` from organ-containing slices of ``ids``."""
    candidates = []
    for vid in ids:
        label = store.label(vid)
        for organ in organ_ids:
            for z in np.flatnonzero((label == organ).any(axis=(0, 1))):
                candidates.append((vid, organ, int(z)))
    if not candidates:
        raise ValueError(f"The test volumes {ids} contain none of the organs {organ_ids}.")
    picks = np.random.default_rng(seed).permutation(len(candidates))[:count]
    masks = [store.label(candidates[i][0])[:, :, candidates[i][2]] == candidates[i][1] for i in picks]
    return torch.tensor(np.stack(masks), dtype=torch.float32)[:, None]


def run_fold(
    args: argparse.Namespace, fold: int, store: VolumeStore, folds: list[list[int]], device: torch.device
) -> dict[str, Any]:
    """Both stages and the protocol for one fold; returns the fold's record for ``results.json``."""
    ae_width = args.ae_width or WIDTHS[args.width][0]
    unet_width = args.unet_width or WIDTHS[args.width][1]
    organ_names = CHAOS_ORGANS if args.organs == "chaos" else SABS_ORGANS
    organ_ids = list(organ_names)
    workers = args.num_workers if args.num_workers is not None else max(0, min(12, (os.cpu_count() or 1) - 1))
    progress = not args.no_progress
    fold_dir = args.output_dir / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_records, test_records = fold_split(store.records, fold, folds)
    train_ids = [r.id for r in train_records]
    test_ids = [r.id for r in test_records]
    seed = args.seed + fold
    print(f"\n=== fold {fold}: train on {len(train_ids)} volumes {train_ids}, test volumes {test_ids} ===", flush=True)

    # ---------------------------------------------------------------- stage 1: autoencoder
    t_train = time.perf_counter()
    torch.manual_seed(seed)
    ae_losses: list[float] = []
    ae_iterations, ae_loop_seconds, calib_seconds = 0, 0.0, 0.0
    if args.autoencoder is not None:
        vae = load_autoencoder(args.autoencoder).to(device)
        print(f"fold {fold} autoencoder: reused '{args.autoencoder}' (stage 1 not trained in this run)", flush=True)
        if args.vae_sample:  # its saved scale was measured on posterior means
            calibration = SliceDataset(store, train_ids, mask_fraction=args.mask_fraction,
                                       length=args.calibration_slices, seed=seed + 10_000)
            freeze_and_calibrate(vae, _loader(calibration, min(args.ae_batch, 64), workers, device), sample_posterior=True)
    else:
        vae = build_autoencoder(ae_width, sample_size=args.spatial_size)
        slices = SliceDataset(store, train_ids, mask_fraction=args.mask_fraction,
                              length=_virtual_length(args.ae_iters) * args.ae_batch, seed=seed)
        ae_seconds = _budget_seconds(args.ae_seconds)
        trainer, ae_budget = build_autoencoder_trainer(
            vae, _loader(slices, args.ae_batch, workers, device), device=device, lr=args.ae_lr,
            max_iterations=args.ae_iters, max_seconds=ae_seconds, schedule="cosine",
            warmup_iterations=_warmup(args.ae_warmup, args.ae_iters), kl_weight=args.kl_weight, progress=progress,
        )
        ae_losses = _record_losses(trainer)
        trainer.run()
        _sync(device)
        ae_iterations, ae_loop_seconds = ae_budget.iterations, ae_budget.elapsed
        t_calib = time.perf_counter()
        calibration = SliceDataset(store, train_ids, mask_fraction=args.mask_fraction,
                                   length=args.calibration_slices, seed=seed + 10_000)
        freeze_and_calibrate(vae, _loader(calibration, min(args.ae_batch, 64), workers, device),
                             sample_posterior=args.vae_sample)
        _sync(device)
        calib_seconds = time.perf_counter() - t_calib
        save_autoencoder(vae, fold_dir / "autoencoder", metadata={
            "fold": fold, "train_ids": train_ids, "iterations": ae_iterations, "width": ae_width,
        })
    stage1_seconds = time.perf_counter() - t_train

    # Held-out reconstruction quality (not counted as training time).
    t_recon = time.perf_counter()
    held_out = holdout_slices(store, test_ids, num_slices=args.holdout_slices, seed=seed)
    recon = reconstruction_metrics(vae, held_out["images"], held_out["masks"], batch_size=32)
    # Evaluation-only diagnostic with ground truth: how well the frozen autoencoder represents organ masks caps the
    # Dice stage 2 can reach (the autoencoder itself never saw a label).
    organ_masks = held_out_organ_masks(store, test_ids, organ_ids, args.holdout_slices, seed)
    recon["organ_mask_dice"] = reconstruction_metrics(vae, masks=organ_masks, batch_size=32)["mask_dice"]
    recon_seconds = time.perf_counter() - t_recon
    print(f"fold {fold} autoencoder: {ae_iterations} it in {ae_loop_seconds:.1f} s, scaling factor "
          f"{vae.config.scaling_factor:.4f}; held-out image PSNR {recon['image_psnr']:.2f} dB, supervoxel-mask "
          f"Dice {100 * recon['mask_dice']:.2f}, organ-mask Dice {100 * recon['organ_mask_dice']:.2f}", flush=True)

    # ---------------------------------------------------------------- stage 2: segmenter
    if args.seg_threads:
        torch.set_num_threads(args.seg_threads)
    t_stage2 = time.perf_counter()
    net = build_no_prior_sdfsmis(
        vae, unet_width, seed=seed, use_sii=not args.no_sii, use_qe=not args.no_qe, use_vtct=not args.no_vtct,
        sii_mode=args.sii_mode, vae_sample_in_training=args.vae_sample,
    ).to(device)
    episodes = EpisodeDataset(
        store, train_ids, length=_virtual_length(args.seg_iters) * args.seg_batch, setting=args.setting,
        exclude_labels=organ_ids,
        augment=None if args.no_augment else RPTAugmentd(), seed=seed,
    )
    groups = net.parameter_groups(lr_unet=args.seg_lr, lr_new=args.seg_lr, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    seg_loader = _loader(episodes, args.seg_batch, workers, device)
    cache = None if args.no_latent_cache else LatentCache()
    seg_trainer = EpisodeTrainer(device=device, max_epochs=1, train_data_loader=seg_loader, network=net,
                                 optimizer=optimizer, grad_clip=1.0, amp=True, epoch_length=len(seg_loader),
                                 latent_cache=cache)
    seg_seconds = _budget_seconds(args.seg_seconds)
    if args.total_minutes:
        # Both stages share one wall-clock budget: stage 2 gets what stage 1 left.
        left = args.total_minutes * 60.0 - stage1_seconds
        if left <= 0:
            raise ValueError(f"--total_minutes {args.total_minutes}: stage 1 alone took {stage1_seconds:.0f} s.")
        seg_seconds = left if seg_seconds is None else min(seg_seconds, left)
    seg_budget = attach_budget(seg_trainer, optimizer, max_iterations=args.seg_iters, max_seconds=seg_seconds,
                               schedule="cosine", warmup_iterations=_warmup(args.seg_warmup, args.seg_iters))
    losses = _record_losses(seg_trainer)
    inferer = SlidingSupportInferer(sw_batch_size=args.sw_batch_size, spatial_size=args.spatial_size, device=device)

    def evaluate(output_dir: Path, baseline: bool, overlays: int) -> dict[str, Any]:
        net.eval()
        try:
            return evaluate_protocol(
                net, store, fold_ids=[fold], organ_ids=organ_ids, inferer=inferer, output_dir=output_dir,
                baseline=baseline, overlays=overlays, method=METHOD, baseline_name=BASELINE, folds=folds,
                organ_names=organ_names, surface_metrics=args.surface_metrics, device=device, progress=progress,
            )
        finally:
            net.train()

    curve: list[dict[str, Any]] = []
    pending = sorted(m for m in args.eval_at_minutes if m > 0)

    def evaluate_on_schedule(engine: Any) -> None:
        # Training time = stage 1 + stage-2 loop (evaluations excluded by pausing the budget's clocks).
        minutes = (stage1_seconds + seg_budget.seconds()) / 60.0
        while pending and minutes >= pending[0]:
            target = pending.pop(0)
            with seg_budget.paused():
                t0 = time.perf_counter()
                result = evaluate(fold_dir / f"protocol_{target:g}min", baseline=False, overlays=0)
                summary = result["methods"][METHOD]["summary"]
                curve.append({"minutes": round(minutes, 2), "target_minutes": target,
                              "segmenter_iterations": seg_budget.iterations, "dice": summary["dice"],
                              "evaluation_seconds": time.perf_counter() - t0})
                print(f"fold {fold} at {minutes:.1f} min ({seg_budget.iterations} segmenter it): mean Dice "
                      f"{100 * summary['dice']['mean']:.2f}", flush=True)

    if pending:
        from ignite.engine import Events

        seg_trainer.add_event_handler(Events.ITERATION_COMPLETED, evaluate_on_schedule)
    if progress:
        from monai_sdfsmis.progress import attach_progress

        attach_progress(seg_trainer, "segmenter", output_transform=lambda out: {"loss": _loss_of(out)})
    seg_trainer.run()
    _sync(device)
    stage2_loop_seconds = seg_budget.elapsed
    stage2_seconds = time.perf_counter() - t_stage2 - sum(c["evaluation_seconds"] for c in curve)
    training_seconds = stage1_seconds + stage2_seconds
    net.save_trained(fold_dir / "model.safetensors")
    tail = losses[-max(1, len(losses) // 10):]
    cache_note = "" if cache is None else f", latent cache {len(cache)} entries, hit rate {100 * cache.hit_rate:.1f} %"
    print(f"fold {fold} segmenter: {seg_budget.iterations} it x {args.seg_batch} episodes in {stage2_loop_seconds:.1f} s "
          f"(stopped by {seg_budget.stopped_by or 'end of data'}), final loss {sum(tail) / len(tail):.4f}{cache_note}; "
          f"training total {training_seconds:.1f} s", flush=True)

    # ---------------------------------------------------------------- protocol
    t_eval = time.perf_counter()
    evaluation = evaluate(fold_dir / "protocol", baseline=True, overlays=args.overlays)
    net.eval()
    eval_seconds = time.perf_counter() - t_eval
    rows = {name: r["rows"] for name, r in evaluation["methods"].items()}
    curve.append({"minutes": round(training_seconds / 60.0, 2), "target_minutes": None,
                  "segmenter_iterations": seg_budget.iterations,
                  "dice": evaluation["methods"][METHOD]["summary"]["dice"], "evaluation_seconds": eval_seconds})
    return {
        "fold": fold,
        "train_ids": train_ids,
        "test_ids": test_ids,
        "rows": rows,
        "learning_curve": curve,
        "timing": {
            "stage1_loop_seconds": ae_loop_seconds,
            "calibration_seconds": calib_seconds,
            "stage1_seconds": stage1_seconds,
            "reconstruction_check_seconds": recon_seconds,
            "stage2_loop_seconds": stage2_loop_seconds,
            "stage2_seconds": stage2_seconds,
            "training_seconds": training_seconds,
            "evaluation_seconds": eval_seconds,
        },
        "autoencoder": {
            "width": ae_width, "iterations": ae_iterations, "batch": args.ae_batch,
            "reused_from": None if args.autoencoder is None else str(args.autoencoder),
            "scaling_factor": float(vae.config.scaling_factor),
            "parameters": sum(p.numel() for p in vae.parameters()), "loss_curve": loss_curve(ae_losses), **recon,
        },
        "segmenter": {
            "width": unet_width, "iterations": seg_budget.iterations, "batch": args.seg_batch,
            "episodes": seg_budget.iterations * args.seg_batch, "final_loss": sum(tail) / len(tail) if tail else None,
            "stopped_by": seg_budget.stopped_by,
            "episodes_per_second": seg_budget.iterations * args.seg_batch / max(stage2_loop_seconds, 1e-9),
            "latent_cache": None if cache is None else {"entries": len(cache), "hit_rate": cache.hit_rate},
            "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "loss_curve": loss_curve(losses),
        },
    }


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import diffusers
        import monai

        env.update(monai=monai.__version__, diffusers=diffusers.__version__)
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return env


def merge_results(fold_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summaries (paper aggregation) over every fold record, per method."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(fold_records, key=lambda r: r["fold"]):
        for name, rows in record["rows"].items():
            by_method.setdefault(name, []).extend(rows)

    def measured(metric: str, rows: list[dict[str, Any]]) -> bool:
        # HD95/ASSD are NaN/None when --surface_metrics is off: leave them out of the summary.
        return any(r.get(metric) is not None and math.isfinite(float(r[metric])) for r in rows)

    return {name: summarize(rows, metrics=[m for m in ("dice", "hd95", "assd") if measured(m, rows)])
            for name, rows in by_method.items()}


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    """``results.md``: Table-1-style table, per-fold per-organ Dice, timings and autoencoder quality."""
    summaries = results["summaries"]
    env = results["environment"]
    config = results["config"]
    lines = [
        "# No-prior SD-FSMIS on the few-shot protocol",
        "",
        f"Dataset `{config.get('dataset_dir')}`, Setting {config.get('setting')}, folds {results['folds_done']}, "
        f"widths AE `{config.get('ae_width')}` / UNet `{config.get('unet_width')}`, "
        f"device {env.get('gpu') or env.get('device')}.",
        "",
        *([f"Note: {config['note']}.", ""] if config.get("note") else []),
        format_table({name: summaries[name] for name in (BASELINE, METHOD) if name in summaries},
                     metric="dice", title=folds_title("Dice (%)", summaries)),
    ]
    organs = next(iter(summaries.values()))["organs"] if summaries else []
    # Table 1's column order and headings (Spleen, Liver, LK, RK), then any other organ.
    organs = [o for o in ORGAN_COLUMNS if o in organs] + [o for o in organs if o not in ORGAN_COLUMNS]
    headings = [ORGAN_COLUMNS.get(o, o) for o in organs]
    if METHOD in summaries:
        per_fold = summaries[METHOD]["dice"]["per_fold"]
        base = summaries.get(BASELINE, {}).get("dice", {}).get("per_fold", {})
        lines += [f"Per fold, {METHOD} Dice (%), with the support-mask copy's mean:", "",
                  "| Fold | " + " | ".join(headings) + " | Mean | support copy |",
                  "|---" * (len(organs) + 3) + "|"]
        for fold, entry in per_fold.items():
            cells = [_cell(entry.get(o), 100) for o in organs]
            cells += [_cell(entry.get("mean"), 100), _cell(base.get(fold, {}).get("mean"), 100)]
            lines.append(f"| {fold} | " + " | ".join(cells) + " |")
        lines.append("")
    copy_dice = summaries.get(BASELINE, {}).get("dice", {}).get("per_fold", {})
    for record in results["fold_records"]:
        curve = record.get("learning_curve") or []
        if len(curve) < 2:
            continue
        lines += [f"Learning curve of fold {record['fold']} (training minutes, evaluations excluded), Dice (%):", "",
                  "| training min | segmenter it | " + " | ".join(headings) + " | Mean |", "|---" * (len(organs) + 3) + "|"]
        for point in curve:
            entry = point["dice"]["per_fold"].get(str(record["fold"]), {})
            cells = [_cell(entry.get(o), 100) for o in organs] + [_cell(entry.get("mean"), 100)]
            lines.append(f"| {point['minutes']:.1f} | {point['segmenter_iterations']} | " + " | ".join(cells) + " |")
        base = copy_dice.get(str(record["fold"]), {})
        if base:
            cells = [_cell(base.get(o), 100) for o in organs] + [_cell(base.get("mean"), 100)]
            lines.append(f"| {BASELINE} | - | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Training time and autoencoder quality per fold (held-out = the fold's test volumes):", "",
              "| Fold | stage 1 (s) | stage 2 (s) | training total (s) | AE it | seg it x batch | AE scale | "
              "image PSNR (dB) | supervoxel-mask Dice (%) | organ-mask Dice (%) | eval (s) |",
              "|---" * 11 + "|"]
    for record in results["fold_records"]:
        t, ae, seg = record["timing"], record["autoencoder"], record["segmenter"]
        lines.append(
            f"| {record['fold']} | {t['stage1_seconds']:.1f} | {t['stage2_seconds']:.1f} | {t['training_seconds']:.1f} | "
            f"{ae['iterations']} | {seg['iterations']} x {seg['batch']} | {ae['scaling_factor']:.4f} | "
            f"{_cell(ae.get('image_psnr'))} | {_cell(ae.get('mask_dice'), 100)} | {_cell(ae.get('organ_mask_dice'), 100)} | "
            f"{t['evaluation_seconds']:.1f} |"
        )
    lines += ["", "Stage-2 throughput: " + "; ".join(
        f"fold {r['fold']} {r['segmenter'].get('episodes_per_second', float('nan')):.2f} episodes/s"
        + (f" (latent cache hit rate {100 * r['segmenter']['latent_cache']['hit_rate']:.1f} %)"
           if r["segmenter"].get("latent_cache") else " (no latent cache)")
        for r in results["fold_records"])]
    lines += ["", "Loss over training (mean of each tenth; stage 1 L1+KL, stage 2 latent MSE):", ""]
    for record in results["fold_records"]:
        for stage, key in (("stage 1", "autoencoder"), ("stage 2", "segmenter")):
            curve = record[key].get("loss_curve") or []
            lines.append(f"- fold {record['fold']} {stage}: " + " ".join(f"{v:.4g}" for v in curve))
    return "\n".join(lines) + "\n"


def _write(output_dir: Path, results: dict[str, Any]) -> None:
    write_json(output_dir / RESULTS_JSON, results)  # strict JSON: NaN -> null
    atomic_write(output_dir / RESULTS_MD, render_markdown(results))


def _merge_folders(folders: list[Path], output_dir: Path) -> dict[str, Any]:
    records: dict[int, dict[str, Any]] = {}
    base: dict[str, Any] | None = None
    for folder in folders:
        path = folder / RESULTS_JSON
        if not path.is_file():
            raise FileNotFoundError(f"--merge: '{path}' does not exist.")
        content = json.loads(path.read_text())
        base = base or content
        for record in content["fold_records"]:
            records[int(record["fold"])] = record
    assert base is not None
    fold_records = [records[k] for k in sorted(records)]
    results = {**base, "fold_records": fold_records, "folds_done": sorted(records),
               "summaries": merge_results(fold_records), "merged_from": [str(f) for f in folders]}
    output_dir.mkdir(parents=True, exist_ok=True)
    _write(output_dir, results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        results = _merge_folders(args.merge, args.output_dir)
        print(render_markdown(results))
        return results
    device = _device(args.device)
    # Deliberate: on a shared CPU, OpenMP threads that outnumber the free cores fight each other.
    torch.set_num_threads(args.threads or max(1, min(8, os.cpu_count() or 1)))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    records = find_alpnet_volumes(args.dataset_dir, supervoxel_dir=args.supervoxel_dir, require_labels=True,
                                  require_supervoxels=True)
    folds = _folds(args.fold_definition, len(records))
    unknown = [k for k in args.folds if not 0 <= k < len(folds)]
    if unknown:
        raise ValueError(f"--folds {unknown} do not exist; the dataset '{args.dataset_dir}' has {len(folds)} folds.")
    for fold in args.folds:  # fail now rather than after training: every test fold needs a support and a query
        try:
            support_and_queries(fold_split(records, fold, folds)[1])
        except ValueError as err:
            raise ValueError(f"--fold_definition: fold {fold} of '{args.dataset_dir}' cannot be evaluated: {err}") from err
    store = VolumeStore(records, intensity=args.intensity, spatial_size=args.spatial_size)
    store.preload(kinds=("image", "supervoxel", "label"), progress=not args.no_progress)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(ae_width=args.ae_width or WIDTHS[args.width][0], unet_width=args.unet_width or WIDTHS[args.width][1],
                  folds_definition=folds, vtct="learned condition embedding (no image encoder)")
    results: dict[str, Any] = {"config": config, "environment": _environment(device), "fold_records": [],
                               "folds_done": [], "summaries": {}}
    for fold in args.folds:
        record = run_fold(args, fold, store, folds, device)
        results["fold_records"].append(record)
        results["folds_done"].append(fold)
        results["summaries"] = merge_results(results["fold_records"])
        _write(args.output_dir, results)
        print(format_table({n: results["summaries"][n] for n in (BASELINE, METHOD)}, metric="dice",
                           title=f"Dice (%) after folds {results['folds_done']}"), flush=True)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
