"""Loading the pretrained parts of SD-FSMIS: SD-1.5's VAE, UNet and empty-prompt embedding, and DINOv2-small.

Three kinds of Stable Diffusion source are accepted:

* a Hugging Face repo id in diffusers layout (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``), taken from
  the Hugging Face cache, or downloaded when downloading is allowed;
* a local folder in the same layout (what ``StableDiffusionPipeline.save_pretrained`` or ``hf download`` writes);
* a single original-format (LDM) checkpoint, ``.safetensors`` or ``.ckpt``. Its architecture comes from the SD-1.5
  configs shipped in ``networks/configs/sd15`` so that nothing has to be downloaded.

The CLIP text encoder is only used to compute the empty-prompt embedding once; it is dropped afterwards, so
inference never needs it. Missing weights give a ``FileNotFoundError`` that lists the missing files and where they
were looked for.
"""

from __future__ import annotations

__all__ = [
    "SD15_CONFIG_DIR",
    "DINOV2_SMALL_CONFIG_DIR",
    "TINY_CONFIG_DIR",
    "SD15_EMPTY_PROMPT_IDS",
    "SINGLE_FILE_SUFFIXES",
    "PretrainedComponents",
    "load_pretrained_components",
    "load_sd_components",
    "load_image_encoder",
    "find_missing_weights",
    "empty_prompt_embedding",
    "build_sd15_unet",
    "build_sd15_vae",
    "build_dinov2_small",
    "build_tiny_components",
]

import contextlib
import gc
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
"""SD-1.5 component configs in diffusers layout (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``)."""

DINOV2_SMALL_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "dinov2_small"
"""``facebook/dinov2-small``'s ``config.json`` (hidden 384, patch 14, 12 layers, 6 heads)."""

TINY_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "tiny"
"""Toy-width ``unet.json``, ``vae.json`` and ``dinov2.json`` of the same architectures (tests and smoke runs)."""

# SD-1.5's tokenizer (CLIP ViT-L/14 BPE, 49408 ids) puts <|startoftext|> at 49406 and <|endoftext|> at 49407
# (256 byte tokens + 256 byte</w> tokens + 48894 merges = 49406 ordinary ids before them). Its tokenizer_config
# sets pad_token = "<|endoftext|>" and model_max_length = 77, so "" padded to 77 is BOS, EOS, then 75 x EOS.
# (OpenAI's own CLIP pads with id 0, "!"; SD's diffusers tokenizer does not.) Used when no tokenizer is at hand.
SD15_EMPTY_PROMPT_IDS: tuple[int, ...] = (49406, 49407) + (49407,) * 75

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_SD_COMPONENTS = ("vae", "unet", "text_encoder")
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
_TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# diffusers saves its models under diffusion_pytorch_model.*, transformers under model.*.
_DIFFUSERS_COMPONENTS = frozenset({"vae", "unet"})


@dataclass
class PretrainedComponents:
    """The pretrained parts SD-FSMIS is built from.

    Attributes
    ----------
    vae
        SD's ``AutoencoderKL`` (frozen by the caller).
    unet
        SD's ``UNet2DConditionModel`` with its own 4-channel ``conv_in``, untouched.
    image_encoder
        Frozen ``Dinov2Model`` in eval mode, or ``None`` when no image encoder was asked for.
    empty_prompt_embedding
        ``[1, 77, 768]``: SD's CLIP text encoder output (last hidden state) for the empty prompt.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    image_encoder: Dinov2Model | None
    empty_prompt_embedding: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# where weights come from


def _is_truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_local_files_only(local_files_only: bool | None) -> bool:
    """``None`` follows ``HF_HUB_OFFLINE`` (read now, so a changed environment is honoured)."""
    if local_files_only is not None:
        return bool(local_files_only)
    return _is_truthy(os.environ.get("HF_HUB_OFFLINE"))


def _hub_cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_path(source: str) -> bool:
    # A repo id is "name" or "owner/name"; anything else that does not exist locally is a mistyped path.
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or source.lower().endswith(SINGLE_FILE_SUFFIXES)
    )


def _classify(source: str | Path, what: str) -> tuple[str, str]:
    """Return ``(kind, location)`` with kind one of ``"file"``, ``"folder"``, ``"hub"``."""
    if isinstance(source, Path) or _looks_like_path(str(source)):
        path = Path(source).expanduser()
        if path.is_file():
            return "file", str(path)
        if path.is_dir():
            return "folder", str(path)
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (neither a file nor a folder).")
    path = Path(source)
    if path.is_file():
        return "file", str(path)
    if path.is_dir():
        return "folder", str(path)
    return "hub", str(source)


def _weight_candidates(component: str) -> tuple[str, ...]:
    if component in _DIFFUSERS_COMPONENTS:
        return _DIFFUSERS_WEIGHTS + _TRANSFORMERS_WEIGHTS
    return _TRANSFORMERS_WEIGHTS + _DIFFUSERS_WEIGHTS


def _join(component: str, name: str) -> str:
    return f"{component}/{name}" if component else name


def find_missing_weights(
    source: str | Path,
    components: Sequence[str] = _SD_COMPONENTS,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> list[str]:
    """List the files a pretrained model still lacks, without loading anything.

    Parameters
    ----------
    source
        A local folder, a single checkpoint file, or a Hugging Face repo id (looked up in the local cache only).
    components
        Subfolders that must each hold a ``config.json`` and a weight file (safetensors, bin or a sharded index).
        ``""`` means the folder itself (e.g. DINOv2's repo). Defaults to SD's ``vae``, ``unet``, ``text_encoder``.
    cache_dir
        Hugging Face hub cache to search for a repo id; defaults to ``huggingface_hub.constants.HF_HUB_CACHE``.
    revision
        Branch, tag or commit of a repo id; defaults to ``main``.

    Returns
    -------
    Paths relative to ``source`` (``"unet/diffusion_pytorch_model.safetensors"``) of what is missing; a missing
    weight is named by its preferred (safetensors) file name. For a single file: ``[source]`` if it does not exist.
    Empty when everything is there.
    """
    try:
        kind, location = _classify(source, "weights source")
    except FileNotFoundError:
        return [str(source)]
    if kind == "file":
        return []

    def locate(relative: str) -> Path | None:
        if kind == "folder":
            path = Path(location) / relative
            return path if path.is_file() else None
        return _hub_cached_path(location, relative, cache_dir, revision)

    missing: list[str] = []
    for component in components:
        if locate(_join(component, "config.json")) is None:
            missing.append(_join(component, "config.json"))
        found = next(
            ((name, path) for name in _weight_candidates(component) if (path := locate(_join(component, name)))),
            None,
        )
        if found is None:
            missing.append(_join(component, _weight_candidates(component)[0]))
        elif found[0].endswith(".index.json"):
            # A sharded checkpoint is only complete when every shard its index names is there.
            missing.extend(
                _join(component, shard) for shard in _index_shards(found[1]) if locate(_join(component, shard)) is None
            )
    return missing


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"the shard index {index} is unreadable or has no 'weight_map': {exc}") from exc


def _hub_cached_path(repo_id: str, filename: str, cache_dir: str | Path | None, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    except ValueError:  # malformed repo id (huggingface_hub's HFValidationError)
        return None
    return Path(found) if isinstance(found, str) else None


def _missing_message(
    what: str, kind: str, location: str, missing: list[str], cache_dir: str | Path | None, local_files_only: bool
) -> str:
    listed = ", ".join(missing)
    if kind == "folder":
        return (
            f"{what} in the folder {location} is incomplete: missing {listed} "
            "(a .bin file, or a sharded index with all its shards, may stand in for a .safetensors file)."
        )
    if kind == "hub":
        how = (
            "downloading is off (local_files_only=True or HF_HUB_OFFLINE is set)"
            if local_files_only
            else "it could not be downloaded"
        )
        return (
            f"{what} '{location}' is not complete in the Hugging Face cache {_hub_cache_dir(cache_dir)} and {how}: "
            f"missing {listed}. Download it once (e.g. `hf download {location}`) or pass a local folder."
        )
    return f"{what} file {location} does not exist."


def _load_or_explain(
    load: Callable[[], _T],
    *,
    what: str,
    kind: str,
    location: str,
    components: Sequence[str],
    cache_dir: str | Path | None,
    local_files_only: bool,
) -> _T:
    """Run ``load``; turn a missing-file failure of diffusers/transformers/huggingface_hub into a clear error."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return load()
    except (OSError, EntryNotFoundError, LocalEntryNotFoundError) as exc:
        missing = find_missing_weights(location, components, cache_dir=cache_dir) if kind != "file" else []
        if not missing:
            raise
        raise FileNotFoundError(
            _missing_message(what, kind, location, missing, cache_dir, local_files_only) + f" ({exc})"
        ) from exc


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion


@torch.no_grad()
def empty_prompt_embedding(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer | None = None) -> torch.Tensor:
    """SD's unconditional text embedding, ``text_encoder(ids of "")[0]``.

    Parameters
    ----------
    text_encoder
        SD's CLIP text model.
    tokenizer
        SD's tokenizer. ``None`` uses :data:`SD15_EMPTY_PROMPT_IDS` (only valid for SD-1.x's 49408-token vocabulary).

    Returns
    -------
    ``[1, L, D]`` last hidden state, ``L = max_position_embeddings`` (77), ``D = hidden_size`` (768 for SD-1.5).
    """
    length = int(text_encoder.config.max_position_embeddings)
    if tokenizer is not None:
        ids = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    else:
        if text_encoder.config.vocab_size != 49408 or length != len(SD15_EMPTY_PROMPT_IDS):
            raise ValueError(
                "no tokenizer was given and the text encoder is not SD-1.x's CLIP ViT-L/14 "
                f"(vocab_size={text_encoder.config.vocab_size}, max_position_embeddings={length}); "
                "the fixed empty-prompt ids only fit SD-1.x. Provide a tokenizer/ folder."
            )
        ids = torch.tensor([SD15_EMPTY_PROMPT_IDS], dtype=torch.long)
    text_encoder.eval()
    device = next(text_encoder.parameters()).device
    # SD-1.5 calls its text encoder without an attention mask (config.use_attention_mask is unset).
    return text_encoder(ids.to(device))[0]


def _tokenizer_or_none(kind: str, location: str, local_files_only: bool, cache_dir: str | Path | None) -> Any:
    if kind == "folder" and not (Path(location) / "tokenizer").is_dir():
        return None
    try:
        return CLIPTokenizer.from_pretrained(
            location, subfolder="tokenizer", local_files_only=local_files_only, cache_dir=cache_dir
        )
    except (OSError, ValueError) as exc:
        if kind == "folder":
            raise ValueError(f"the tokenizer in {Path(location) / 'tokenizer'} could not be read: {exc}") from exc
        logger.warning("SD tokenizer of %s unavailable (%s); using SD-1.5's fixed empty-prompt ids.", location, exc)
        return None


def _load_sd_diffusers_layout(
    kind: str, location: str, *, local_files_only: bool, torch_dtype: torch.dtype, cache_dir: str | Path | None
) -> tuple[AutoencoderKL, UNet2DConditionModel, torch.Tensor]:
    what = "Stable Diffusion (diffusers layout)"
    if kind == "folder" or local_files_only:
        # Nothing can be fetched, so say up front exactly what is missing rather than after a deep traceback.
        missing = find_missing_weights(location, _SD_COMPONENTS, cache_dir=cache_dir)
        if missing:
            raise FileNotFoundError(_missing_message(what, kind, location, missing, cache_dir, local_files_only))
    common: dict[str, Any] = {"local_files_only": local_files_only, "cache_dir": cache_dir}

    def explain(load: Callable[[], _T]) -> _T:
        return _load_or_explain(
            load,
            what=what,
            kind=kind,
            location=location,
            components=_SD_COMPONENTS,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )

    vae = explain(lambda: AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=torch_dtype, **common))
    unet = explain(
        lambda: UNet2DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=torch_dtype, **common)
    )
    # fp32 for the one forward pass that makes the embedding; the encoder is dropped right after.
    text_encoder = explain(
        lambda: CLIPTextModel.from_pretrained(location, subfolder="text_encoder", dtype=torch.float32, **common)
    )
    tokenizer = _tokenizer_or_none(kind, location, local_files_only, cache_dir)
    embedding = empty_prompt_embedding(text_encoder, tokenizer).to(torch_dtype)
    del text_encoder
    gc.collect()
    return vae, unet, embedding


def _check_complete(model_keys: set[str], converted_keys: set[str], path: str, what: str) -> None:
    missing = sorted(model_keys - converted_keys)
    if missing:
        raise ValueError(
            f"the checkpoint {path} lacks {len(missing)} of the {len(model_keys)} {what} weights "
            f"(e.g. {', '.join(missing[:3])}); is it an SD-1.x checkpoint in the original (LDM) layout?"
        )


def _clip_from_ldm(checkpoint: dict[str, torch.Tensor], config_dir: Path, path: str) -> CLIPTextModel:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    config = CLIPTextConfig.from_pretrained(str(config_dir), subfolder="text_encoder", local_files_only=True)
    model = CLIPTextModel(config)
    state = convert_ldm_clip_checkpoint(checkpoint)
    if not state:
        raise ValueError(
            f"the checkpoint {path} holds no CLIP text encoder (no 'cond_stage_model.transformer.' keys), "
            "which is needed once for the empty-prompt embedding; use a diffusers folder instead."
        )
    # transformers >= 5.6 flattened CLIPTextModel (no .text_model); LDM keys still carry the prefix.
    if not hasattr(model, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    _check_complete(expected, set(state), path, "CLIP text encoder")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"the text encoder in {path} does not match the config in {config_dir}: {exc}") from exc
    return model.eval()


def _load_sd_single_file(
    path: str, *, config_dir: Path, torch_dtype: torch.dtype
) -> tuple[AutoencoderKL, UNet2DConditionModel, torch.Tensor]:
    from diffusers.loaders.single_file_utils import (
        SingleFileComponentError,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        load_single_file_checkpoint,
    )

    for sub in ("unet", "vae", "text_encoder"):
        if not (config_dir / sub / "config.json").is_file():
            raise FileNotFoundError(f"single-file config folder {config_dir} lacks {sub}/config.json")
    try:
        # Read once and hand the dict to every from_single_file, instead of reading a 4 GB file three times.
        checkpoint = load_single_file_checkpoint(path, local_files_only=True)
    except Exception as exc:  # safetensors/torch raise several unrelated types for a damaged file
        raise ValueError(f"could not read the checkpoint {path}: {exc}") from exc
    common: dict[str, Any] = {"config": str(config_dir), "local_files_only": True, "torch_dtype": torch_dtype}
    try:
        # Checked before loading: with accelerate, diffusers builds on the meta device and a missing weight
        # surfaces as "cannot copy out of meta tensor" instead of a random layer.
        for model_class, sub, convert, what in (
            (AutoencoderKL, "vae", convert_ldm_vae_checkpoint, "VAE"),
            (UNet2DConditionModel, "unet", convert_ldm_unet_checkpoint, "UNet"),
        ):
            config = model_class.load_config(str(config_dir), subfolder=sub, local_files_only=True)
            with torch.device("meta"):
                expected = set(model_class.from_config(config).state_dict())
            _check_complete(expected, set(convert(checkpoint, dict(config))), path, what)
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **common)
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **common)
    except (RuntimeError, KeyError, IndexError, SingleFileComponentError) as exc:
        # shape mismatch, or a layout diffusers' converter does not know
        raise ValueError(f"{path} is not an SD-1.x checkpoint matching the configs in {config_dir}: {exc}") from exc
    text_encoder = _clip_from_ldm(checkpoint, config_dir, path)
    # Single-file checkpoints ship no tokenizer; the fixed SD-1.5 ids stand in for it.
    tokenizer = None
    if (config_dir / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(config_dir), subfolder="tokenizer", local_files_only=True)
    embedding = empty_prompt_embedding(text_encoder, tokenizer).to(torch_dtype)
    del text_encoder, checkpoint
    gc.collect()
    return vae, unet, embedding


def load_sd_components(
    sd: str | Path = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    *,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    single_file_config: str | Path | None = None,
) -> tuple[AutoencoderKL, UNet2DConditionModel, torch.Tensor]:
    """Load SD's VAE and UNet and compute the empty-prompt embedding.

    Parameters
    ----------
    sd
        Hugging Face repo id, local diffusers folder, or single LDM checkpoint (``.safetensors``/``.ckpt``).
    local_files_only
        Never download. ``None``: ``True`` when ``HF_HUB_OFFLINE`` is set to a true value.
    torch_dtype
        dtype of the returned VAE, UNet and embedding (the text encoder always runs in float32).
    cache_dir
        Hugging Face cache for repo ids; default ``HF_HUB_CACHE``.
    single_file_config
        Folder in diffusers layout whose ``unet/``, ``vae/``, ``text_encoder/`` configs describe a single-file
        checkpoint; default :data:`SD15_CONFIG_DIR`. Ignored for repo ids and folders.

    Returns
    -------
    ``(vae, unet, empty_prompt_embedding)``, the embedding ``[1, 77, 768]`` for SD-1.5.

    Raises
    ------
    FileNotFoundError
        A weight file is missing; the message lists which, and the folder or cache + repo id searched.
    ValueError
        A single file that is not an SD-1.x LDM checkpoint.
    """
    local_files_only = _resolve_local_files_only(local_files_only)
    kind, location = _classify(sd, "Stable Diffusion source")
    if kind == "file":
        if not location.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise ValueError(
                f"{location} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); "
                "pass a .safetensors/.ckpt file, a diffusers folder or a repo id."
            )
        config_dir = Path(single_file_config) if single_file_config is not None else SD15_CONFIG_DIR
        vae, unet, embedding = _load_sd_single_file(location, config_dir=config_dir, torch_dtype=torch_dtype)
    else:
        vae, unet, embedding = _load_sd_diffusers_layout(
            kind, location, local_files_only=local_files_only, torch_dtype=torch_dtype, cache_dir=cache_dir
        )
    return vae.eval(), unet.eval(), embedding


# ----------------------------------------------------------------------------------------------------------------
# DINOv2


def load_image_encoder(
    image_encoder: str | Path = "facebook/dinov2-small",
    *,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> Dinov2Model:
    """Load a frozen DINOv2 (``Dinov2Model``) from a repo id or a local ``save_pretrained`` folder.

    Returns
    -------
    The model in eval mode with ``requires_grad`` off for every parameter.

    Raises
    ------
    FileNotFoundError
        ``config.json`` or the weights are missing; the message lists which and where they were looked for.
    """
    local_files_only = _resolve_local_files_only(local_files_only)
    kind, location = _classify(image_encoder, "image encoder source")
    what = "Image encoder (DINOv2)"
    if kind == "file":
        raise ValueError(
            f"image encoder {location} is a single file; pass a folder with config.json and model.safetensors "
            "or a repo id such as 'facebook/dinov2-small'."
        )
    if kind == "folder" or local_files_only:
        missing = find_missing_weights(location, ("",), cache_dir=cache_dir)
        if missing:
            raise FileNotFoundError(_missing_message(what, kind, location, missing, cache_dir, local_files_only))
    model = _load_or_explain(
        lambda: Dinov2Model.from_pretrained(
            location, local_files_only=local_files_only, cache_dir=cache_dir, dtype=torch_dtype
        ),
        what=what,
        kind=kind,
        location=location,
        components=("",),
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    model.eval()
    model.requires_grad_(False)
    return model


def load_pretrained_components(
    sd: str | Path = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    image_encoder: str | Path | None = "facebook/dinov2-small",
    *,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    single_file_config: str | Path | None = None,
) -> PretrainedComponents:
    """Load everything SD-FSMIS takes from pretrained models.

    Parameters
    ----------
    sd
        Stable Diffusion: Hugging Face repo id, local diffusers folder, or single LDM checkpoint.
    image_encoder
        DINOv2: repo id or local folder; ``None`` for no image encoder.
    local_files_only
        Never download. ``None``: ``True`` when ``HF_HUB_OFFLINE`` is set to a true value.
    torch_dtype
        dtype of the returned models and embedding.
    cache_dir
        Hugging Face cache for repo ids; default ``HF_HUB_CACHE``.
    single_file_config
        Architecture of a single-file ``sd`` (diffusers-layout config folder); default the shipped SD-1.5 configs.

    Returns
    -------
    :class:`PretrainedComponents` with the embedding ``[1, 77, 768]``.
    """
    local_files_only = _resolve_local_files_only(local_files_only)
    # DINOv2 is small and fails fast, so check it before the multi-GB SD load.
    encoder = None
    if image_encoder is not None:
        encoder = load_image_encoder(
            image_encoder, local_files_only=local_files_only, torch_dtype=torch_dtype, cache_dir=cache_dir
        )
    vae, unet, embedding = load_sd_components(
        sd,
        local_files_only=local_files_only,
        torch_dtype=torch_dtype,
        cache_dir=cache_dir,
        single_file_config=single_file_config,
    )
    return PretrainedComponents(vae=vae, unet=unet, image_encoder=encoder, empty_prompt_embedding=embedding)


# ----------------------------------------------------------------------------------------------------------------
# architectures without weights


@contextlib.contextmanager
def _device_context(device: str | torch.device | None) -> Iterator[None]:
    if device is None:
        yield
        return
    if torch.device(device).type == "meta":
        try:
            from accelerate import init_empty_weights
        except ImportError:
            init_empty_weights = None
        if init_empty_weights is not None:
            with init_empty_weights():
                yield
            return
    with torch.device(device):
        yield


def build_sd15_unet(
    in_channels: int = 4, device: str | torch.device | None = "meta", **overrides: Any
) -> UNet2DConditionModel:
    """SD-1.5's UNet from the shipped config, without weights.

    Parameters
    ----------
    in_channels
        Input channels of ``conv_in`` (4 in SD; 8 for a Marigold-style latent + condition input).
    device
        ``"meta"`` (default) allocates nothing; ``None`` builds randomly initialised CPU weights.
    overrides
        Further config fields to change.
    """
    config = dict(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet")))
    config.update(in_channels=in_channels, **overrides)
    with _device_context(device):
        return UNet2DConditionModel.from_config(config)


def build_sd15_vae(device: str | torch.device | None = "meta", **overrides: Any) -> AutoencoderKL:
    """SD-1.5's ``AutoencoderKL`` from the shipped config, without weights (see :func:`build_sd15_unet`)."""
    config = dict(AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae")))
    config.update(overrides)
    with _device_context(device):
        return AutoencoderKL.from_config(config)


def build_dinov2_small(device: str | torch.device | None = "meta", **overrides: Any) -> Dinov2Model:
    """A DINOv2-small-sized ``Dinov2Model`` from the shipped config, without weights."""
    config = Dinov2Config.from_pretrained(str(DINOV2_SMALL_CONFIG_DIR), local_files_only=True, **overrides)
    with _device_context(device):
        return Dinov2Model(config)


def build_tiny_components(with_image_encoder: bool = True) -> PretrainedComponents:
    """SD-FSMIS's parts at toy width, randomly initialised from ``configs/tiny/{unet,vae,dinov2}.json``.

    For tests and smoke runs on CPU (latent 4x32x32 at 256x256 input, 7 transformer blocks). The weights and the
    empty-prompt embedding (a random ``[1, 77, D]`` stand-in for CLIP's output) are drawn from torch's global RNG:
    seed it, inside ``torch.random.fork_rng`` to leave it untouched (as :meth:`SDFSMIS.tiny` does).
    """

    def read(name: str) -> dict:
        return json.loads((TINY_CONFIG_DIR / f"{name}.json").read_text())

    unet = UNet2DConditionModel.from_config(read("unet"))
    vae = AutoencoderKL.from_config(read("vae"))
    encoder = None
    if with_image_encoder:
        config = read("dinov2")
        config.pop("model_type", None)
        encoder = Dinov2Model(Dinov2Config(**config))
    embedding = torch.randn(1, 77, int(unet.config.cross_attention_dim))
    return PretrainedComponents(vae=vae, unet=unet, image_encoder=encoder, empty_prompt_embedding=embedding)
