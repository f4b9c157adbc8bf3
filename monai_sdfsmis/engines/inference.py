"""Segmenting query volumes from one annotated support: the one code path of bundle inference, the CLI and Python.

``configs/inference.json`` wires these factories into a MONAI ``SupervisedEvaluator``; ``python -m monai_sdfsmis
infer`` and :func:`segment_volumes` call the same factories, so there is one implementation of reading queries,
saving masks, the warnings a user must see and progress. The model itself (its folder, network and weights) comes
from :mod:`monai_sdfsmis.engines.model_folder`.
"""

from __future__ import annotations

__all__ = [
    "OUTPUT_FORMATS",
    "query_datalist",
    "output_path",
    "check_output_format",
    "check_outputs",
    "inference_preprocessing",
    "inference_postprocessing",
    "protected_inputs",
    "inference_dataloader",
    "InferenceProgress",
    "EmptyMaskWarning",
    "print_model_warnings",
    "build_inference_evaluator",
    "segment_volumes",
]

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.data.folder_layout import FolderLayout
from monai.transforms import Compose, Lambdad

from monai_sdfsmis.engines.model_folder import (
    DEFAULT_INTENSITY,
    build_network,
    load_network_weights,
    model_warnings,
    read_model_config,
    resolve_intensity,
    resolve_network_type,
    resolve_postprocess,
    resolve_spatial_size,
)

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_OUTPUT_POSTFIX = "seg"
_OUTPUT_EXT = ".nii.gz"
#: Mask file formats of ``infer``: a uint8 NIfTI on the query's grid, or a DICOM-SEG referencing a DICOM series query.
OUTPUT_FORMATS = ("nifti", "dicom_seg")
#: Item keys of the files a query item reads: an output must never replace one of them.
_INPUT_KEYS = ("image", "support_image", "support_label")


# ---------------------------------------------------------------------------------------------- data
def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_VOLUME_SUFFIXES)


def _same(a: str | PathLike, b: str | PathLike | None) -> bool:
    return b is not None and os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def _datalist_entries(path: Path) -> list[Any]:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"datalist {path}: not valid JSON ({err})") from err
    if isinstance(content, dict):
        for key in ("testing", "test", "query", "validation"):
            if isinstance(content.get(key), list):
                return content[key]
        raise ValueError(f"datalist {path}: expected a list, or a 'testing' list of query volumes")
    if not isinstance(content, list):
        raise ValueError(f"datalist {path}: expected a list of query volumes, got {type(content).__name__}")
    return content


def query_datalist(
    query: str | PathLike | Sequence[str | PathLike | Mapping[str, Any]],
    support_image: str | PathLike,
    support_label: str | PathLike,
) -> list[dict[str, str]]:
    """The items ``{"image", "support_image", "support_label"}`` to segment.

    Parameters
    ----------
    query
        A volume file; a DICOM series folder; a folder of volume files (``image_*`` files only where there are any,
        so an ALPNet-layout folder gives its images; earlier ``*_seg`` outputs and the support files are skipped); a
        JSON datalist (a list, or a ``"testing"`` list, of paths or ``{"image": ...}`` dicts that may name their own
        ``support_image`` / ``support_label``; relative paths are relative to the JSON file); or a list of these.
    support_image, support_label
        The annotated support volume and its label map, used where an item names none.

    Raises
    ------
    FileNotFoundError
        A query path that does not exist; no query volume found.
    """
    items: list[dict[str, str]] = []
    queries = [query] if isinstance(query, (str, PathLike)) else list(query)
    for entry in queries:
        if isinstance(entry, Mapping):
            items.append({"image": os.fspath(entry["image"]), **{k: os.fspath(v) for k, v in entry.items()}})
            continue
        path = Path(entry).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"query {path} not found")
        if path.is_file() and path.suffix.lower() == ".json":
            for index, item in enumerate(_datalist_entries(path)):
                if isinstance(item, (str, PathLike)):
                    item = {"image": item}
                if not isinstance(item, Mapping) or "image" not in item:
                    raise ValueError(f"datalist {path}: each entry needs an 'image' path, got {item!r}")
                for key, value in item.items():
                    if not isinstance(value, str) or not value:
                        raise ValueError(f"datalist {path}: entry {index} '{key}' must be a file path, got {value!r}")
                resolved = {k: os.fspath(path.parent / Path(v).expanduser()) for k, v in item.items()}
                if not Path(resolved["image"]).exists():
                    raise FileNotFoundError(f"datalist {path}: query {resolved['image']} not found")
                items.append(resolved)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_volume_file(p))
            files = [p for p in files if f"_{_OUTPUT_POSTFIX}." not in p.name]  # earlier outputs
            files = [p for p in files if not (_same(p, support_image) or _same(p, support_label))]
            images = [p for p in files if p.name.startswith("image_")]
            if images:
                files = images
            if files:
                items.extend({"image": str(p)} for p in files)
            elif any(p.is_file() for p in path.iterdir()):
                items.append({"image": str(path)})  # a DICOM series folder
            else:
                raise FileNotFoundError(f"query folder {path} holds no volume files")
        else:
            items.append({"image": str(path)})
    if not items:
        raise FileNotFoundError(f"no query volume in {query}")
    for item in items:
        item.setdefault("support_image", os.fspath(support_image))
        item.setdefault("support_label", os.fspath(support_label))
    return items


def output_path(query: str | PathLike, output_dir: str | PathLike, output_format: str = "nifti") -> Path:
    """Where the mask of ``query`` is written: ``<output_dir>/<query name>_seg.nii.gz`` (``SaveImaged``'s naming), or
    ``<output_dir>/<series folder name>_seg.dcm`` for ``output_format="dicom_seg"``."""
    check_output_format(output_format)
    if output_format == "dicom_seg":
        from monai_sdfsmis.transforms.dicom_seg import SaveDicomSegd

        return SaveDicomSegd.output_path(query, output_dir)
    layout = FolderLayout(os.fspath(output_dir), postfix=_OUTPUT_POSTFIX, extension=_OUTPUT_EXT, makedirs=False)
    return Path(layout.filename(subject=os.fspath(query)))


def check_output_format(output_format: str) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return output_format


def check_outputs(
    datalist: Sequence[Mapping[str, Any]],
    output_dir: str | PathLike,
    overwrite: bool = False,
    output_format: str = "nifti",
) -> None:
    """Refuse, before any inference, outputs that already exist (unless ``overwrite``) or that two queries share, and
    a DICOM-SEG for a query that is not a DICOM series folder."""
    if output_format == "dicom_seg":
        from monai_sdfsmis.extras import require

        require("dicom_seg", "writing a DICOM-SEG")
        for item in datalist:
            if not Path(item["image"]).is_dir():
                raise ValueError(
                    f"--format dicom_seg writes masks of DICOM series, but the query {item['image']} is a file; "
                    "pass the series' folder, or use the default NIfTI output"
                )
            if Path(item["image"]).resolve() == Path(output_dir).resolve():
                raise ValueError(
                    f"refusing to write a DICOM-SEG into the series folder {item['image']}: it would become a second "
                    "series there; choose another output_dir"
                )
    seen: dict[Path, str] = {}
    inputs = {
        Path(value).resolve(): key
        for item in datalist
        for key, value in item.items()
        if key in _INPUT_KEYS and value
    }
    for item in datalist:
        target = output_path(item["image"], output_dir, output_format)
        if target.resolve() in inputs:
            # overwrite never applies to inputs: a mask must not replace the scan or annotation it was made from
            raise ValueError(
                f"refusing to write {target}: it is an input file ({inputs[target.resolve()]}); choose another output_dir"
            )
        if target in seen:
            raise ValueError(f"queries {seen[target]} and {item['image']} would both be written to {target}")
        seen[target] = item["image"]
        if target.exists() and not overwrite:
            raise ValueError(f"{target} already exists; pass overwrite (--overwrite) to replace it")


def _select_organ(organ_id: int | None):
    def select(label: torch.Tensor) -> torch.Tensor:
        return ((label > 0) if organ_id is None else (label == organ_id)).float()

    return select


def inference_preprocessing(organ_id: int | None, intensity: str = DEFAULT_INTENSITY, orientation: str = "RAS") -> Compose:
    """Load query, support image and label (checked, one grid), select the organ, scale intensities to [-1, 1].

    ``organ_id`` ``None`` takes every foreground label as the organ.
    """
    from monai_sdfsmis.transforms.intensity import ScaleToUnitRanged
    from monai_sdfsmis.transforms.io import CheckLabelIdsd, LoadVolumed

    if organ_id is not None:
        from monai_sdfsmis.data.protocol import organ_id_list

        (organ_id,) = organ_id_list([organ_id], key="organ_id")

    return Compose(
        [
            LoadVolumed(
                keys=["image", "support_image", "support_label"],
                orientation=orientation,
                label_keys=["support_label"],
                same_grid={"support_label": "support_image"},
            ),
            CheckLabelIdsd(keys="support_label", required_ids=[] if organ_id is None else [organ_id]),
            Lambdad(keys="support_label", func=_select_organ(organ_id)),
            ScaleToUnitRanged(keys=["image", "support_image"], preset=intensity),
        ]
    )


def inference_postprocessing(
    output_dir: str | PathLike,
    overwrite: bool = False,
    protected: Sequence[str | PathLike] | None = None,
    output_format: str = "nifti",
    segment_label: str = "organ",
) -> Compose:
    """Save ``pred`` as a uint8 NIfTI on the query's own grid and orientation, atomically, never over an input; or,
    for ``output_format="dicom_seg"``, as a DICOM-SEG of the query's DICOM series (one segment, ``segment_label``)."""
    from monai_sdfsmis.transforms.io import SaveVolumed

    if check_output_format(output_format) == "dicom_seg":
        from monai_sdfsmis import __version__
        from monai_sdfsmis.transforms.dicom_seg import SaveDicomSegd

        return Compose([SaveDicomSegd("pred", output_dir, segment_label, overwrite, software_version=__version__)])
    return Compose(
        [
            SaveVolumed(
                keys="pred",
                output_dir=output_dir,
                overwrite=overwrite,
                protected=list(protected or []),
                output_postfix=_OUTPUT_POSTFIX,
                output_ext=_OUTPUT_EXT,
                output_dtype=np.uint8,
                resample=True,
                mode="nearest",
                separate_folder=False,
                print_log=False,
            )
        ]
    )


def protected_inputs(datalist: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every query, support image and support label of ``datalist``: files an output must never replace."""
    return sorted({v for item in datalist for k, v in item.items() if k in _INPUT_KEYS})


def inference_dataloader(datalist: Sequence[Mapping[str, Any]], preprocessing: Compose) -> DataLoader:
    """One volume at a time (batch 1, in order, in this process)."""
    return DataLoader(Dataset(data=list(datalist), transform=preprocessing), batch_size=1, shuffle=False, num_workers=0)


class InferenceProgress:
    """Ignite handler: one plain line per segmented volume (``k/n``, query, output, seconds) on stderr.

    Parameters
    ----------
    output_dir
        The output folder (to name each written mask).
    datalist
        The items being segmented, in order (:func:`query_datalist`).
    stream
        Where lines go (default ``sys.stderr``).
    """

    def __init__(self, output_dir: str | PathLike, datalist: Sequence[Mapping[str, Any]], stream: Any = None,
                 output_format: str = "nifti") -> None:
        self.output_dir = output_dir
        self.output_format = output_format
        self.queries = [os.fspath(item["image"]) for item in datalist]
        self.stream = stream
        self._start = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Any) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Any) -> None:
        k = engine.state.iteration
        query = self.queries[k - 1] if 0 < k <= len(self.queries) else "?"
        print(
            f"inference: {k}/{len(self.queries)} {query} -> {output_path(query, self.output_dir, self.output_format)} "
            f"({time.perf_counter() - self._start:.1f} s)",
            file=self.stream or sys.stderr,
            flush=True,
        )


class EmptyMaskWarning:
    """Ignite handler: one ``WARNING:`` line on stderr for each query whose mask has no voxel of the organ.

    An empty mask is written (it is the network's answer), but never reported as an ordinary result.

    Parameters
    ----------
    output_dir, datalist
        As :class:`InferenceProgress`, to name the query and the written file.
    organ_id
        The organ asked for (for the message).
    stream
        Where lines go (default ``sys.stderr``).

    Attributes
    ----------
    empty
        The written paths of the empty masks, in order.
    """

    def __init__(self, output_dir: str | PathLike, datalist: Sequence[Mapping[str, Any]], organ_id: int | None,
                 stream: Any = None, output_format: str = "nifti") -> None:
        self.output_dir = output_dir
        self.output_format = output_format
        self.queries = [os.fspath(item["image"]) for item in datalist]
        self.organ_id = organ_id
        self.stream = stream
        self.empty: list[Path] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        items = output if isinstance(output, (list, tuple)) else [output]
        k = engine.state.iteration
        query = self.queries[k - 1] if 0 < k <= len(self.queries) else "?"
        if all(not bool(torch.as_tensor(item["pred"]).any()) for item in items):
            target = output_path(query, self.output_dir, self.output_format)
            self.empty.append(target)
            organ = "the organ" if self.organ_id is None else f"organ {self.organ_id}"
            print(f"WARNING: empty mask: no voxel of {organ} found in {query} ({target} holds only zeros)",
                  file=self.stream or sys.stderr, flush=True)


def print_model_warnings(config: Mapping[str, Any], stream: Any = None) -> list[str]:
    """Print :func:`~monai_sdfsmis.engines.model_folder.model_warnings` of a model folder to stderr; returns them."""
    lines = model_warnings(config)
    for line in lines:
        print(line, file=stream or sys.stderr, flush=True)
    return lines


def build_inference_evaluator(
    network: torch.nn.Module,
    dataloader: DataLoader,
    inferer: Any,
    postprocessing: Compose,
    device: torch.device | str,
    handlers: Sequence[Any] = (),
):
    """MONAI ``SupervisedEvaluator`` that hands the support to the few-shot inferer and saves each mask."""
    from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator

    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=dataloader,
        network=network,
        inferer=inferer,
        prepare_batch=PrepareBatchExtraInput(extra_keys={"support_image": "support_image", "support_label": "support_label"}),
        postprocessing=postprocessing,
        val_handlers=list(handlers),
    )


def segment_volumes(
    query: str | PathLike | Sequence[str | PathLike | Mapping[str, Any]],
    support_image: str | PathLike,
    support_label: str | PathLike,
    organ_id: int | None,
    model_dir: str | PathLike,
    *,
    output_dir: str | PathLike = "segmentations",
    network_type: str | None = None,
    ckpt_path: str | PathLike | None = None,
    spatial_size: int | None = None,
    intensity: str | None = None,
    postprocess: Sequence[str] | str | None = None,
    flip_axes: Sequence[int] = (),
    output_format: str = "nifti",
    overwrite: bool = False,
    device: torch.device | str | None = None,
    n_chunks: int = 3,
    sw_batch_size: int = 16,
    amp: bool = True,
    progress: bool = True,
    empty_masks: list[Path] | None = None,
    **network_kwargs: Any,
) -> list[Path]:
    """Segment query volumes from one annotated support with a trained model folder; returns the written masks.

    The Python side of ``python -m monai_sdfsmis infer`` and of ``configs/inference.json`` (same factories).

    Parameters
    ----------
    query
        Volume file, folder or JSON datalist (:func:`query_datalist`).
    support_image, support_label, organ_id
        The annotated example and the organ's label id (``None``: all foreground).
    model_dir
        Model folder: ``model.pt``, ``model_config.json`` and, for ``no_prior``, ``autoencoder/``.
    output_dir
        Where ``<query>_seg.nii.gz`` (uint8, on the query's grid and orientation) are written.
    network_type, spatial_size, intensity
        Default: the model folder's (:func:`resolve_network_type`, :func:`resolve_spatial_size`).
    postprocess
        3D clean-up steps (:data:`~monai_sdfsmis.transforms.postprocess.POSTPROCESS_STEPS`, ``"none"`` for none);
        default: the model folder's (:func:`resolve_postprocess`).
    flip_axes
        Flip test-time augmentation (:class:`~monai_sdfsmis.inferers.SlidingSupportInferer`); ``()`` for none.
    output_format
        ``"nifti"`` or ``"dicom_seg"`` (every query a DICOM series folder; needs the ``dicom_seg`` extra).
    ckpt_path
        Weights; default ``<model_dir>/model.pt``.
    overwrite
        Replace existing outputs (inputs are never written over).
    device
        Default CUDA when available.
    n_chunks, sw_batch_size, amp
        :class:`~monai_sdfsmis.inferers.SlidingSupportInferer` settings.
    progress
        One line per volume on stderr.
    empty_masks
        A list to which the paths of masks without any voxel of the organ are appended (each also gets a warning
        line on stderr).
    network_kwargs
        Passed to :func:`build_network` (``sd``, ``image_encoder``, ``local_files_only``, SDFSMIS settings).
    """
    from monai_sdfsmis.inferers import SlidingSupportInferer
    from monai_sdfsmis.transforms.io import check_output_folder
    from monai_sdfsmis.utils import resolve_device

    device = resolve_device(device)
    ckpt = Path(ckpt_path) if ckpt_path is not None else Path(model_dir) / "model.pt"
    config = read_model_config(ckpt)
    if not config and network_type is None and (ckpt.parent / "autoencoder").is_dir():
        raise ValueError(
            f"{ckpt.parent} has no model_config.json but holds autoencoder/: it looks like a no-prior model folder; "
            "pass --network no_prior (network_type 'no_prior'), or train it with python -m monai_sdfsmis train"
        )
    kind = resolve_network_type(network_type, config)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found (the model folder must hold model.pt)")
    datalist = query_datalist(query, support_image, support_label)
    check_output_folder(output_dir)
    check_outputs(datalist, output_dir, overwrite, output_format)

    print_model_warnings(config)
    network = build_network(kind, ckpt.parent, **network_kwargs)
    load_network_weights(network, ckpt, kind, config)
    network = network.to(device).eval()
    inferer = SlidingSupportInferer(
        n_chunks=n_chunks,
        sw_batch_size=sw_batch_size,
        spatial_size=resolve_spatial_size(spatial_size, config),
        postprocess=resolve_postprocess(postprocess, config),
        flip_axes=flip_axes,
        query_range="all",
        amp=amp,
    )
    empty = EmptyMaskWarning(output_dir, datalist, organ_id, output_format=output_format)
    handlers = [empty, *([InferenceProgress(output_dir, datalist, output_format=output_format)] if progress else [])]
    evaluator = build_inference_evaluator(
        network,
        inference_dataloader(datalist, inference_preprocessing(organ_id, resolve_intensity(intensity, config))),
        inferer,
        inference_postprocessing(output_dir, overwrite, protected_inputs(datalist), output_format,
                                 segment_label="organ" if organ_id is None else f"organ {organ_id}"),
        device,
        handlers,
    )
    evaluator.run()
    if empty_masks is not None:
        empty_masks.extend(empty.empty)
    return [output_path(item["image"], output_dir, output_format) for item in datalist]
