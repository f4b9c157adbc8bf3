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
    parser.add_argument(
        "--fold_volumes", type=_fold_volumes,
        help="the folds' test volumes as JSON, indices into the numerically sorted volumes, e.g. '[[0,1,2],[3,4,5]]' "
        "(default: RPT's five folds, defined for 20 or 30 volumes)",
    )
    parser.add_argument("--organs", type=int, nargs="+", default=[1, 2, 3, 4], help="organ label ids (CHAOS ids)")
    parser.add_argument("--organ_set", choices=("chaos", "sabs"), default="chaos", help="organ names and label ids")
    _add_intensity_argument(parser)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="trained SD-FSMIS weights (a model folder's model.pt); omit for the baseline only",
    )
    _add_network_arguments(parser)
    parser.add_argument("--spatial_size", type=int, help="slice side in pixels (default: the model's, else 256)")
    parser.add_argument("--overlays", type=int, default=2, help="PNG overlays per query volume (0 for none)")
    parser.add_argument(
        "--shots", type=int, default=1,
        help="support volumes per query (k-shot): the fold's support, then the fold's next volumes in fold order, "
        "never the query itself; the soft masks of all supports are averaged (default 1, the paper's protocol)",
    )
    _add_postprocess_argument(parser)
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run_protocol)


def _fold_volumes(text: str) -> list[list[int]]:
    import json

    try:
        folds = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not (isinstance(folds, list) and folds and all(
            isinstance(f, list) and f and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in f)
            for f in folds)):
        raise argparse.ArgumentTypeError(f"a non-empty list of non-empty lists of volume indices is needed, got {text!r}")
    return folds


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--network",
        choices=("pretrained", "no_prior", "tiny"),
        help="network type: pretrained (SD-1.5 + DINOv2), no_prior (the model folder's own autoencoder and UNet) or "
        "tiny (demo only); default: the model folder's model_config.json, else pretrained",
    )
    parser.add_argument("--sd_weights", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="SD id or path")
    parser.add_argument("--image_encoder_weights", default="facebook/dinov2-small", help="DINOv2 id or path")
    parser.add_argument("--local_files_only", action="store_true", help="never contact the Hugging Face hub")
    parser.add_argument("--num_threads", type=int, help="CPU threads (default: $SDFSMIS_NUM_THREADS, else min(CPUs, 8))")


def _run_protocol(args: argparse.Namespace) -> int:
    if not args.dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {args.dataset_dir}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        where = "is a folder, not a weights file (give the model folder's model.pt)" if args.checkpoint.is_dir() else (
            "not found")
        raise FileNotFoundError(f"checkpoint {args.checkpoint} {where}")

    import torch

    from monai_sdfsmis.data.protocol import CHAOS_ORGANS, SABS_ORGANS
    from monai_sdfsmis.engines import evaluate_protocol, model_folder
    from monai_sdfsmis.inferers import SlidingSupportInferer
    from monai_sdfsmis.utils import configure_cpu_threads

    configure_cpu_threads(args.num_threads)
    network, config = None, {}
    if args.checkpoint is not None:
        config = model_folder.read_model_config(args.checkpoint)
        kind = model_folder.resolve_network_type(args.network, config)
        network = model_folder.build_network(kind, args.checkpoint, **_network_kwargs(args))
        model_folder.load_network_weights(network, args.checkpoint, kind, config)
        network = network.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    inferer = SlidingSupportInferer(
        spatial_size=model_folder.resolve_spatial_size(args.spatial_size, config),
        postprocess=model_folder.resolve_postprocess(args.postprocess, config),
        flip_axes=args.flip_axes,
        support_fusion=args.support_fusion,
        support_alignment=model_folder.resolve_support_alignment(args.support_alignment, config),
    )
    result = evaluate_protocol(
        network,
        args.dataset_dir,
        fold_ids=args.folds,
        folds=args.fold_volumes,
        organ_ids=args.organs,
        output_dir=args.output_dir,
        baseline=True,
        overlays=args.overlays,
        organ_names=SABS_ORGANS if args.organ_set == "sabs" else CHAOS_ORGANS,
        intensity=model_folder.resolve_intensity(args.intensity, config),
        progress=not args.no_progress,
        inferer=inferer,
        shots=args.shots,
    )
    print(result["table"])
    print(f"protocol: results written to {args.output_dir}")
    return 0


def _network_kwargs(args: argparse.Namespace) -> dict:
    return {
        "sd": args.sd_weights,
        "image_encoder": args.image_encoder_weights,
        "local_files_only": args.local_files_only or None,
    }


def _add_infer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="segment query volumes from one annotated support volume with a trained model folder",
        description=(
            "Write QUERY_seg.nii.gz (uint8, on the query's own grid and orientation) for each query volume, the organ "
            "given by --organ_id in --support_label. The same code path as the bundle's configs/inference.json."
        ),
    )
    parser.add_argument(
        "--query", type=Path, nargs="+", required=True,
        help="query volume(s): NIfTI/NRRD files, a DICOM series folder, a folder of volumes or a JSON datalist",
    )
    parser.add_argument(
        "--support", type=Path, nargs="+", default=[],
        help="the annotated support volume; several for k-shot (each query chunk is segmented with every support and "
        "the soft masks are averaged); not with a supervised model (train --supervised), which needs none",
    )
    parser.add_argument(
        "--support_label", type=Path, nargs="+", default=[],
        help="the support volume's label map (k-shot: one per --support, in the same order)",
    )
    parser.add_argument(
        "--organ_id", type=int, nargs="+",
        help="label id of the organ in --support_label; several ids write one label map with those organs "
        "(a supervised model: default every organ it was trained on)",
    )
    parser.add_argument(
        "--model", type=Path, required=True,
        help="model folder (model.pt, model_config.json and for no_prior autoencoder/), or a checkpoint file in it",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("segmentations"), help="where masks are written")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    parser.add_argument("--spatial_size", type=int, help="slice side in pixels (default: the model's training size)")
    _add_intensity_argument(parser)
    _add_postprocess_argument(parser)
    parser.add_argument(
        "--format", choices=("nifti", "dicom_seg"), default="nifti", dest="output_format",
        help="mask file format: nifti (QUERY_seg.nii.gz) or dicom_seg (SERIES_seg.dcm, a DICOM Segmentation of a DICOM "
        "series query, for PACS and OHIF; needs pip install 'monai-sdfsmis[dicom_seg]')",
    )
    parser.add_argument(
        "--save_probabilities", action="store_true",
        help="also write QUERY_prob.nii.gz: the organ's foreground probability (float32 in [0, 1] on the mask's grid; "
        "> 0.5 exactly where the mask is 1); NIfTI output only",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no_progress", action="store_true", help="no progress lines")
    _add_network_arguments(parser)
    parser.set_defaults(func=_run_infer)


def _add_intensity_argument(parser: argparse.ArgumentParser) -> None:
    from monai_sdfsmis.transforms.intensity import PRESETS

    parser.add_argument(
        "--intensity", choices=PRESETS, help="intensity preset (default: the model's, else minmax)",
    )


def _add_postprocess_argument(parser: argparse.ArgumentParser) -> None:
    from monai_sdfsmis.transforms.postprocess import POSTPROCESS_STEPS

    parser.add_argument(
        "--postprocess", nargs="+", choices=(*POSTPROCESS_STEPS, "none"),
        help="3D clean-up of each mask: largest_component, fill_holes, or none (default: the model folder's)",
    )
    parser.add_argument(
        "--support_alignment", choices=("none", "body_box"),
        help="map each support slice (image and mask) onto the body bounding box of the query slices it segments "
        "before the network sees it (body_box), or not (none, the paper); default: the model folder's, else none",
    )
    parser.add_argument(
        "--support_fusion", choices=("average", "network", "nearest"), default="average",
        help="with several supports: average their soft masks, fuse them inside the network (SII attends to the "
        "tokens of all supports; one query pass), or give each query slice the mask of the support whose slice "
        "correlates best with it (nearest)",
    )
    parser.add_argument(
        "--flip_axes", type=int, nargs="+", choices=(0, 1), default=[],
        help="flip test-time augmentation: in-plane volume axes (0 left-right, 1 anterior-posterior in RAS) along "
        "which query and support are also segmented mirrored; the soft masks are averaged (default: none)",
    )


def _run_infer(args: argparse.Namespace) -> int:
    from monai_sdfsmis.engines.inference import segment_volumes
    from monai_sdfsmis.utils import configure_cpu_threads

    if len(args.support) != len(args.support_label):
        raise ValueError(
            f"got {len(args.support)} --support volume(s) and {len(args.support_label)} --support_label map(s); give "
            "one label map per support volume, in the same order"
        )
    if args.support and args.organ_id is None:
        raise ValueError("--organ_id is required with --support: the label id of the organ in --support_label")
    for what, paths in (("support volume", args.support), ("support label", args.support_label)):
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"{what} not found: {path}")
    if not args.model.exists():
        raise FileNotFoundError(f"model folder not found: {args.model}")
    model_dir, ckpt = (args.model, None) if args.model.is_dir() else (args.model.parent, args.model)
    configure_cpu_threads(args.num_threads)
    empty: list = []
    written = segment_volumes(
        [str(q) for q in args.query],
        args.support or None,
        args.support_label or None,
        args.organ_id,
        model_dir,
        ckpt_path=ckpt,
        output_dir=args.output_dir,
        network_type=args.network,
        spatial_size=args.spatial_size,
        intensity=args.intensity,
        postprocess=args.postprocess,
        flip_axes=args.flip_axes,
        support_fusion=args.support_fusion,
        support_alignment=args.support_alignment,
        output_format=args.output_format,
        save_probabilities=args.save_probabilities,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
        empty_masks=empty,
        **_network_kwargs(args),
    )
    if args.organ_id is None or len(args.organ_id) > 1:
        note = f", {len(empty)} missing an organ (see the warnings)" if empty else ""
    else:
        note = f", {len(empty)} empty: no voxel of organ {args.organ_id[0]} found" if empty else ""
    probabilities = " (and their probability maps)" if args.save_probabilities else ""
    print(f"infer: {len(written)} mask{'s' if len(written) != 1 else ''}{probabilities} written to {args.output_dir}{note}")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the weight-free (no-prior) model on your scans: autoencoder, then segmenter, under one time budget",
        description=(
            "Run the bundle's training recipe (configs/train.json + configs/no_prior.json; --supervised adds configs/supervised.json) on DATASET_DIR (image_N.nii.gz, "
            "labels optional; supervoxels are computed where missing) and write the model folder OUTPUT_DIR/model, "
            "which infer loads with no other flag. With --fold or --holdout, the held-out volumes are not trained on and, "
            "when they have labels, the few-shot protocol is evaluated on them at the end (OUTPUT_DIR/evaluation, "
            "OUTPUT_DIR/results.json)."
        ),
    )
    parser.add_argument("--dataset_dir", type=Path, required=True, help="folder of image_N.nii.gz (ALPNet layout)")
    parser.add_argument("--output_dir", type=Path, required=True, help="model/ (the model folder), logs and results go here")
    parser.add_argument("--minutes", type=float, help="wall-clock budget of both stages together (default: the preset's)")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--fold", type=int, help="hold out this RPT fold (0-4; 20 or 30 volumes) and evaluate on it")
    held_out.add_argument(
        "--holdout", type=int, nargs="+", help="hold out these volume indices (0-based, numeric order of image_N)"
    )
    parser.add_argument("--preset", choices=("cpu", "gpu"), help="recipe preset (default cpu: 128 px, small widths)")
    parser.add_argument("--iterations", type=int, help="stage-2 iterations (sets the schedule; default: the time budget)")
    parser.add_argument("--eval_at_minutes", type=float, nargs="+", help="also evaluate at these training minutes")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted stage 2 in OUTPUT_DIR/model")
    parser.add_argument(
        "--supervised", action="store_true",
        help="train the supervised (SDSeg) segmenter on the training volumes' label maps instead of the few-shot one "
        "(configs/supervised.json; every training volume needs a label file); infer then needs no --support",
    )
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="any other recipe key of configs/no_prior.json or train.json (VALUE is read as JSON, else as a string)",
    )
    parser.add_argument("--bundle_dir", type=Path, help="the sd_fsmis bundle folder (default: this checkout's bundles/sd_fsmis)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--num_threads", type=int, help="CPU threads (default: $SDFSMIS_NUM_THREADS, else min(CPUs, 8))")
    parser.set_defaults(func=_run_train)


def _recipe_overrides(args: argparse.Namespace) -> dict:
    import json

    values: dict = {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    if args.fold is not None:
        values.update(fold=args.fold)
    elif args.holdout:
        values.update(fold=0, folds=[sorted(set(args.holdout))])
    else:
        values.setdefault("fold", 0)
        values.setdefault("folds", [[]])  # nothing held out: every volume trains, nothing to evaluate
    for key in ("preset", "iterations", "eval_at_minutes", "device", "num_threads"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.minutes is not None:
        values["total_minutes"] = args.minutes
    if "device" in values:
        from monai_sdfsmis.utils import resolve_device

        values["device"] = resolve_device(values["device"])
    # monai.bundle.run drops overrides whose value is None; an expression keeps "--set ae_iterations=null".
    return {key: "$None" if value is None else value for key, value in values.items()}


def _check_held_out(args: argparse.Namespace) -> None:
    """Refuse a --fold or --holdout that the dataset cannot have, before supervoxels or training take minutes."""
    if args.fold is None and not args.holdout:
        return
    from monai_sdfsmis.data import find_alpnet_volumes, rpt_folds

    n_volumes = len(find_alpnet_volumes(args.dataset_dir, supervoxel_dir=None))
    if args.holdout:
        outside = sorted(i for i in set(args.holdout) if not 0 <= i < n_volumes)
        if outside:
            raise ValueError(
                f"--holdout {outside}: {args.dataset_dir} has {n_volumes} volumes (indices 0-{n_volumes - 1})"
            )
        if len(set(args.holdout)) >= n_volumes:
            raise ValueError(f"--holdout holds out all {n_volumes} volumes of {args.dataset_dir}: nothing left to train on")
        return
    if any(item.partition("=")[0] == "folds" for item in args.overrides):
        return  # --set folds=[[...], ...]: the recipe checks the fold against them
    try:
        folds = rpt_folds(n_volumes)
    except ValueError:
        raise ValueError(
            f"--fold {args.fold}: RPT folds exist for 20 (CHAOS T2-SPIR) or 30 (Synapse/BTCV) volumes, and "
            f"{args.dataset_dir} has {n_volumes}; choose the held-out volumes with --holdout INDEX [INDEX ...] "
            "(or give the folds: --set 'folds=[[...], ...]')"
        ) from None
    if not 0 <= args.fold < len(folds):
        raise ValueError(f"--fold {args.fold}: choose a fold from 0 to {len(folds) - 1}")


def _run_train(args: argparse.Namespace) -> int:
    from monai_sdfsmis.bundle_files import NO_PRIOR_RECIPE, SUPERVISED_RECIPE, default_bundle_dir, training_configs

    if not args.dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {args.dataset_dir}")
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes:g}")
    bundle = args.bundle_dir or default_bundle_dir()
    model_dir = args.output_dir / "model"
    if (model_dir / "model.pt").exists() and not args.resume:
        raise ValueError(f"{model_dir} already holds a trained model; choose another --output_dir (or --resume)")
    _check_held_out(args)
    values = _recipe_overrides(args)
    from monai.bundle import run

    run(
        run_id="training",
        config_file=training_configs(bundle, SUPERVISED_RECIPE if args.supervised else NO_PRIOR_RECIPE),
        bundle_root=str(bundle),
        dataset_dir=str(args.dataset_dir),
        ckpt_dir=str(model_dir),
        output_dir=str(args.output_dir),
        resume=bool(args.resume),
        **values,
    )
    support = "" if args.supervised else "--support EXAMPLE --support_label EXAMPLE_LABEL "
    print(f"train: model folder {model_dir}; segment a scan with:\n"
          f"  python -m monai_sdfsmis infer --model {model_dir} --query SCAN {support}--organ_id N")
    return 0


def _add_package(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "package",
        help="package the bundle as the MONAI model zoo ships one: NAME_vVERSION.zip, weights in large_files.yml",
        description=(
            "Write OUTPUT_DIR/NAME_vVERSION.zip (version from configs/metadata.json) with one top-level NAME/ folder: "
            "configs, docs, LICENSE and large_files.yml, no models/ or eval/. With --weights_dir and --base_url, "
            "large_files.yml lists every file of the trained model folder with its URL and hash; upload the folder "
            "there. Users then run: python -m monai.bundle download --name NAME --url URL_OF_ZIP, and "
            "python -m monai.bundle download_large_files --bundle_path NAME."
        ),
    )
    parser.add_argument("--bundle_dir", type=Path, required=True, help="the bundle folder (bundles/sd_fsmis)")
    parser.add_argument("--output_dir", type=Path, default=Path("dist"), help="where the zip is written (dist)")
    parser.add_argument("--weights_dir", type=Path, help="trained model folder to list (model.pt, autoencoder/)")
    parser.add_argument("--base_url", help="URL the weights folder is hosted at (each file: BASE_URL/PATH)")
    parser.add_argument("--hash_type", default="sha256", choices=("md5", "sha1", "sha256", "sha512"))
    parser.add_argument("--name", help="bundle name (default: the bundle folder's name)")
    parser.add_argument("--schema", type=Path, help="local metadata schema to validate configs/metadata.json against")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing zip")
    parser.set_defaults(func=_run_package)


def _run_package(args: argparse.Namespace) -> int:
    from monai_sdfsmis.zoo import package_bundle

    package_bundle(
        args.bundle_dir,
        args.output_dir,
        weights_dir=args.weights_dir,
        base_url=args.base_url,
        hash_type=args.hash_type,
        name=args.name,
        overwrite=args.overwrite,
        schema=args.schema,
    )
    return 0


_COMMANDS = (_add_supervoxels, _add_train, _add_protocol, _add_infer, _add_package)


def _build_parser() -> argparse.ArgumentParser:
    from monai_sdfsmis import __version__

    parser = argparse.ArgumentParser(prog="python -m monai_sdfsmis", description="SD-FSMIS tools for MONAI.")
    parser.add_argument("--version", action="version", version=f"monai-sdfsmis {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns the exit code.

    Argument errors exit through ``argparse`` (code 2); data errors and a missing optional dependency (the message
    names the extra to install) print ``error: ...`` to stderr and return 1.
    """
    from monai_sdfsmis.extras import MissingExtraError

    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MissingExtraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # read-only file system, permissions, a path that is a file...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # An expected error met inside MONAI (a transform, an engine) arrives wrapped in RuntimeErrors: the bundle's
        # excepthook logic finds the project's message in the cause chain; anything else is a bug and keeps its traceback.
        from monai_sdfsmis.errors import debug_enabled, format_error

        line = None if debug_enabled() else format_error(err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
