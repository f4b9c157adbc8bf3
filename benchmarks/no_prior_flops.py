"""Floating-point operations of the no-prior mode per training item, counted with ``torch.utils.flop_counter``.

For each autoencoder width: parameters, one stage-1 training step per slice (forward + backward), one frozen
encoding per slice, and one stage-2 episode (four frozen encodings, support and query UNet passes, backward) with
the given UNet width, all at ``--size`` x ``--size``. Counts matrix products and convolutions (what the counter
sees), not normalisation or element-wise work.

    python benchmarks/no_prior_flops.py [--size 256] [--unet_width default] [--widths small default]
"""

from __future__ import annotations

__all__ = ["count_flops", "main"]

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate  # noqa: E402
from monai_sdfsmis.networks.autoencoder import autoencoder_loss, build_autoencoder  # noqa: E402
from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis  # noqa: E402


def count_flops(work: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--unet_width", default="default")
    p.add_argument("--widths", nargs="+", default=["small", "default"], help="autoencoder widths")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    image = torch.rand(1, 3, args.size, args.size) * 2 - 1
    label = torch.zeros(1, 1, args.size, args.size)
    label[..., args.size // 3: args.size // 2, args.size // 3: args.size // 2] = 1
    rows = []
    print(f"| autoencoder | parameters | stage-1 step / slice | frozen encoding / slice | stage-2 episode ({args.unet_width} UNet) |")
    print("|---|---|---|---|---|")
    for width in args.widths:
        vae = build_autoencoder(width, sample_size=args.size)
        stage1 = count_flops(lambda: autoencoder_loss(vae, image)[0].backward())
        vae = freeze_and_calibrate(vae, image)

        def encode() -> None:
            with torch.no_grad():
                vae.encode(image)

        encoding = count_flops(encode)
        net = build_no_prior_sdfsmis(vae, args.unet_width)
        episode = count_flops(lambda: net.compute_loss(image, label, image, label).backward())
        row = {"width": width, "parameters": sum(q.numel() for q in vae.parameters()), "stage1_step": stage1,
               "encoding": encoding, "episode": episode}
        rows.append(row)
        print(f"| {width} | {row['parameters'] / 1e6:.2f} M | {stage1 / 1e9:.1f} GFLOP | {encoding / 1e9:.1f} GFLOP | "
              f"{episode / 1e9:.1f} GFLOP |")
    return rows


if __name__ == "__main__":
    main()
