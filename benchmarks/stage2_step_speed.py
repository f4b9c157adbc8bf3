"""Seconds per stage-2 iteration of the no-prior network, its frozen autoencoder in the default or channels-last order.

Builds the recipe's network at the ``cpu`` preset's sizes (``small`` autoencoder and UNet, 128 px, batches of 8
episodes) from random weights (speed does not depend on them) and times, alternating the memory formats so that a
drifting machine affects both alike:

* ``encode``: the frozen encoder on the 32 images of a batch (what a stage-2 iteration encodes when the latent
  cache has none of them; RPT augmentation changes most);
* ``step``: ``compute_loss`` + backward + AdamW step on the batch, every image encoded.

``contiguous`` is what the package runs (``FrozenAutoencoderMixin.encode_posterior``); ``channels_last`` encodes with
a copy of the same autoencoder whose weights and input batch are in channels-last order, called through diffusers
directly. Both feed the same ``compute_loss`` (``posteriors=``). Measured in session 11 (benchmarks/RESULTS.md 17):
the encoder gained 1.1-1.35x, an iteration nothing beyond the machine's noise, so the package stays contiguous.
Example::

    python benchmarks/stage2_step_speed.py --threads 2 --repeats 3 --output benchmarks/results/stage2_step_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_sdfsmis.networks.autoencoder import build_autoencoder  # noqa: E402
from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis  # noqa: E402
from monai_sdfsmis.utils import configure_cpu_threads  # noqa: E402


def _seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two formats")
    parser.add_argument("--size", type=int, default=128, help="slice side (the cpu preset's 128)")
    parser.add_argument("--batch", type=int, default=8, help="episodes per iteration (the cpu preset's 8)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    configure_cpu_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    autoencoder = build_autoencoder("small", sample_size=args.size)
    autoencoder.config.scaling_factor = 0.6  # stands for the calibrated one; speed does not depend on it
    network = build_no_prior_sdfsmis(autoencoder, "small", seed=0, require_calibration=False).train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-5)
    shape = (args.batch, 3, args.size, args.size)
    support, query = (torch.rand(shape, generator=generator) * 2 - 1 for _ in range(2))
    support_mask, query_mask = ((torch.rand((args.batch, 1, args.size, args.size), generator=generator) > 0.7).float()
                                for _ in range(2))
    images = torch.cat([support, network.mask_to_image(support_mask), query, network.mask_to_image(query_mask)])

    permuted = copy.deepcopy(network.vae).to(memory_format=torch.channels_last)
    encoders = {
        "contiguous": lambda: network.encode_posterior(images),
        "channels_last": lambda: permuted.encode(images.contiguous(memory_format=torch.channels_last)).latent_dist.parameters,
    }

    def step(encode) -> None:
        optimizer.zero_grad()
        with torch.no_grad():
            posteriors = encode().chunk(4)
        network.compute_loss(support, support_mask, query, query_mask, posteriors=posteriors).backward()
        optimizer.step()

    results: dict[str, dict[str, list[float]]] = {name: {"step": [], "encode": []} for name in encoders}
    for _ in range(args.rounds):
        for name, encode in encoders.items():
            with torch.no_grad():
                results[name]["encode"].append(_seconds(encode, args.repeats))
            results[name]["step"].append(_seconds(lambda: step(encode), args.repeats))
    report = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
        "size": args.size, "batch": args.batch, "repeats": args.repeats, "rounds": args.rounds,
        "seconds": results,
    }
    for name, figures in results.items():
        print(f"{name:14s} step " + " ".join(f"{s:.2f}" for s in figures["step"])
              + " s | encode 32 images " + " ".join(f"{s:.2f}" for s in figures["encode"]) + " s")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
