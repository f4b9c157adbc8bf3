"""Command line: ``python -m monai_sdfsmis <command> ...`` (also installed as ``sdfsmis``).

Each command is a small ``_add_<name>(subparsers)`` that declares its arguments and a ``_run_<name>(args)`` that does
the work; add new commands to ``_COMMANDS``. User errors (``ValueError``, ``FileNotFoundError``) are printed as one line
and give exit code 1, without a traceback.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import re
import sys
from pathlib import Path

_IMAGE_INDEX = re.compile(r"^image_(\d+)\.nii(\.gz)?$")


def _image_sort_key(path: Path) -> tuple[float, str]:
    match = _IMAGE_INDEX.match(path.name)
    return (int(match.group(1)) if match else float("inf"), path.name)


def _add_supervoxels(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "supervoxels",
        help="compute 3-D Felzenszwalb supervoxel pseudo-labels (ADNet/RPT) for a dataset folder",
        description="Write superpix-MIDDLE_{N}.nii.gz for every image_{N}.nii.gz (or the files given by --images).",
    )
    parser.add_argument("--dataset_dir", type=Path, help="folder holding image_*.nii.gz")
    parser.add_argument("--images", type=Path, nargs="+", help="explicit image files instead of the dataset glob")
    parser.add_argument("--out_dir", type=Path, help="output folder (default: DATASET_DIR/supervoxels_{MIN_SIZE})")
    parser.add_argument("--min_size", type=int, default=5000, help="minimum supervoxel size in voxels (default 5000)")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run_supervoxels)


def _run_supervoxels(args: argparse.Namespace) -> int:
    if args.dataset_dir is None and not args.images:
        raise ValueError("give --dataset_dir (uses image_*.nii.gz there) or --images FILE [FILE ...].")
    if args.dataset_dir is not None and not args.dataset_dir.is_dir():
        if args.dataset_dir.exists():
            raise ValueError(f"dataset folder {args.dataset_dir} is a file, not a folder")
        raise FileNotFoundError(f"dataset folder not found: {args.dataset_dir}")
    if args.images:
        images = list(args.images)
    else:
        images = sorted(args.dataset_dir.glob("image_*.nii.gz"), key=_image_sort_key)
        if not images:
            raise FileNotFoundError(f"no image_*.nii.gz files in {args.dataset_dir}")
    if args.out_dir is not None:
        out_dir = args.out_dir
    elif args.dataset_dir is not None:
        out_dir = args.dataset_dir / f"supervoxels_{args.min_size}"
    else:
        raise ValueError("--out_dir is required when --images is used without --dataset_dir.")

    # imported here so that `--help` and other commands do not pay for numba
    from monai_sdfsmis.data.supervoxels import write_supervoxels

    existing = set() if args.overwrite or not out_dir.is_dir() else set(out_dir.iterdir())
    written = write_supervoxels(
        images, out_dir, min_size=args.min_size, progress=not args.no_progress, overwrite=args.overwrite
    )
    skipped = sum(p in existing for p in written)
    print(f"supervoxels: {len(written) - skipped} written, {skipped} already present, in {out_dir}")
    return 0


def _add_protocol(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "protocol",
        help="run the few-shot evaluation protocol (RPT folds, 3 chunks) and print the Table-1-style table",
        description=(
            "Evaluate the support-mask copy baseline and, with --checkpoint, a trained network on every fold of an "
            "ALPNet-layout dataset: Dice per query volume, HD95/ASSD in mm, CSV/JSON/markdown and PNG overlays."
        ),
    )
    parser.add_argument("--dataset_dir", type=Path, required=True, help="ALPNet-layout folder (image_N, label_N)")
    parser.add_argument("--output_dir", type=Path, default=Path("protocol_results"), help="where results are written")
    parser.add_argument("--folds", type=int, nargs="+", help="fold indices (default: all)")
    parser.add_argument("--organs", type=int, nargs="+", default=[1, 2, 3, 4], help="organ label ids (CHAOS ids)")
    parser.add_argument("--organ_set", choices=("chaos", "sabs"), default="chaos", help="organ names and label ids")
    parser.add_argument("--intensity", default="minmax", help="intensity preset: minmax, mr, ct or zscore")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="trained SD-FSMIS weights (bundle models/model.pt or save_trained .safetensors); omit for the baseline only",
    )
    parser.add_argument("--network", choices=("pretrained", "tiny"), default="pretrained", help="architecture")
    parser.add_argument("--sd_weights", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="SD id or path")
    parser.add_argument("--image_encoder_weights", default="facebook/dinov2-small", help="DINOv2 id or path")
    parser.add_argument("--local_files_only", action="store_true", help="never contact the Hugging Face hub")
    parser.add_argument("--overlays", type=int, default=2, help="PNG overlays per query volume (0 for none)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run_protocol)


def _run_protocol(args: argparse.Namespace) -> int:
    if not args.dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {args.dataset_dir}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")

    import torch

    from monai_sdfsmis.data.protocol import CHAOS_ORGANS, SABS_ORGANS
    from monai_sdfsmis.engines import evaluate_protocol

    network = None
    if args.checkpoint is not None:
        from monai_sdfsmis.networks import SDFSMIS

        if args.network == "tiny":
            network = SDFSMIS.tiny()
        else:
            network = SDFSMIS.from_pretrained(
                args.sd_weights, args.image_encoder_weights, local_files_only=args.local_files_only or None
            )
        network.load_trained(args.checkpoint)
        network = network.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    result = evaluate_protocol(
        network,
        args.dataset_dir,
        fold_ids=args.folds,
        organ_ids=args.organs,
        output_dir=args.output_dir,
        baseline=True,
        overlays=args.overlays,
        organ_names=SABS_ORGANS if args.organ_set == "sabs" else CHAOS_ORGANS,
        intensity=args.intensity,
        progress=not args.no_progress,
    )
    print(result["table"])
    print(f"protocol: results written to {args.output_dir}")
    return 0


_COMMANDS = (_add_supervoxels, _add_protocol)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monai_sdfsmis", description="SD-FSMIS tools for MONAI.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns the exit code.

    Argument errors exit through ``argparse`` (code 2); data errors print ``error: ...`` to stderr and return 1.
    """
    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # read-only file system, permissions, a path that is a file...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
