"""Stage-2 training speed with and without the latent cache, in one process on the same episodes.

Three timed passes over the same ``--iters`` batches of real CHAOS episodes (fold 0's training volumes),
each with a freshly initialised segmenter and optimiser so that they do the same work:

1. ``no cache``: the frozen encoder encodes all four images of every episode (what stage 2 did before);
2. ``cache, cold``: a :class:`~monai_sdfsmis.networks.latent_cache.LatentCache` starting empty (its hit
   rate is printed: a short run sees few repeats);
3. ``cache, warm``: the same batches again with the cache filled by pass 2, i.e. the steady state of a
   long run in which every un-augmented slice and mask has been seen.

Augmented sides are never cached, so with RPT augmentation (``--augment``) the warm pass still encodes
them; without augmentation the warm pass encodes nothing. The hit rate a real run reaches is printed by
``benchmarks/no_prior_protocol.py`` at the end of stage 2.

Example (CPU, the numbers in RESULTS.md)::

    python benchmarks/latent_cache_speed.py --dataset_dir ../shared/data/chaos_t2spir --spatial_size 128 --iters 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.data.episodes import EpisodeDataset  # noqa: E402
from monai_sdfsmis.data.layouts import find_alpnet_volumes  # noqa: E402
from monai_sdfsmis.data.protocol import fold_split, rpt_folds  # noqa: E402
from monai_sdfsmis.data.volumes import VolumeStore  # noqa: E402
from monai_sdfsmis.engines.trainer import EpisodeTrainer  # noqa: E402
from monai_sdfsmis.networks.autoencoder import build_autoencoder  # noqa: E402
from monai_sdfsmis.networks.latent_cache import LatentCache  # noqa: E402
from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis  # noqa: E402
from monai_sdfsmis.transforms.augmentation import RPTAugmentd  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_dir", type=Path, required=True, help="ALPNet-layout dataset (e.g. CHAOS T2-SPIR)")
    p.add_argument("--spatial_size", type=int, default=128)
    p.add_argument("--ae_width", default="small")
    p.add_argument("--unet_width", default="small")
    p.add_argument("--batch", type=int, default=8, help="episodes per iteration")
    p.add_argument("--iters", type=int, default=20, help="iterations per timed pass")
    p.add_argument("--augment", action="store_true", help="RPT augmentation of the episodes (augmented sides are not cached)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--volumes", choices=("fold0", "all"), default="fold0",
                   help="episodes from fold 0's training volumes (RPT folds) or from every volume")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    records = find_alpnet_volumes(args.dataset_dir, require_supervoxels=True)
    if args.volumes == "all":
        train_ids = [r.id for r in records]
    else:
        train_ids = [r.id for r in fold_split(records, 0, rpt_folds(len(records)))[0]]
    store = VolumeStore(records, spatial_size=args.spatial_size)
    episodes = EpisodeDataset(store, train_ids, length=args.iters * args.batch,
                              augment=RPTAugmentd() if args.augment else None, seed=args.seed)
    loader = torch.utils.data.DataLoader(episodes, batch_size=args.batch, shuffle=False, num_workers=0)
    batches = list(loader)  # the same batches for every pass; loading is not timed
    torch.manual_seed(args.seed)
    vae = build_autoencoder(args.ae_width, sample_size=args.spatial_size).eval().requires_grad_(False)
    cache = LatentCache()
    results: dict[str, dict[str, float]] = {}
    for name, use_cache in (("no cache", False), ("cache, cold", True), ("cache, warm", True)):
        net = build_no_prior_sdfsmis(vae, args.unet_width, seed=args.seed, require_calibration=False)
        optimizer = torch.optim.AdamW(net.parameter_groups(lr_unet=1e-4, lr_new=1e-4))
        trainer = EpisodeTrainer(device="cpu", max_epochs=1, train_data_loader=batches, network=net, optimizer=optimizer,
                                 epoch_length=len(batches), latent_cache=cache if use_cache else None)
        hits, misses = cache.hits, cache.misses
        start = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - start
        served = (cache.hits - hits) + (cache.misses - misses)
        rate = (cache.hits - hits) / served if use_cache and served else 0.0
        results[name] = {"seconds": seconds, "episodes_per_second": args.iters * args.batch / seconds, "hit_rate": rate}
        print(f"{name:12s}: {args.iters} it x {args.batch} episodes in {seconds:.1f} s = "
              f"{results[name]['episodes_per_second']:.2f} episodes/s, cache hit rate {100 * rate:.1f} %", flush=True)
    base = results["no cache"]["episodes_per_second"]
    print(f"speed-up of the warm cache: {results['cache, warm']['episodes_per_second'] / base:.2f}x "
          f"({len(cache)} cached entries; {args.spatial_size} px, AE {args.ae_width}, UNet {args.unet_width}, "
          f"batch {args.batch}, {args.threads} threads, augmentation {'on' if args.augment else 'off'})")
    return results


if __name__ == "__main__":
    main()
