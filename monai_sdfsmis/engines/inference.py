"""Segmenting query volumes from one annotated support: the one code path of bundle inference, the CLI and Python.

``configs/inference.json`` wires these factories into a MONAI ``SupervisedEvaluator``; ``python -m monai_sdfsmis
infer`` and :func:`segment_volumes` call the same factories, so there is one implementation of loading, the
network choice, the resolution, saving and progress.

A model folder (a training run's ``ckpt_dir``) holds ``model.pt`` (the trained parts of the network, as MONAI's
``CheckpointSaver`` writes them) and ``model_config.json`` (:data:`MODEL_CONFIG_NAME`, written by
:class:`ModelConfigSaver` when training starts): the network type, the training resolution and intensity preset and
the network's settings, so that inference rebuilds the same network at the same resolution without being told. A
no-prior model folder also holds the stage-1 autoencoder in ``autoencoder/``.

Network types (:data:`NETWORK_TYPES`):

* ``"pretrained"``: SD-1.5's VAE and UNet and DINOv2 (weights by Hugging Face id or folder);
* ``"no_prior"``: the project's own autoencoder (``<model dir>/autoencoder``) and a from-scratch UNet, no pretrained
  weights at all;
* ``"tiny"``: the toy-width demo network (:meth:`SDFSMIS.tiny`); its masks mean nothing on real scans, so building
  it logs a warning and prints one to stderr.
"""

from __future__ import annotations

__all__ = [
    "MODEL_CONFIG_NAME",
    "NETWORK_TYPES",
    "DEFAULT_SPATIAL_SIZE",
    "read_model_config",
    "write_model_config",
    "ModelConfigSaver",
    "TrainedWeightsLoader",
    "resolve_network_type",
    "resolve_spatial_size",
    "resolve_intensity",
    "build_network",
    "warn_demo_network",
    "warn_untrained",
    "load_network_weights",
    "query_datalist",
    "output_path",
    "check_outputs",
    "inference_preprocessing",
    "inference_postprocessing",
    "protected_inputs",
    "inference_dataloader",
    "InferenceProgress",
    "build_inference_evaluator",
    "segment_volumes",
]

import json
import logging
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

from monai_sdfsmis.utils import atomic_write

MODEL_CONFIG_NAME = "model_config.json"
NETWORK_TYPES = ("pretrained", "no_prior", "tiny")
#: Resolution (pixels per slice side) of a model folder without ``model_config.json``: SD-1.5's training size.
DEFAULT_SPATIAL_SIZE = 256
_DEFAULT_INTENSITY = "minmax"
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_OUTPUT_POSTFIX = "seg"
_OUTPUT_EXT = ".nii.gz"
#: Item keys of the files a query item reads: an output must never replace one of them.
_INPUT_KEYS = ("image", "support_image", "support_label")
_UNET_KEYS = ("block_out_channels", "cross_attention_dim", "layers_per_block", "attention_head_dim", "norm_num_groups")

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- model folder
def _model_dir(path: str | PathLike) -> Path:
    """A model folder, or the folder of a checkpoint file inside one."""
    path = Path(path).expanduser()
    return path.parent if path.suffix in (".pt", ".safetensors") or path.is_file() else path


def read_model_config(model_dir: str | PathLike | None) -> dict[str, Any]:
    """The ``model_config.json`` of a model folder (or of a checkpoint's folder); ``{}`` when there is none.

    Raises
    ------
    ValueError
        When the file exists but is not a JSON object, or names an unknown network type.
    """
    if model_dir is None or str(model_dir) == "":
        return {}
    path = _model_dir(model_dir) / MODEL_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("network_type") not in (None, *NETWORK_TYPES):
        raise ValueError(f"{path}: unknown network_type {config['network_type']!r}; expected one of {NETWORK_TYPES}")
    config["_path"] = str(path)
    return config


def _plain(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel wraps the network


def write_model_config(
    model_dir: str | PathLike,
    network: torch.nn.Module,
    network_type: str,
    spatial_size: int,
    intensity: str = _DEFAULT_INTENSITY,
    **extra: Any,
) -> Path:
    """Write ``model_config.json`` describing ``network`` into ``model_dir`` (atomically); returns its path.

    Parameters
    ----------
    model_dir
        The training run's ``ckpt_dir``.
    network
        The :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` being trained (its ``settings`` and UNet widths are
        recorded).
    network_type
        One of :data:`NETWORK_TYPES`.
    spatial_size
        Side of the square slices the network is trained on; inference resizes slices to it.
    intensity
        Intensity preset of training (:class:`~monai_sdfsmis.transforms.intensity.ScaleToUnitRanged`).
    extra
        Further JSON-serialisable fields (e.g. the fold).
    """
    if network_type not in NETWORK_TYPES:
        raise ValueError(f"network_type must be one of {NETWORK_TYPES}, got {network_type!r}")
    from monai_sdfsmis import __version__

    net = _plain(network)
    record: dict[str, Any] = {
        "network_type": network_type,
        "spatial_size": int(spatial_size),
        "intensity": intensity,
        "monai_sdfsmis_version": __version__,
    }
    settings = getattr(net, "settings", None)
    if isinstance(settings, Mapping):
        record["settings"] = {k: v for k, v in settings.items() if k != "image_encoder"}
    unet = getattr(net, "unet", None)
    if unet is not None and hasattr(unet, "config"):
        record["unet"] = {k: _jsonable(unet.config[k]) for k in _UNET_KEYS if k in unet.config}
    record.update(extra)
    return atomic_write(Path(model_dir) / MODEL_CONFIG_NAME, json.dumps(record, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class ModelConfigSaver:
    """Ignite handler: write ``model_config.json`` into the checkpoint folder when training starts.

    Written at the start rather than the end so that every checkpoint of the run, including those of a run that is
    interrupted, sits beside the description of its network.

    Parameters
    ----------
    save_dir
        The run's ``ckpt_dir`` (where ``model.pt`` is saved).
    network_type, spatial_size, intensity, extra
        As :func:`write_model_config`; the network is the engine's.
    """

    def __init__(
        self,
        save_dir: str | PathLike,
        network_type: str,
        spatial_size: int,
        intensity: str = _DEFAULT_INTENSITY,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if network_type not in NETWORK_TYPES:
            raise ValueError(f"network_type must be one of {NETWORK_TYPES}, got {network_type!r}")
        self.save_dir = Path(save_dir)
        self.network_type = network_type
        self.spatial_size = int(spatial_size)
        self.intensity = intensity
        self.extra = dict(extra or {})

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # one writer, as for the checkpoints
        self.save_dir.mkdir(parents=True, exist_ok=True)
        write_model_config(
            self.save_dir, engine.network, self.network_type, self.spatial_size, self.intensity, **self.extra
        )


class TrainedWeightsLoader:
    """Ignite handler: :func:`load_network_weights` when the engine starts (a mismatch is one line naming the file).

    Parameters
    ----------
    load_path
        The checkpoint (``model.pt``, an interval checkpoint or a ``.safetensors`` file).
    network
        The network to load into (default: the engine's).
    """

    def __init__(self, load_path: str | PathLike, network: torch.nn.Module | None = None) -> None:
        self.load_path = load_path
        self.network = network

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        load_network_weights(self.network if self.network is not None else engine.network, self.load_path)


def resolve_network_type(network_type: str | None, config: Mapping[str, Any] | None = None) -> str:
    """``network_type`` if given, else the model folder's, else ``"pretrained"``; a conflict is a ``ValueError``."""
    config = config or {}
    stored = config.get("network_type")
    if network_type is None:
        return stored or "pretrained"
    if network_type not in NETWORK_TYPES:
        raise ValueError(f"network_type must be one of {NETWORK_TYPES}, got {network_type!r}")
    if stored is not None and stored != network_type:
        raise ValueError(
            f"{config.get('_path', MODEL_CONFIG_NAME)}: this model is a {stored!r} network, not {network_type!r}; "
            f"use network_type {stored!r} (or leave it unset)"
        )
    return network_type


def resolve_spatial_size(spatial_size: int | None, config: Mapping[str, Any] | None = None) -> int:
    """``spatial_size`` if given, else the model's training resolution, else :data:`DEFAULT_SPATIAL_SIZE`."""
    config = config or {}
    stored = config.get("spatial_size")
    if spatial_size is None:
        return int(stored) if stored else DEFAULT_SPATIAL_SIZE
    if stored and int(stored) != int(spatial_size):
        _logger.warning(
            "spatial_size %d given, but the model was trained at %d (%s); running at %d as asked",
            int(spatial_size), int(stored), config.get("_path", MODEL_CONFIG_NAME), int(spatial_size),
        )
    return int(spatial_size)


def resolve_intensity(intensity: str | None, config: Mapping[str, Any] | None = None) -> str:
    """``intensity`` if given, else the preset the model was trained with, else ``"minmax"``."""
    if intensity is not None:
        return intensity
    return str((config or {}).get("intensity") or _DEFAULT_INTENSITY)


# ---------------------------------------------------------------------------------------------- network
def warn_demo_network(reason: str) -> None:
    """Log a WARNING and print it to stderr: the network's masks do not measure anything on real scans."""
    message = (
        f"WARNING: {reason}. Its masks are meaningless on real scans; use a network trained on your data "
        "(network_type no_prior with a model folder from configs/train_no_prior.json, or pretrained SD-FSMIS weights)."
    )
    # Unconfigured logging already prints a WARNING to stderr (logging.lastResort); configured logging may send it
    # to a file or stdout, so stderr gets its own copy then.
    configured = _logger.hasHandlers()
    _logger.warning(message)
    if configured:
        print(message, file=sys.stderr, flush=True)


def warn_untrained(network: torch.nn.Module) -> None:
    """Warn (:func:`warn_demo_network`) when a network with parameters runs without loading trained weights."""
    if any(True for _ in _plain(network).parameters()):
        warn_demo_network(f"{type(_plain(network)).__name__} runs with untrained (random) weights (load_checkpoint False)")


def build_network(
    network_type: str | None = None,
    model_dir: str | PathLike | None = None,
    *,
    sd: str | PathLike = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    image_encoder: str | PathLike | None = "facebook/dinov2-small",
    local_files_only: bool | None = None,
    seed: int | None = 0,
    unet_width: str | Sequence[int] | None = None,
    autoencoder_dir: str | PathLike | None = None,
    saved_settings: bool = True,
    **settings: Any,
) -> torch.nn.Module:
    """Build the SD-FSMIS network of a model folder (weights are loaded separately, :func:`load_network_weights`).

    Parameters
    ----------
    network_type
        One of :data:`NETWORK_TYPES`; ``None`` takes the model folder's ``model_config.json``, else ``"pretrained"``.
    model_dir
        The model folder (or a checkpoint inside it); its ``model_config.json`` gives the settings of the network it
        was trained with, and for ``no_prior`` its ``autoencoder/`` the frozen autoencoder.
    sd, image_encoder, local_files_only
        Pretrained weights (``pretrained`` only), as :meth:`SDFSMIS.from_pretrained`.
    seed
        Initialisation seed of the no-prior UNet and VTCT and of the tiny network (the global RNG is untouched).
    unet_width
        No-prior UNet width (a name of ``UNET_WIDTHS`` or channels per level); default: the model folder's, else
        ``"default"``.
    autoencoder_dir
        No-prior autoencoder folder; default ``<model_dir>/autoencoder``.
    saved_settings
        Read ``model_config.json`` (network type, settings, UNet width). Training sets ``False``: it builds the
        network it is told to, whatever an earlier run left in its folder.
    settings
        :class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS` keyword arguments; they override the model folder's.

    Returns
    -------
    torch.nn.Module
        The network on the CPU.
    """
    config = read_model_config(model_dir) if saved_settings else {}
    kind = resolve_network_type(network_type, config)
    merged = {**config.get("settings", {}), **settings}
    if kind == "pretrained":
        from monai_sdfsmis.networks.sdfsmis import SDFSMIS

        return SDFSMIS.from_pretrained(sd, image_encoder, local_files_only=local_files_only, **merged)
    if kind == "tiny":
        from monai_sdfsmis.networks.sdfsmis import SDFSMIS

        warn_demo_network("the network is the tiny demo model (SDFSMIS.tiny, toy width, trained on phantoms at most)")
        return SDFSMIS.tiny(seed=0 if seed is None else int(seed), **merged)

    from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis

    if autoencoder_dir is None:
        if model_dir is None:
            raise ValueError("network_type 'no_prior' needs model_dir (the folder holding autoencoder/ and model.pt)")
        autoencoder_dir = _model_dir(model_dir) / "autoencoder"
    if not Path(autoencoder_dir).is_dir():
        raise FileNotFoundError(
            f"no-prior autoencoder folder not found: {autoencoder_dir} (stage 1, configs/train_autoencoder.json, "
            "writes it into the model folder)"
        )
    unet = dict(config.get("unet", {}))
    if unet_width is not None:
        unet = {"block_out_channels": unet_width}
    channels = unet.pop("block_out_channels", "default")
    return build_no_prior_sdfsmis(
        autoencoder_dir,
        unet_channels=tuple(channels) if isinstance(channels, list) else channels,
        seed=seed,
        **unet,
        **merged,
    )


def _read_state(path: Path, device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a ``.pt`` (plain, or MONAI's ``{"model": ...}`` checkpoint) or ``.safetensors`` file."""
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
            state = load_file(str(path), device=str(device))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    else:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # pickle, zip and torch errors
            raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {str(err)[:200]})") from err
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # an interval checkpoint also holds the optimizer and trainer state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state, meta


def _examples(names: Sequence[str], n: int = 2) -> str:
    shown = ", ".join(repr(k) for k in list(names)[:n])
    return shown + (", ..." if len(names) > n else "")


def load_network_weights(
    network: torch.nn.Module,
    path: str | PathLike,
    network_type: str | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Load trained weights into ``network`` (strictly); a mismatch is one ``ValueError`` line naming the file.

    Parameters
    ----------
    network
        The network built for the checkpoint (:func:`build_network`).
    path
        ``model.pt`` / ``checkpoint_iteration=N.pt`` (MONAI checkpoint) or a ``save_trained`` ``.safetensors``.
    network_type
        Which network type ``network`` is, for the message (``None``: the model folder's).
    model_config
        The model folder's ``model_config.json`` (default: read beside ``path``), for the message.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {path} {where} (train a model first, or give the model folder's model.pt)")
    net = _plain(network)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    state, meta = _read_state(path, device)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        config = read_model_config(path) if model_config is None else model_config
        built = network_type or config.get("network_type") or "this"
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing from the file ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if reshaped:
            k = reshaped[0]
            parts.append(
                f"{len(reshaped)} of another shape (e.g. {k!r}: file {list(state[k].shape)}, network "
                f"{list(expected[k].shape)})"
            )
        hint = "it was trained with another network type or width"
        if config.get("network_type"):
            hint += f"; its {MODEL_CONFIG_NAME} says {config['network_type']!r}"
            if config.get("unet", {}).get("block_out_channels"):
                hint += f" with UNet widths {config['unet']['block_out_channels']}"
            hint += " (leave network_def and network_type unset to build that network)"
        elif "sdfsmis_settings" in meta:
            hint += f"; it was saved with the settings {meta['sdfsmis_settings']}"
        else:
            hint += " (network_type, --network on the command line: pretrained, no_prior or tiny)"
        raise ValueError(f"{path}: weights do not match the {built} network: {'; '.join(parts)}; {hint}")
    net.load_state_dict(state, strict=True)
    return network


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
            for item in _datalist_entries(path):
                if isinstance(item, (str, PathLike)):
                    item = {"image": item}
                if not isinstance(item, Mapping) or "image" not in item:
                    raise ValueError(f"datalist {path}: each entry needs an 'image' path, got {item!r}")
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


def output_path(query: str | PathLike, output_dir: str | PathLike) -> Path:
    """Where the mask of ``query`` is written: ``<output_dir>/<query name>_seg.nii.gz`` (``SaveImaged``'s naming)."""
    layout = FolderLayout(os.fspath(output_dir), postfix=_OUTPUT_POSTFIX, extension=_OUTPUT_EXT, makedirs=False)
    return Path(layout.filename(subject=os.fspath(query)))


def check_outputs(datalist: Sequence[Mapping[str, Any]], output_dir: str | PathLike, overwrite: bool = False) -> None:
    """Refuse, before any inference, outputs that already exist (unless ``overwrite``) or that two queries share."""
    seen: dict[Path, str] = {}
    inputs = {
        Path(value).resolve(): key
        for item in datalist
        for key, value in item.items()
        if key in _INPUT_KEYS and value
    }
    for item in datalist:
        target = output_path(item["image"], output_dir)
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


def inference_preprocessing(organ_id: int | None, intensity: str = _DEFAULT_INTENSITY, orientation: str = "RAS") -> Compose:
    """Load query, support image and label (checked, one grid), select the organ, scale intensities to [-1, 1].

    ``organ_id`` ``None`` takes every foreground label as the organ.
    """
    from monai_sdfsmis.transforms.intensity import ScaleToUnitRanged
    from monai_sdfsmis.transforms.io import CheckLabelIdsd, LoadVolumed

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
    output_dir: str | PathLike, overwrite: bool = False, protected: Sequence[str | PathLike] | None = None
) -> Compose:
    """Save ``pred`` as a uint8 NIfTI on the query's own grid and orientation, atomically, never over an input."""
    from monai_sdfsmis.transforms.io import SaveVolumed

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

    def __init__(self, output_dir: str | PathLike, datalist: Sequence[Mapping[str, Any]], stream: Any = None) -> None:
        self.output_dir = output_dir
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
            f"inference: {k}/{len(self.queries)} {query} -> {output_path(query, self.output_dir)} "
            f"({time.perf_counter() - self._start:.1f} s)",
            file=self.stream or sys.stderr,
            flush=True,
        )


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
    overwrite: bool = False,
    device: torch.device | str | None = None,
    n_chunks: int = 3,
    sw_batch_size: int = 16,
    amp: bool = True,
    progress: bool = True,
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
    network_kwargs
        Passed to :func:`build_network` (``sd``, ``image_encoder``, ``local_files_only``, SDFSMIS settings).
    """
    from monai_sdfsmis.inferers import SlidingSupportInferer
    from monai_sdfsmis.transforms.io import check_output_folder

    ckpt = Path(ckpt_path) if ckpt_path is not None else Path(model_dir) / "model.pt"
    config = read_model_config(ckpt)
    kind = resolve_network_type(network_type, config)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found (the model folder must hold model.pt)")
    datalist = query_datalist(query, support_image, support_label)
    check_output_folder(output_dir)
    check_outputs(datalist, output_dir, overwrite)
    device = torch.device(device) if device is not None else torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    network = build_network(kind, ckpt.parent, **network_kwargs)
    load_network_weights(network, ckpt, kind, config)
    network = network.to(device).eval()
    inferer = SlidingSupportInferer(
        n_chunks=n_chunks,
        sw_batch_size=sw_batch_size,
        spatial_size=resolve_spatial_size(spatial_size, config),
        query_range="all",
        amp=amp,
    )
    handlers = [InferenceProgress(output_dir, datalist)] if progress else []
    evaluator = build_inference_evaluator(
        network,
        inference_dataloader(datalist, inference_preprocessing(organ_id, resolve_intensity(intensity, config))),
        inferer,
        inference_postprocessing(output_dir, overwrite, protected_inputs(datalist)),
        device,
        handlers,
    )
    evaluator.run()
    return [output_path(item["image"], output_dir) for item in datalist]
