"""The model folder: the one format of a trained model, and the one place that reads, writes and loads it.

A model folder (a training run's ``ckpt_dir``) holds

* ``model.pt``: the trained parts of the network (MONAI ``CheckpointSaver``'s final save);
* ``model_config.json`` (:data:`MODEL_CONFIG_NAME`): the network type, widths, training resolution and intensity
  preset, so that inference rebuilds the same network at the same resolution without being told, and, once training
  ended, a ``training`` record (provenance: dataset, fold, iterations done and planned, what stopped training,
  minutes, threads, version, date) that :func:`model_warnings` reads;
* for a no-prior model, ``autoencoder/``: the frozen stage-1 autoencoder (a diffusers folder).

The bundle (``train.json``, ``inference.json``, ``evaluate.json``), ``python -m monai_sdfsmis infer`` and the MONAI
Label app all build and load a model through :func:`build_network` and :func:`load_network_weights`.

Network types (:data:`NETWORK_TYPES`):

* ``"pretrained"``: SD-1.5's VAE and UNet and DINOv2 (weights by Hugging Face id or folder);
* ``"no_prior"``: the project's own autoencoder (``<model dir>/autoencoder``) and a from-scratch UNet, no pretrained
  weights at all;
* ``"supervised"``: the supervised (SDSeg) segmenter on a no-prior autoencoder
  (:class:`~monai_sdfsmis.networks.supervised.SupervisedLatentSegmenter`), trained on label maps; it segments the
  organs it was trained on without a support;
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
    "record_training",
    "model_warnings",
    "check_unet_width",
    "ModelConfigSaver",
    "TrainedWeightsLoader",
    "resolve_network_type",
    "resolve_spatial_size",
    "resolve_postprocess",
    "resolve_support_alignment",
    "resolve_intensity",
    "build_network",
    "warn_demo_network",
    "warn_untrained",
    "load_network_weights",
]

import json
import logging
import numbers
import sys
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from monai_sdfsmis.transforms.postprocess import check_postprocess_steps
from monai_sdfsmis.utils import atomic_write

MODEL_CONFIG_NAME = "model_config.json"
NETWORK_TYPES = ("pretrained", "no_prior", "supervised", "tiny")
#: Resolution (pixels per slice side) of a model folder without ``model_config.json``: SD-1.5's training size.
DEFAULT_SPATIAL_SIZE = 256
DEFAULT_INTENSITY = "minmax"
_UNET_KEYS = ("block_out_channels", "cross_attention_dim", "layers_per_block", "attention_head_dim", "norm_num_groups")

_logger = logging.getLogger(__name__)


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
    intensity: str = DEFAULT_INTENSITY,
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


def record_training(model_dir: str | PathLike, training: Mapping[str, Any]) -> Path:
    """Add the ``training`` record (provenance) to the folder's ``model_config.json``, atomically; returns its path.

    ``training`` holds what the model was trained on and how far: ``dataset`` (``path``, ``volumes``,
    ``training_volumes``, ``phantoms``), ``fold``, per-stage ``iterations``, ``planned_iterations`` and
    ``stopped_by``, ``training_minutes``, ``threads``, ``monai_sdfsmis_version`` and ``date``
    (:class:`~monai_sdfsmis.engines.recipe.TrainingReport` writes it). :func:`model_warnings` reads it.
    """
    path = Path(model_dir) / MODEL_CONFIG_NAME
    config = read_model_config(model_dir)
    config.pop("_path", None)
    config["training"] = dict(training)
    return atomic_write(path, json.dumps(config, indent=2, default=str) + "\n")


def model_warnings(config: Mapping[str, Any]) -> list[str]:
    """One ``WARNING:`` line for each reason not to trust the masks of a model folder (``model_config.json``).

    A demo model (trained on synthetic phantoms, or the tiny network), a stage stopped below half of its planned
    iterations, and a segmenter stopped below the iterations the recipe needs to predict anything but empty masks.
    """
    lines = []
    where = config.get("_path", MODEL_CONFIG_NAME)
    training = config.get("training") or {}
    dataset = training.get("dataset") or {}
    if dataset.get("phantoms"):
        lines.append(
            f"WARNING: this model is a demo: it was trained on synthetic phantoms ({dataset.get('path')}), so its masks "
            "mean nothing on real scans; train one on your scans with python -m monai_sdfsmis train"
        )
    for stage, name in (("autoencoder", "stage 1 (autoencoder)"), ("segmenter", "stage 2 (segmenter)")):
        record = training.get(stage) or {}
        done, planned = record.get("iterations"), record.get("planned_iterations")
        if done is not None and planned and done < planned / 2:
            lines.append(
                f"WARNING: training was cut short: {name} ran {done} of {planned} planned iterations (stopped by "
                f"{record.get('stopped_by') or 'an interruption'}; {where}); its masks may be poor"
            )
    segmenter = training.get("segmenter") or {}
    needed = segmenter.get("min_useful_iterations")
    if needed and segmenter.get("iterations") is not None and segmenter["iterations"] < needed:
        lines.append(
            f"WARNING: training was cut short: stage 2 (segmenter) ran {segmenter['iterations']} iterations, fewer "
            f"than the {needed} this recipe needs before its masks stop being empty ({where}); train longer (--minutes)"
        )
    return lines


def check_unet_width(unet_width: str | Sequence[int], config: Mapping[str, Any]) -> None:
    """Refuse a UNet width that disagrees with the width the model folder's network was trained with."""
    stored = (config.get("unet") or {}).get("block_out_channels")
    if stored is None:
        return
    if isinstance(unet_width, str):
        from monai_sdfsmis.networks.no_prior import UNET_WIDTHS

        if unet_width not in UNET_WIDTHS:
            raise ValueError(f"unet_width {unet_width!r} is not one of {sorted(UNET_WIDTHS)}")
        channels = list(UNET_WIDTHS[unet_width]["block_out_channels"])
    else:
        channels = [int(c) for c in unet_width]
    if channels != [int(c) for c in stored]:
        raise ValueError(
            f"unet_width {unet_width!r} ({channels}) disagrees with the model folder: {config.get('_path', MODEL_CONFIG_NAME)} "
            f"says the UNet was trained with {list(stored)}; leave unet_width unset"
        )


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
        intensity: str = DEFAULT_INTENSITY,
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
    """``spatial_size`` if given, else the model's training resolution, else :data:`DEFAULT_SPATIAL_SIZE`.

    Raises
    ------
    ValueError
        When ``spatial_size`` is given and the model folder says the network was trained at another size: a network
        run at a resolution it never saw gives masks that look plausible and are not, so this is refused, never used.
    """
    config = config or {}
    stored = config.get("spatial_size")
    if stored is not None and (isinstance(stored, bool) or not isinstance(stored, int) or stored < 8):
        raise ValueError(f"{config.get('_path', MODEL_CONFIG_NAME)}: spatial_size must be a positive integer, got {stored!r}")
    if spatial_size is None:
        return int(stored) if stored else DEFAULT_SPATIAL_SIZE
    if isinstance(spatial_size, bool) or not isinstance(spatial_size, numbers.Integral) or spatial_size < 1:
        raise ValueError(f"spatial_size (--spatial_size) must be a positive integer, got {spatial_size!r}")
    if stored and int(stored) != int(spatial_size):
        raise ValueError(
            f"spatial_size {int(spatial_size)} disagrees with the model folder: {config.get('_path', MODEL_CONFIG_NAME)} "
            f"says the network was trained at {int(stored)}; leave spatial_size unset to use {int(stored)}"
        )
    return int(spatial_size)


def resolve_postprocess(
    postprocess: Sequence[str] | str | None, config: Mapping[str, Any] | None = None
) -> tuple[str, ...]:
    """``postprocess`` if given (``"none"`` or ``[]`` for none), else the clean-up the model was trained to use.

    The model folder's ``postprocess`` (the recipe's key, written by :class:`ModelConfigSaver`) names steps of
    :data:`~monai_sdfsmis.transforms.postprocess.POSTPROCESS_STEPS`; an older folder without it has none.

    Raises
    ------
    ValueError
        For an unknown step name, given or stored (the file is named).
    """
    if postprocess is not None:
        return check_postprocess_steps(postprocess)
    config = config or {}
    try:
        return check_postprocess_steps(config.get("postprocess"))
    except ValueError as error:
        raise ValueError(f"{config.get('_path', MODEL_CONFIG_NAME)}: postprocess: {error}") from None


def resolve_support_alignment(support_alignment: str | None, config: Mapping[str, Any] | None = None) -> str:
    """``support_alignment`` if given, else the model folder's (the recipe's key), else ``"none"`` (the paper).

    Raises
    ------
    ValueError
        For a name outside :data:`~monai_sdfsmis.inferers.alignment.SUPPORT_ALIGNMENTS`, given or stored (the file is
        named).
    """
    from monai_sdfsmis.inferers.alignment import check_support_alignment

    if support_alignment is not None:
        return check_support_alignment(support_alignment)
    config = config or {}
    try:
        return check_support_alignment(config.get("support_alignment") or "none")
    except ValueError as error:
        raise ValueError(f"{config.get('_path', MODEL_CONFIG_NAME)}: {error}") from None


def resolve_intensity(intensity: str | None, config: Mapping[str, Any] | None = None) -> str:
    """``intensity`` if given, else the preset the model was trained with, else ``"minmax"``.

    Raises
    ------
    ValueError
        For a name outside :data:`~monai_sdfsmis.transforms.intensity.PRESETS`, given or stored (the file is named).
    """
    from monai_sdfsmis.transforms.intensity import PRESETS

    if intensity is not None:
        if intensity not in PRESETS:
            raise ValueError(f"intensity (--intensity) must be one of {', '.join(PRESETS)}, got {intensity!r}")
        return intensity
    config = config or {}
    stored = config.get("intensity") or DEFAULT_INTENSITY
    if stored not in PRESETS:
        raise ValueError(
            f"{config.get('_path', MODEL_CONFIG_NAME)}: intensity must be one of {', '.join(PRESETS)}, got {stored!r}"
        )
    return str(stored)


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
    if kind in ("pretrained", "tiny"):
        from monai_sdfsmis.networks.sdfsmis import SDFSMIS

        if kind == "pretrained":
            return SDFSMIS.from_pretrained(sd, image_encoder, local_files_only=local_files_only, **merged)
        warn_demo_network("the network is the tiny demo model (SDFSMIS.tiny, toy width, trained on phantoms at most)")
        return SDFSMIS.tiny(seed=0 if seed is None else int(seed), **merged)

    from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis
    from monai_sdfsmis.networks.supervised import build_supervised_segmenter

    autoencoder_dir = _autoencoder_dir(kind, model_dir, autoencoder_dir)
    unet, channels = _unet_settings(config, unet_width)
    if kind == "supervised" and "organ_ids" not in merged:
        raise ValueError(
            f"{config.get('_path', MODEL_CONFIG_NAME)}: a supervised model needs its organ_ids in settings"
        )
    build = build_supervised_segmenter if kind == "supervised" else build_no_prior_sdfsmis
    return build(autoencoder_dir, unet_channels=channels, seed=seed, **unet, **merged)


def _autoencoder_dir(
    kind: str, model_dir: str | PathLike | None, autoencoder_dir: str | PathLike | None
) -> str | PathLike:
    """The frozen autoencoder folder of a no-prior or supervised network (default ``<model_dir>/autoencoder``), checked
    to exist."""
    if autoencoder_dir is None:
        if model_dir is None:
            raise ValueError(f"network_type {kind!r} needs model_dir (the folder holding autoencoder/ and model.pt)")
        autoencoder_dir = _model_dir(model_dir) / "autoencoder"
    if not Path(autoencoder_dir).is_dir():
        raise FileNotFoundError(
            f"no-prior autoencoder folder not found: {autoencoder_dir} (stage 1, configs/train_autoencoder.json, "
            "writes it into the model folder)"
        )
    return autoencoder_dir


def _unet_settings(
    config: Mapping[str, Any], unet_width: str | Sequence[int] | None
) -> tuple[dict[str, Any], str | tuple[int, ...]]:
    """The UNet keyword arguments of a no-prior network besides its width, and that width (``unet_channels``): the
    model folder's (``unet_width``, when given, must agree with it), else ``unet_width``, else ``"default"``."""
    unet = dict(config.get("unet", {}))
    if unet_width is not None:
        check_unet_width(unet_width, config)
        unet = {**unet, "block_out_channels": unet_width} if not unet else unet
    channels = unet.pop("block_out_channels", "default")
    # model_config.json stores the widths as a JSON list
    return unet, tuple(channels) if isinstance(channels, list) else channels


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
        ``model.pt`` / ``checkpoint_iteration=N.pt`` (MONAI checkpoint) or a ``.safetensors`` state dict.
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
