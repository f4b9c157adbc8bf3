"""How much of the query's region a support prototype finds without training, and what the mean-latent plateau costs.

With a trained no-prior model folder (its frozen stage-1 autoencoder), on CHAOS:

1. Training episodes (the recipe's supervoxel episodes of the fold's training volumes): the latent MSE of the
   support-blind per-cell mean of the query mask latents (what the segmenter predicts on its mean-latent plateau)
   against that of the support's own mask latent (the copy).
2. Localisation: the cosine similarity of each query latent cell with the support's masked-average prototype
   (what query enhancement computes), as a score of "this cell is the support's region", its ROC AUC against the
   query mask's cells; for the 4-channel latent and for the encoder's last features (before its output
   convolution), and for the support mask itself at the same cells (the copy's localisation). On the training
   episodes and on cross-patient pairs of the fold's test volumes (each organ's middle slice, every ordered pair).

Example::

    python benchmarks/prototype_localisation.py --model runs/f0_30/model --dataset_dir ../shared/data/chaos_t2spir \
        --fold 0 --output benchmarks/results/prototype_localisation/fold0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from monai_sdfsmis.data import EpisodeDataset, VolumeStore, find_alpnet_volumes, fold_split
from monai_sdfsmis.networks.autoencoder import load_autoencoder
from monai_sdfsmis.utils import atomic_write, configure_cpu_threads

ORGANS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}


def roc_auc(target: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC of ``score`` for the boolean ``target`` (ties share their mean rank)."""
    target = np.asarray(target, dtype=bool)
    ranks = rankdata(score)
    positives, negatives = int(target.sum()), int(target.size - target.sum())
    return float((ranks[target].sum() - positives * (positives + 1) / 2) / (positives * negatives))


class Features:
    """The frozen encoder's posterior mean and its last features (a hook on the activation before ``conv_out``)."""

    def __init__(self, model_dir: Path) -> None:
        self.vae = load_autoencoder(model_dir / "autoencoder").eval()
        self._last: dict[str, torch.Tensor] = {}
        self.vae.encoder.conv_act.register_forward_hook(lambda module, args, out: self._last.update(features=out))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor
        return latent, self._last["features"]

    @torch.no_grad()
    def mask_latent(self, masks: torch.Tensor) -> torch.Tensor:
        return self.vae.encode((masks * 2 - 1).repeat(1, 3, 1, 1)).latent_dist.mean * self.vae.config.scaling_factor


def cell_aucs(support: torch.Tensor, query: torch.Tensor, support_mask: torch.Tensor, query_mask: torch.Tensor) -> list:
    """AUC per item of the cosine map of ``query`` ``[B, C, h, w]`` with the masked-average prototype of ``support``."""
    size = tuple(query.shape[-2:])
    weights = F.interpolate(support_mask, size=size, mode="area")
    prototype = (support * weights).sum((2, 3)) / weights.sum((2, 3))
    similarity = F.cosine_similarity(query, prototype[:, :, None, None], dim=1)
    targets = F.interpolate(query_mask, size=size, mode="area")[:, 0] > 0.5
    return [roc_auc(t.flatten().numpy(), s.flatten().numpy()) for t, s in zip(targets, similarity) if 0 < t.sum() < t.numel()]


def copy_aucs(support_mask: torch.Tensor, query_mask: torch.Tensor, size: tuple[int, int]) -> list:
    """AUC per item of the support mask's area fraction per cell, blurred over 3 x 3 cells, as the score."""
    scores = F.avg_pool2d(F.interpolate(support_mask, size=size, mode="area"), 3, 1, 1)[:, 0]
    targets = F.interpolate(query_mask, size=size, mode="area")[:, 0] > 0.5
    return [roc_auc(t.flatten().numpy(), s.flatten().numpy()) for t, s in zip(targets, scores) if 0 < t.sum() < t.numel()]


def training_episodes(features: Features, store: VolumeStore, n: int, seed: int) -> dict:
    episodes = EpisodeDataset(store, length=n, seed=seed)
    batch = {k: torch.stack([episodes[i][k] for i in range(n)]) for k in
             ("support_image", "support_label", "query_image", "query_label")}
    rows: dict[str, list] = {"latent": [], "encoder": [], "copy": []}
    query_latents, support_latents = [], []
    for start in range(0, n, 32):
        part = {k: v[start:start + 32] for k, v in batch.items()}
        (ls, es), (lq, eq) = features(part["support_image"]), features(part["query_image"])
        rows["latent"] += cell_aucs(ls, lq, part["support_label"], part["query_label"])
        rows["encoder"] += cell_aucs(es, eq, part["support_label"], part["query_label"])
        rows["copy"] += copy_aucs(part["support_label"], part["query_label"], tuple(lq.shape[-2:]))
        query_latents.append(features.mask_latent(part["query_label"]))
        support_latents.append(features.mask_latent(part["support_label"]))
    zq, zs = torch.cat(query_latents), torch.cat(support_latents)
    return {
        "episodes": n,
        "mse_per_cell_mean": float(((zq - zq.mean(dim=0, keepdim=True)) ** 2).mean()),
        "mse_support_mask_latent": float(((zq - zs) ** 2).mean()),
        "auc": {k: float(np.mean(v)) for k, v in rows.items()},
    }


def cross_patient(features: Features, store: VolumeStore) -> dict:
    out = {}
    for organ, name in ORGANS.items():
        rows: dict[str, list] = {"latent": [], "encoder": [], "copy": []}
        for a in store.ids:
            for b in store.ids:
                if a == b:
                    continue
                sides = []
                for vid in (a, b):
                    label = store.label(vid)
                    present = np.flatnonzero((label == organ).any(axis=(0, 1)))
                    z = int(present[len(present) // 2])
                    image = torch.from_numpy(store.image(vid)[None, None, :, :, z].copy()).repeat(1, 3, 1, 1)
                    sides.append((image, torch.from_numpy((label[None, None, :, :, z] == organ).astype(np.float32))))
                (si, sm), (qi, qm) = sides
                (ls, es), (lq, eq) = features(si), features(qi)
                rows["latent"] += cell_aucs(ls, lq, sm, qm)
                rows["encoder"] += cell_aucs(es, eq, sm, qm)
                rows["copy"] += copy_aucs(sm, qm, tuple(lq.shape[-2:]))
        out[name] = {k: float(np.mean(v)) for k, v in rows.items()} | {"pairs": len(rows["latent"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a no-prior model folder (with autoencoder/)")
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args()
    configure_cpu_threads(args.threads)
    config = json.loads((args.model / "model_config.json").read_text())
    size, intensity = int(config["spatial_size"]), config.get("intensity", "minmax")
    records = find_alpnet_volumes(args.dataset_dir, supervoxel_dir="supervoxels_5000")
    train, test = fold_split(records, args.fold)[:2]
    features = Features(args.model)
    result = {
        "model": str(args.model), "fold": args.fold, "spatial_size": size,
        "training_episodes": training_episodes(features, VolumeStore(train, intensity=intensity, spatial_size=size),
                                               args.episodes, args.seed),
        "cross_patient_middle_slices": cross_patient(features, VolumeStore(test, intensity=intensity, spatial_size=size)),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.output, text)


if __name__ == "__main__":
    main()
