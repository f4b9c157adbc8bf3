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
    "count_supports",
    "output_path",
    "probability_path",
    "probability_postfixes",
    "organ_ids_of",
    "segment_name",
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

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.data.folder_layout import FolderLayout
from monai.transforms import Compose, Lambdad

from monai_sdfsmis.data.layouts import read_datalist
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
    resolve_support_alignment,
)
from monai_sdfsmis.engines.support_batch import PrepareSupportBatch, support_keys
from monai_sdfsmis.utils import resolve_device

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_OUTPUT_POSTFIX = "seg"
#: Top-level keys of a query datalist JSON, tried in this order (a plain JSON list is read as it is).
QUERY_DATALIST_KEYS = ("testing", "test", "query", "validation")
_PROBABILITY_POSTFIX = "prob"
_OUTPUT_EXT = ".nii.gz"
#: Mask file formats of ``infer``: a uint8 NIfTI on the query's grid, or a DICOM-SEG referencing a DICOM series query.
OUTPUT_FORMATS = ("nifti", "dicom_seg")


def _is_input_key(key: str) -> bool:
    """Item keys of the files a query item reads (the query, every support image and label): an output must never
    replace one of them."""
    return key == "image" or key.startswith(("support_image", "support_label"))


# ---------------------------------------------------------------------------------------------- data
def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_VOLUME_SUFFIXES)


def _same(a: str | PathLike, b: str | PathLike | None) -> bool:
    return b is not None and os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def _path_list(paths: str | PathLike | Sequence[str | PathLike] | None) -> list[str]:
    if paths is None:
        return []
    return [os.fspath(paths)] if isinstance(paths, (str, PathLike)) else [os.fspath(p) for p in paths]


def count_supports(support_image: str | PathLike | Sequence[str | PathLike] | None) -> int:
    """How many support volumes ``support_image`` names (one path, a list of ``k`` for k-shot, none for a supervised
    model)."""
    return len(_path_list(support_image))


def query_datalist(
    query: str | PathLike | Sequence[str | PathLike | Mapping[str, Any]],
    support_image: str | PathLike | Sequence[str | PathLike] | None,
    support_label: str | PathLike | Sequence[str | PathLike] | None,
) -> list[dict[str, str]]:
    """The items ``{"image", "support_image", "support_label"}`` to segment (k-shot: also ``support_image_2``,
    ``support_label_2``, ... :func:`~monai_sdfsmis.engines.support_batch.support_keys`; a supervised model: no
    support, ``{"image"}``).

    Parameters
    ----------
    query
        A volume file; a DICOM series folder; a folder of volume files (``image_*`` files only where there are any,
        so an ALPNet-layout folder gives its images; earlier ``*_seg`` outputs and the support files are skipped); a
        JSON datalist (a list, or a ``"testing"`` list, of paths or ``{"image": ...}`` dicts that may name their own
        ``support_image`` / ``support_label``; relative paths are relative to the JSON file); or a list of these.
    support_image, support_label
        The annotated support volume and its label map, used where an item names none; k-shot: lists of ``k``
        volumes and their label maps (then no datalist item may name its own support).

    Raises
    ------
    FileNotFoundError
        A query path that does not exist; no query volume found.
    """
    support_images, support_labels = _path_list(support_image), _path_list(support_label)
    if len(support_images) != len(support_labels):
        raise ValueError(
            f"got {len(support_images)} support volume(s) and {len(support_labels)} support label(s); give one label "
            "map per support"
        )
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
            for index, item in enumerate(read_datalist(path, QUERY_DATALIST_KEYS)):
                if not Path(item["image"]).exists():
                    raise FileNotFoundError(f"Datalist '{path}' entry {index}: query {item['image']} not found")
                items.append({k: str(v) if k == "id" else os.fspath(v) for k, v in item.items()})
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_volume_file(p))
            files = [p for p in files if f"_{_OUTPUT_POSTFIX}." not in p.name]  # earlier outputs
            files = [p for p in files if not any(_same(p, s) for s in (*support_images, *support_labels))]
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
        if len(support_images) > 1 and ("support_image" in item or "support_label" in item):
            raise ValueError(
                f"the datalist item {item['image']} names its own support, which cannot be combined with "
                f"{len(support_images)} support volumes; give the supports in one place"
            )
        if not support_images:
            continue
        item.setdefault("support_image", support_images[0])
        item.setdefault("support_label", support_labels[0])
        pairs = list(zip(support_keys(len(support_images)), support_images, support_labels))
        for (image_key, label_key), image, label in pairs[1:]:
            item[image_key], item[label_key] = image, label
    return items


def output_path(query: str | PathLike, output_dir: str | PathLike, output_format: str = "nifti") -> Path:
    """Where the mask of ``query`` is written: ``<output_dir>/<query name>_seg.nii.gz`` (``SaveImaged``'s naming), or
    ``<output_dir>/<series folder name>_seg.dcm`` for ``output_format="dicom_seg"``."""
    check_output_format(output_format)
    if output_format == "dicom_seg":
        from monai_sdfsmis.transforms.dicom_seg import SaveDicomSegd

        return SaveDicomSegd.output_path(query, output_dir)
    return _nifti_output(query, output_dir, _OUTPUT_POSTFIX)


def _nifti_output(query: str | PathLike, output_dir: str | PathLike, postfix: str) -> Path:
    """``<output_dir>/<query name>_<postfix>.nii.gz``, named as MONAI's ``SaveImaged`` names it."""
    layout = FolderLayout(os.fspath(output_dir), postfix=postfix, extension=_OUTPUT_EXT, makedirs=False)
    return Path(layout.filename(subject=os.fspath(query)))


def probability_postfixes(organ_ids: Sequence[int] | None) -> list[str]:
    """File postfixes of the probability maps: ``prob`` for one organ, ``prob_<id>`` per organ for several."""
    if organ_ids is None or len(organ_ids) == 1:
        return [_PROBABILITY_POSTFIX]
    return [f"{_PROBABILITY_POSTFIX}_{organ}" for organ in organ_ids]


def probability_path(query: str | PathLike, output_dir: str | PathLike, postfix: str = _PROBABILITY_POSTFIX) -> Path:
    """Where a foreground probability of ``query`` is written: ``<output_dir>/<query name>_<postfix>.nii.gz``
    (:func:`probability_postfixes`)."""
    return _nifti_output(query, output_dir, postfix)


def segment_name(organ_id: int | Sequence[int] | None) -> str:
    """The DICOM-SEG segment label of a call: ``"organ"`` (all foreground) or ``"organ N"``."""
    organ_ids = organ_ids_of(organ_id)
    return "organ" if organ_ids is None else "organ " + "+".join(str(o) for o in organ_ids)


def check_output_format(output_format: str) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return output_format


def check_outputs(
    datalist: Sequence[Mapping[str, Any]],
    output_dir: str | PathLike,
    overwrite: bool = False,
    output_format: str = "nifti",
    save_probabilities: bool = False,
    organ_id: int | Sequence[int] | None = None,
) -> None:
    """Refuse, before any inference, outputs that already exist (unless ``overwrite``) or that two queries share, and
    a DICOM-SEG for a query that is not a DICOM series folder (or for several organs)."""
    organ_ids = organ_ids_of(organ_id)
    if output_format == "dicom_seg" and organ_ids is not None and len(organ_ids) > 1:
        raise ValueError(
            f"--format dicom_seg writes one segment; for {len(organ_ids)} organs write the NIfTI label map (the "
            "default) or run once per organ"
        )
    if save_probabilities and output_format != "nifti":
        raise ValueError(
            f"--save_probabilities writes float32 NIfTI probability maps beside NIfTI masks; it cannot be combined "
            f"with --format {output_format}"
        )
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
        if _is_input_key(key) and value
    }
    for item in datalist:
        targets = [output_path(item["image"], output_dir, output_format)]
        if save_probabilities:
            targets.extend(probability_path(item["image"], output_dir, p) for p in probability_postfixes(organ_ids))
        for target in targets:
            if target.resolve() in inputs:
                # overwrite never applies to inputs: a mask must not replace the scan or annotation it was made from
                raise ValueError(
                    f"refusing to write {target}: it is an input file ({inputs[target.resolve()]}); choose another "
                    "output_dir"
                )
            if target in seen:
                raise ValueError(f"queries {seen[target]} and {item['image']} would both be written to {target}")
            seen[target] = item["image"]
            if target.exists() and not overwrite:
                raise ValueError(f"{target} already exists; pass overwrite (--overwrite) to replace it")


def organ_ids_of(organ_id: int | Sequence[int] | None) -> list[int] | None:
    """The organ ids of a call as a checked list (``None``: every foreground label as one organ)."""
    from monai_sdfsmis.data.protocol import organ_id_list

    return None if organ_id is None else organ_id_list(organ_id, key="organ_id", unique=True)


def _select_organs(organ_ids: list[int] | None):
    def select(label: torch.Tensor) -> torch.Tensor:
        if organ_ids is None:
            return (label > 0).float()
        return torch.cat([label == organ for organ in organ_ids], dim=0).float()  # [K, H, W, D]: one mask per organ

    return select


def inference_preprocessing(
    organ_id: int | Sequence[int] | None,
    intensity: str = DEFAULT_INTENSITY,
    orientation: str = "RAS",
    n_supports: int = 1,
) -> Compose:
    """Load query, support images and labels (checked, each label on its image's grid), select the organ(s), scale
    intensities to [-1, 1].

    ``organ_id`` ``None`` takes every foreground label as the organ; a list of ``K`` ids gives each support label
    ``K`` channels, one mask per organ. ``n_supports``: the support volumes of each item
    (:func:`~monai_sdfsmis.engines.support_batch.support_keys`; 0 for a supervised model, which reads the query only).
    """
    from monai_sdfsmis.transforms.intensity import ScaleToUnitRanged
    from monai_sdfsmis.transforms.io import CheckLabelIdsd, LoadVolumed

    organ_ids = organ_ids_of(organ_id)

    pairs = support_keys(n_supports)
    image_keys, label_keys = [i for i, _ in pairs], [m for _, m in pairs]
    labels = [CheckLabelIdsd(keys=label_keys, required_ids=organ_ids or []),
              Lambdad(keys=label_keys, func=_select_organs(organ_ids))] if label_keys else []
    return Compose(
        [
            LoadVolumed(
                keys=["image", *[k for pair in pairs for k in pair]],
                orientation=orientation,
                label_keys=label_keys,
                same_grid={m: i for i, m in pairs},
            ),
            *labels,
            ScaleToUnitRanged(keys=["image", *image_keys], preset=intensity),
        ]
    )


def inference_postprocessing(
    output_dir: str | PathLike,
    overwrite: bool = False,
    protected: Sequence[str | PathLike] | None = None,
    output_format: str = "nifti",
    segment_label: str = "organ",
    save_probabilities: bool = False,
    organ_id: int | Sequence[int] | None = None,
) -> Compose:
    """Save ``pred`` as a uint8 NIfTI on the query's own grid and orientation, atomically, never over an input; or,
    for ``output_format="dicom_seg"``, as a DICOM-SEG of the query's DICOM series (one segment, ``segment_label``).

    For several organs (``organ_id`` a list of ``K`` ids) ``pred`` is the inferer's label map ``1..K``, saved with
    the organs' own ids (uint16 when an id exceeds 255). With ``save_probabilities`` the probability channels that
    follow are saved as float32 NIfTI files ``<query>_prob.nii.gz`` (one organ) or ``<query>_prob_<id>.nii.gz``."""
    from monai.transforms import MapLabelValued

    from monai_sdfsmis.transforms.io import SaveVolumed, label_map_dtype
    from monai_sdfsmis.transforms.postprocess import SplitProbabilityd

    if check_output_format(output_format) == "dicom_seg":
        from monai_sdfsmis import __version__
        from monai_sdfsmis.transforms.dicom_seg import SaveDicomSegd

        return Compose([SaveDicomSegd("pred", output_dir, segment_label, overwrite, software_version=__version__)])

    def save(key: str, postfix: str, dtype: type) -> SaveVolumed:
        return SaveVolumed(
            keys=key,
            output_dir=output_dir,
            overwrite=overwrite,
            protected=list(protected or []),
            output_postfix=postfix,
            output_ext=_OUTPUT_EXT,
            output_dtype=dtype,
            resample=True,
            mode="nearest",
            separate_folder=False,
            print_log=False,
        )

    organ_ids = organ_ids_of(organ_id)
    several = organ_ids is not None and len(organ_ids) > 1
    steps: list[Any] = []
    postfixes = probability_postfixes(organ_ids)
    if save_probabilities:
        steps.append(SplitProbabilityd("pred", postfixes))
    if several:
        steps.append(MapLabelValued("pred", orig_labels=list(range(1, len(organ_ids) + 1)), target_labels=organ_ids))
    steps.append(save("pred", _OUTPUT_POSTFIX, label_map_dtype(max(organ_ids) if several else 1)))
    if save_probabilities:
        steps.extend(save(postfix, postfix, np.float32) for postfix in postfixes)
    return Compose(steps)


def protected_inputs(datalist: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every query, support image and support label of ``datalist``: files an output must never replace."""
    return sorted({v for item in datalist for k, v in item.items() if _is_input_key(k)})


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
        The organ asked for (for the message); several: a line for each organ missing from a label map.
    stream
        Where lines go (default ``sys.stderr``).

    Attributes
    ----------
    empty
        The written paths of the empty masks, in order.
    """

    def __init__(self, output_dir: str | PathLike, datalist: Sequence[Mapping[str, Any]],
                 organ_id: int | Sequence[int] | None, stream: Any = None, output_format: str = "nifti") -> None:
        self.output_dir = output_dir
        self.output_format = output_format
        self.queries = [os.fspath(item["image"]) for item in datalist]
        self.organ_ids = organ_ids_of(organ_id)
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
        target = output_path(query, self.output_dir, self.output_format)
        preds = [torch.as_tensor(item["pred"]) for item in items]
        if self.organ_ids is not None and len(self.organ_ids) > 1:
            missing = [o for o in self.organ_ids if not any(bool((p == o).any()) for p in preds)]
            if missing:
                self.empty.append(target)
            for organ in missing:
                print(f"WARNING: empty mask: no voxel of organ {organ} found in {query} ({target} has no label {organ})",
                      file=self.stream or sys.stderr, flush=True)
            return
        if all(not bool(p.any()) for p in preds):
            self.empty.append(target)
            organ = "the organ" if self.organ_ids is None else f"organ {self.organ_ids[0]}"
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
    n_supports: int = 1,
):
    """MONAI ``SupervisedEvaluator`` that hands the support (k-shot: the ``n_supports`` supports) to the few-shot
    inferer and saves each mask."""
    from monai.engines import SupervisedEvaluator

    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=dataloader,
        network=network,
        inferer=inferer,
        prepare_batch=PrepareSupportBatch(n_supports),
        postprocessing=postprocessing,
        val_handlers=list(handlers),
    )


def _checkpoint_of(
    model_dir: str | PathLike, ckpt_path: str | PathLike | None, network_type: str | None
) -> tuple[Path, dict[str, Any], str]:
    """The weights file, the model folder's ``model_config.json`` and the network type, or one line on what is wrong."""
    ckpt = Path(ckpt_path) if ckpt_path is not None else Path(model_dir) / "model.pt"
    config = read_model_config(ckpt)
    if not config and network_type is None and (ckpt.parent / "autoencoder").is_dir():
        raise ValueError(
            f"{ckpt.parent} has no model_config.json but holds autoencoder/: it looks like a no-prior model folder; "
            "pass --network no_prior (network_type 'no_prior'), or train it with python -m monai_sdfsmis train"
        )
    kind = resolve_network_type(network_type, config)
    if not ckpt.is_file():
        where = "is a folder, not a weights file" if ckpt.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {ckpt} {where} (the model folder must hold the file model.pt)")
    return ckpt, config, kind


def _checked_organs_and_supports(
    ckpt: Path, config: Mapping[str, Any], kind: str, n_supports: int, organ_id: int | Sequence[int] | None
) -> int | Sequence[int] | None:
    """A few-shot model needs a support, a supervised one none; the organs to segment (a supervised model's own
    organs when the call names none)."""
    if kind != "supervised":
        if not n_supports:
            raise ValueError(
                f"{ckpt.parent} is a few-shot ({kind}) model: give an annotated example with --support and "
                "--support_label (only a supervised model, python -m monai_sdfsmis train --supervised, segments "
                "without one)"
            )
        return organ_id
    if n_supports:
        raise ValueError(
            f"{ckpt.parent} is a supervised model (trained on label maps): it segments without a support; drop "
            "--support and --support_label"
        )
    trained_on = config.get("settings", {}).get("organ_ids") or []
    if organ_id is None:
        organ_id = trained_on
    unknown = [o for o in organ_ids_of(organ_id) or [] if o not in trained_on]
    if unknown:
        raise ValueError(
            f"{ckpt.parent} is a supervised model of organ labels {trained_on}; it has none for {unknown[0]} "
            "(--organ_id)"
        )
    return organ_id


def segment_volumes(
    query: str | PathLike | Sequence[str | PathLike | Mapping[str, Any]],
    support_image: str | PathLike | Sequence[str | PathLike],
    support_label: str | PathLike | Sequence[str | PathLike],
    organ_id: int | Sequence[int] | None,
    model_dir: str | PathLike,
    *,
    output_dir: str | PathLike = "segmentations", network_type: str | None = None,
    ckpt_path: str | PathLike | None = None, spatial_size: int | None = None, intensity: str | None = None,
    postprocess: Sequence[str] | str | None = None, flip_axes: Sequence[int] = (), support_fusion: str = "average",
    support_alignment: str | None = None, output_format: str = "nifti", save_probabilities: bool = False,
    overwrite: bool = False, device: torch.device | str | None = None, n_chunks: int = 3, sw_batch_size: int = 16,
    amp: bool = True, progress: bool = True, empty_masks: list[Path] | None = None, **network_kwargs: Any,
) -> list[Path]:
    """Segment query volumes from one annotated support with a trained model folder; returns the written masks.

    The Python side of ``python -m monai_sdfsmis infer`` and of ``configs/inference.json`` (same factories).

    Parameters
    ----------
    query
        Volume file, folder or JSON datalist (:func:`query_datalist`).
    support_image, support_label, organ_id
        The annotated example and the organ's label id (``None``: all foreground; a list of ids: one label map with
        those organs, each segmented as alone, a voxel claimed by several going to the most probable). A supervised
        model takes no support (``None``) and, without ``organ_id``, segments every organ it was trained on. k-shot: lists
        of ``k`` support volumes and their label maps; each query chunk is then segmented with every support
        (:class:`~monai_sdfsmis.inferers.SlidingSupportInferer`, ``support_fusion``).
    model_dir, ckpt_path
        Model folder (``model.pt``, ``model_config.json`` and, for ``no_prior``, ``autoencoder/``); the weights, default
        ``<model_dir>/model.pt``.
    output_dir, output_format
        Where the masks are written, and as what: ``"nifti"``, ``<query>_seg.nii.gz`` (uint8, on the query's grid and
        orientation), or ``"dicom_seg"`` (every query a DICOM series folder; needs the ``dicom_seg`` extra).
    network_type, spatial_size, intensity, postprocess, support_alignment
        Default: the model folder's (:func:`resolve_network_type`, :func:`resolve_spatial_size`,
        :func:`resolve_postprocess`, :func:`resolve_support_alignment`). ``postprocess``: 3D clean-up steps
        (:data:`~monai_sdfsmis.transforms.postprocess.POSTPROCESS_STEPS`, ``"none"`` for none); ``support_alignment``:
        ``"none"`` or ``"body_box"`` (:mod:`monai_sdfsmis.inferers.alignment`).
    flip_axes
        Flip test-time augmentation (:class:`~monai_sdfsmis.inferers.SlidingSupportInferer`); ``()`` for none.
    support_fusion
        k-shot: ``"average"`` (the supports' soft masks), ``"network"`` (their contexts, inside the network) or
        ``"nearest"`` (each query slice with the support whose slice correlates best with it).
    save_probabilities
        Also write ``<query>_prob.nii.gz``: the organ's foreground probability, float32 in ``[0, 1]`` on the mask's
        grid; ``probability > 0.5`` is exactly the mask (:func:`~monai_sdfsmis.inferers.sliding_support.
        foreground_probability`). NIfTI output only.
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
    device = resolve_device(device)
    ckpt, config, kind = _checkpoint_of(model_dir, ckpt_path, network_type)
    n_supports = count_supports(support_image)
    organ_id = _checked_organs_and_supports(ckpt, config, kind, n_supports, organ_id)
    datalist = query_datalist(query, support_image, support_label)
    outputs = _Outputs(output_dir, output_format, overwrite, save_probabilities, organ_id)
    outputs.check(datalist)
    network = _trained_network(ckpt, config, kind, device, network_kwargs)
    inferer = _sliding_inferer(
        config, kind, organ_id, spatial_size=spatial_size, postprocess=postprocess, support_alignment=support_alignment,
        n_chunks=n_chunks, sw_batch_size=sw_batch_size, flip_axes=flip_axes, amp=amp, probabilities=save_probabilities,
        support_fusion=support_fusion,
    )
    preprocessing = inference_preprocessing(organ_id, resolve_intensity(intensity, config), n_supports=n_supports)
    empty = _run_inference(network, inferer, datalist, preprocessing, outputs, device, n_supports, progress)
    if empty_masks is not None:
        empty_masks.extend(empty)
    return outputs.paths(datalist)


@dataclass(frozen=True)
class _Outputs:
    """Where and as what :func:`segment_volumes` writes each query's mask (and probability maps): the settings its
    checks, its postprocessing and its handlers share."""

    output_dir: str | PathLike
    output_format: str
    overwrite: bool
    save_probabilities: bool
    organ_id: int | Sequence[int] | None

    def check(self, datalist: Sequence[Mapping[str, Any]]) -> None:
        """Refuse, before any inference, an unwritable output folder and the outputs :func:`check_outputs` refuses."""
        from monai_sdfsmis.transforms.io import check_output_folder

        check_output_folder(self.output_dir)
        check_outputs(
            datalist, self.output_dir, self.overwrite, self.output_format, self.save_probabilities, self.organ_id
        )

    def postprocessing(self, datalist: Sequence[Mapping[str, Any]]) -> Compose:
        """:func:`inference_postprocessing` of these outputs, never writing over an input of ``datalist``."""
        return inference_postprocessing(
            self.output_dir,
            self.overwrite,
            protected_inputs(datalist),
            self.output_format,
            segment_label=segment_name(self.organ_id),
            save_probabilities=self.save_probabilities,
            organ_id=self.organ_id,
        )

    def paths(self, datalist: Sequence[Mapping[str, Any]]) -> list[Path]:
        """The mask of each query of ``datalist``, in order (:func:`output_path`)."""
        return [output_path(item["image"], self.output_dir, self.output_format) for item in datalist]


def _trained_network(
    ckpt: Path, config: Mapping[str, Any], kind: str, device: torch.device, network_kwargs: Mapping[str, Any]
) -> torch.nn.Module:
    """The model folder's network with the weights of ``ckpt``, on ``device`` and in eval mode; the folder's warnings
    are printed before the (possibly slow) build."""
    print_model_warnings(config)
    network = build_network(kind, ckpt.parent, **network_kwargs)
    load_network_weights(network, ckpt, kind, config)
    return network.to(device).eval()


def _sliding_inferer(
    config: Mapping[str, Any],
    kind: str,
    organ_id: int | Sequence[int] | None,
    *,
    spatial_size: int | None,
    postprocess: Sequence[str] | str | None,
    support_alignment: str | None,
    **settings: Any,
) -> Any:
    """The :class:`~monai_sdfsmis.inferers.SlidingSupportInferer` of a model folder over whole query volumes: the
    resolution, clean-up and support alignment it was trained with unless the call names its own; ``settings`` are
    the inferer's other keyword arguments."""
    from monai_sdfsmis.inferers import SlidingSupportInferer

    return SlidingSupportInferer(
        spatial_size=resolve_spatial_size(spatial_size, config),
        postprocess=resolve_postprocess(postprocess, config),
        query_range="all",
        support_alignment=resolve_support_alignment(support_alignment, config),
        # a few-shot network is shown its organs by the support masks (inference_preprocessing); a supervised one isn't
        organ_ids=organ_ids_of(organ_id) if kind == "supervised" else None,
        **settings,
    )


def _run_inference(
    network: torch.nn.Module,
    inferer: Any,
    datalist: Sequence[Mapping[str, Any]],
    preprocessing: Compose,
    outputs: _Outputs,
    device: torch.device,
    n_supports: int,
    progress: bool,
) -> list[Path]:
    """Segment and save every query of ``datalist`` (a line on stderr for each with ``progress``); returns the masks
    without any voxel of the organ."""
    empty = EmptyMaskWarning(outputs.output_dir, datalist, outputs.organ_id, output_format=outputs.output_format)
    handlers: list[Any] = [empty]
    if progress:
        handlers.append(InferenceProgress(outputs.output_dir, datalist, output_format=outputs.output_format))
    dataloader = inference_dataloader(datalist, preprocessing)
    evaluator = build_inference_evaluator(
        network, dataloader, inferer, outputs.postprocessing(datalist), device, handlers, n_supports=n_supports
    )
    evaluator.run()
    return empty.empty
