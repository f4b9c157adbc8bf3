"""Loading pretrained weights: real on-disk formats (diffusers folder, HF cache, LDM single file) with tiny models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

from monai_sdfsmis.networks.pretrained import (
    DINOV2_SMALL_CONFIG_DIR,
    SD15_CONFIG_DIR,
    SD15_EMPTY_PROMPT_IDS,
    build_dinov2_small,
    build_sd15_unet,
    build_sd15_vae,
    empty_prompt_embedding,
    find_missing_weights,
    load_image_encoder,
    load_pretrained_components,
    load_sd_components,
)

# ---------------------------------------------------------------------------------------------------------------
# tiny models in the real on-disk formats


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: Path, bos_id: int = 512, eos_id: int = 513) -> Path:
    """A CLIP BPE tokenizer with no merges: bytes, bytes + ``</w>``, and SD-1.5's special tokens and config."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": bos_id, "<|endoftext|>": eos_id})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # The values of SD-1.5's tokenizer/tokenizer_config.json.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_unet() -> UNet2DConditionModel:
    # SD's block pattern (cross-attention down blocks then a plain one) at 2 levels and 32/64 channels.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )


def tiny_text_encoder(vocab_size: int = 514) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    # Default inits leave many tensors equal (zeros/ones); random values make "loaded == saved" meaningful.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A real ``StableDiffusionPipeline.save_pretrained`` folder of tiny random models, and the models."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_sd")
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(root / "tok_src")))
    pipe = StableDiffusionPipeline(
        vae=_randomize(tiny_vae()),
        text_encoder=_randomize(tiny_text_encoder()),
        tokenizer=tokenizer,
        unet=_randomize(tiny_unet()),
        scheduler=PNDMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "sd"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder, pipe


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    torch.manual_seed(1)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56, mlp_ratio=2
    )
    model = _randomize(Dinov2Model(config))
    folder = tmp_path_factory.mktemp("tiny_dino") / "dino"
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder, model


def assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = reference.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def reference_embedding(pipe: StableDiffusionPipeline) -> torch.Tensor:
    ids = pipe.tokenizer("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


# ---------------------------------------------------------------------------------------------------------------
# shipped configs and full-size architectures


def test_shipped_sd15_configs():
    unet = UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet"))
    assert unet["sample_size"] == 64 and unet["in_channels"] == 4 and unet["out_channels"] == 4
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["layers_per_block"] == 2
    assert unet["cross_attention_dim"] == 768 and unet["attention_head_dim"] == 8
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    vae = AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae"))
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    assert vae["scaling_factor"] == 0.18215 and vae["sample_size"] == 512
    clip = CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder"))
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads) == (768, 12, 12)
    assert (clip.intermediate_size, clip.max_position_embeddings, clip.vocab_size) == (3072, 77, 49408)
    assert clip.hidden_act == "quick_gelu" and clip.projection_dim == 768
    scheduler = PNDMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.steps_offset) == (0.00085, 0.012, 1)
    assert json.loads((SD15_CONFIG_DIR / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    dino = Dinov2Config.from_pretrained(str(DINOV2_SMALL_CONFIG_DIR))
    assert (dino.hidden_size, dino.patch_size, dino.num_hidden_layers, dino.num_attention_heads) == (384, 14, 12, 6)


def test_full_size_architectures_on_meta():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    unet8 = build_sd15_unet(in_channels=8)
    assert unet8.conv_in.weight.shape == (320, 8, 3, 3) and unet8.conv_in.weight.device.type == "meta"
    assert count(unet8) == 859_532_484  # 859.5 M
    assert count(build_sd15_unet()) == 859_520_964  # SD-1.5's published UNet size
    assert count(build_sd15_vae()) == 83_653_863  # 83.7 M
    dino = build_dinov2_small()
    assert count(dino) == 22_056_576  # 22.1 M
    assert round(count(unet8) / 1e6, 1) == 859.5 and round(count(dino) / 1e6, 1) == 22.1


# ---------------------------------------------------------------------------------------------------------------
# local folders


def test_load_local_folders(tiny_sd, tiny_dino):
    folder, pipe = tiny_sd
    dino_folder, dino = tiny_dino
    parts = load_pretrained_components(folder, dino_folder, local_files_only=True)
    assert_same_weights(parts.vae, pipe.vae)
    assert_same_weights(parts.unet, pipe.unet)
    assert parts.unet.conv_in.in_channels == 4
    assert_same_weights(parts.image_encoder, dino)
    assert not parts.image_encoder.training
    assert not any(p.requires_grad for p in parts.image_encoder.parameters())
    expected = reference_embedding(pipe)
    assert parts.empty_prompt_embedding.shape == (1, 77, 32)
    torch.testing.assert_close(parts.empty_prompt_embedding, expected, rtol=0, atol=0)
    assert not torch.equal(expected[:, 0], expected[:, 1])  # BOS and EOS rows differ: a real forward pass


def test_no_image_encoder_and_dtype(tiny_sd, tiny_dino):
    folder, pipe = tiny_sd
    parts = load_pretrained_components(str(folder), None, local_files_only=True, torch_dtype=torch.bfloat16)
    assert parts.image_encoder is None
    assert parts.unet.dtype == torch.bfloat16 and parts.vae.dtype == torch.bfloat16
    # The text encoder runs in float32; only its output is cast.
    assert torch.equal(parts.empty_prompt_embedding, reference_embedding(pipe).to(torch.bfloat16))
    encoder = load_image_encoder(tiny_dino[0], local_files_only=True, torch_dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16 and not encoder.training


def test_missing_weights_in_local_folder(tiny_sd, tiny_dino, tmp_path):
    folder, _ = tiny_sd
    broken = tmp_path / "sd_broken"
    shutil.copytree(folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "text_encoder" / "config.json").unlink()
    assert find_missing_weights(broken) == ["unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json"]
    assert find_missing_weights(folder) == []
    with pytest.raises(FileNotFoundError) as err:
        load_sd_components(broken, local_files_only=True)
    message = str(err.value)
    assert "unet/diffusion_pytorch_model.safetensors" in message and "text_encoder/config.json" in message
    assert str(broken) in message

    # A sharded UNet with one shard gone: the index alone does not make the folder complete.
    sharded = tmp_path / "sd_sharded"
    shutil.copytree(folder, sharded)
    (sharded / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    pipe_unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    pipe_unet.save_pretrained(str(sharded / "unet"), max_shard_size="200KB")
    shards = sorted((sharded / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    shutil.move(shards[1], tmp_path / shards[1].name)
    with pytest.raises(FileNotFoundError, match=re.escape(f"unet/{shards[1].name}")):
        load_sd_components(sharded, local_files_only=True)
    shutil.move(tmp_path / shards[1].name, shards[1])
    assert find_missing_weights(sharded) == []
    assert_same_weights(load_sd_components(sharded, local_files_only=True)[1], pipe_unet)

    dino_broken = tmp_path / "dino_broken"
    shutil.copytree(tiny_dino[0], dino_broken)
    (dino_broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as err:
        load_image_encoder(dino_broken, local_files_only=True)
    assert str(dino_broken) in str(err.value)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_components(tmp_path / "nowhere", None, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_sd_components(str(tmp_path / "nowhere.safetensors"))
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read the checkpoint .*damaged.safetensors"):
        load_sd_components(tmp_path / "damaged.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_sd_components(tmp_path / "notes.txt")


def test_tokenizer_folder_is_optional_only_for_sd15_vocab(tiny_sd, tmp_path):
    folder, _ = tiny_sd
    no_tok = tmp_path / "sd_no_tokenizer"
    shutil.copytree(folder, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    # The tiny text encoder's vocabulary is not SD-1.5's, so the fixed ids cannot stand in for the tokenizer.
    with pytest.raises(ValueError, match="tokenizer"):
        load_sd_components(no_tok, local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------
# SD-1.5's empty prompt without a tokenizer


def test_fixed_empty_prompt_ids_match_sd15_tokenizer(tmp_path):
    # SD-1.5's special-token ids (49406/49407) and tokenizer_config (pad = "<|endoftext|>", 77 tokens).
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok", 49406, 49407)))
    ids = tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids
    assert tuple(ids) == SD15_EMPTY_PROMPT_IDS
    assert SD15_EMPTY_PROMPT_IDS[:2] == (49406, 49407) and set(SD15_EMPTY_PROMPT_IDS[2:]) == {49407}
    torch.manual_seed(2)
    encoder = tiny_text_encoder(vocab_size=49408)
    torch.testing.assert_close(empty_prompt_embedding(encoder), empty_prompt_embedding(encoder, tokenizer))
    with pytest.raises(ValueError, match="tokenizer"):
        empty_prompt_embedding(tiny_text_encoder())


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face repo ids through the cache


def _populate_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """The hub cache layout: ``models--org--name/snapshots/<commit>/...`` plus ``refs/main`` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_sd_components("acme/not-cached-sd", local_files_only=True, cache_dir=cache)
    message = str(err.value)
    assert "acme/not-cached-sd" in message and str(cache) in message
    assert "unet/diffusion_pytorch_model.safetensors" in message and "vae/config.json" in message
    assert "downloading is off" in message
    # local_files_only=None follows HF_HUB_OFFLINE.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"facebook/dinov2-small.*downloading is off.*model\.safetensors"):
        load_pretrained_components("acme/not-cached-sd", "facebook/dinov2-small", cache_dir=cache)


def test_hub_id_from_populated_cache(tiny_sd, tiny_dino, tmp_path):
    folder, pipe = tiny_sd
    cache = tmp_path / "hf_cache"
    _populate_hub_cache(cache, "acme/tiny-sd", folder)
    _populate_hub_cache(cache, "acme/tiny-dino", tiny_dino[0])
    assert find_missing_weights("acme/tiny-sd", cache_dir=cache) == []
    assert find_missing_weights("acme/tiny-dino", ("",), cache_dir=cache) == []
    parts = load_pretrained_components("acme/tiny-sd", "acme/tiny-dino", local_files_only=True, cache_dir=cache)
    assert_same_weights(parts.unet, pipe.unet)
    assert_same_weights(parts.vae, pipe.vae)
    assert_same_weights(parts.image_encoder, tiny_dino[1])
    torch.testing.assert_close(parts.empty_prompt_embedding, reference_embedding(pipe), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# single original-format (LDM) checkpoint

_RESNET_TO_LDM_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _ldm_unet_key(key: str, per_level: int, up_with_attention: list[bool]) -> str:
    """diffusers UNet2DConditionModel key -> CompVis ``model.diffusion_model.`` key (the layout of SD checkpoints)."""

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return f"{_RESNET_TO_LDM_UNET[name]}.{tail}"

    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for prefix, ldm in fixed.items():
        if key.startswith(prefix):
            return ldm + key[len(prefix) :]
    step = per_level + 1  # an LDM level is its resnets plus one down/upsampler slot
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.0.{resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (step) + int(m[2])}.0.{resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        slot = 2 if up_with_attention[int(m[1])] else 1
        return f"output_blocks.{int(m[1]) * step + per_level}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def _ldm_vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> CompVis ``first_stage_model.`` key."""
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # LDM numbers decoder levels from the lowest resolution up; diffusers from the top.
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
    return key


def write_ldm_checkpoint(path: Path, pipe: StableDiffusionPipeline) -> Path:
    """One ``.safetensors`` in the original SD layout: UNet, VAE (attention as 1x1 convs) and CLIP text model."""
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    up_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    state: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        state["model.diffusion_model." + _ldm_unet_key(k, unet.config.layers_per_block, up_attention)] = v
    levels = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        ldm = _ldm_vae_key(k, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        state["first_stage_model." + ldm] = v
    for k, v in text.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        state["cond_stage_model.transformer." + k] = v
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def test_single_file_checkpoint(tiny_sd, tmp_path):
    folder, pipe = tiny_sd
    checkpoint = write_ldm_checkpoint(tmp_path / "tiny-sd.safetensors", pipe)
    assert not any(k.startswith(("unet.", "vae.")) for k in json.loads(_safetensors_header(checkpoint)))
    # The tiny architecture is not SD-1.5's, so its configs are passed the way the shipped ones are by default.
    vae, unet, embedding = load_sd_components(checkpoint, single_file_config=folder)
    assert_same_weights(unet, pipe.unet)
    assert_same_weights(vae, pipe.vae)
    torch.testing.assert_close(embedding, reference_embedding(pipe), rtol=0, atol=0)

    # A checkpoint without the UNet: a clear error naming the file, not a silently random UNet.
    from safetensors.torch import load_file

    partial = {k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("model.diffusion_model.out.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial\.safetensors.*UNet"):
        load_sd_components(tmp_path / "partial.safetensors", single_file_config=folder)


def _safetensors_header(path: Path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(size).decode()


# ---------------------------------------------------------------------------------------------------------------
# the composed network


def test_sdfsmis_from_pretrained(tiny_sd, tiny_dino):
    sdfsmis = pytest.importorskip("monai_sdfsmis.networks.sdfsmis")
    if not hasattr(sdfsmis.SDFSMIS, "from_pretrained"):
        pytest.skip("SDFSMIS.from_pretrained not written yet")
    folder, pipe = tiny_sd
    net = sdfsmis.SDFSMIS.from_pretrained(folder, tiny_dino[0], local_files_only=True)
    assert_same_weights(net.vae, pipe.vae)
    torch.testing.assert_close(net.empty_prompt_embedding, reference_embedding(pipe), rtol=0, atol=0)
    # The UNet's pretrained weights arrive unchanged (conv_in is replaced by the network's own input convs).
    reference = pipe.unet.state_dict()
    loaded = net.unet.state_dict()
    shared = [k for k in reference if not k.startswith("conv_in.")]
    assert all(torch.equal(loaded[k], reference[k]) for k in shared)
