"""Shared helpers for the test suite: where the real data lives, and skip markers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$SDFSMIS_DATA_DIR`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("SDFSMIS_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def chaos_dir() -> Path:
    return shared_data_dir() / "chaos_t2spir"


def totalseg_dir() -> Path:
    return shared_data_dir() / "totalseg_examples"


requires_chaos = pytest.mark.skipif(
    not (chaos_dir() / "image_1.nii.gz").exists(), reason="CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)"
)
requires_totalseg = pytest.mark.skipif(
    not (totalseg_dir() / "ct_dicom").exists(), reason="TotalSegmentator examples not found (set SDFSMIS_DATA_DIR)"
)


def link_chaos_subset(destination: Path, volumes: tuple[int, ...] = (1, 2, 3, 5)) -> Path:
    """An ALPNet-layout folder of symbolic links to a few CHAOS volumes (the data stays where it is)."""
    (destination / "supervoxels_5000").mkdir(parents=True)
    for n in volumes:
        os.symlink(chaos_dir() / f"image_{n}.nii.gz", destination / f"image_{n}.nii.gz")
        os.symlink(chaos_dir() / f"label_{n}.nii.gz", destination / f"label_{n}.nii.gz")
        os.symlink(chaos_dir() / "supervoxels_5000" / f"superpix-MIDDLE_{n}.nii.gz",
                   destination / "supervoxels_5000" / f"superpix-MIDDLE_{n}.nii.gz")
    return destination


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, what: str, seconds: float) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of ``log`` if ``proc`` exits or ``seconds`` pass."""
    import requests

    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up after {seconds:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` by its PID (also when a test failed), then kill it if it does not exit in 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def save_tiny_pretrained_weights(folder: Path) -> tuple[Path, Path]:
    """Tiny random Stable Diffusion 1.5 and DINOv2 weights in the real on-disk formats, for the commands that take
    ``--sd_weights`` and ``--image_encoder_weights``.

    ``folder/sd15`` is a ``StableDiffusionPipeline.save_pretrained`` folder (``model_index.json``, ``vae/``,
    ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors), ``folder/dinov2`` a
    ``Dinov2Model.save_pretrained`` folder. The UNet, VAE and DINOv2 are the package's toy architectures
    (``monai_sdfsmis/networks/configs/tiny``; the VAE downsamples 8x as SD's does), the text encoder a small CLIP
    with a byte-level tokenizer (``tests/test_pretrained.py``), the scheduler SD-1.5's.

    Returns
    -------
    tuple of Path
        The SD-1.5 folder and the DINOv2 folder.
    """
    import json

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer, Dinov2Config, Dinov2Model

    from monai_sdfsmis.networks.pretrained import SD15_CONFIG_DIR
    from monai_sdfsmis.networks.sdfsmis import TINY_CONFIG_DIR
    from tests.test_pretrained import tiny_text_encoder, write_clip_tokenizer

    def config(name: str) -> dict:
        return json.loads((TINY_CONFIG_DIR / f"{name}.json").read_text())

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config("unet"))
        text_encoder = tiny_text_encoder()
        assert text_encoder.config.hidden_size == unet.config.cross_attention_dim
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_config(config("vae")),
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "tokenizer_source"))),
            unet=unet,
            scheduler=PNDMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(folder / "sd15"), safe_serialization=True)
        dino = config("dinov2")
        dino.pop("model_type", None)
        Dinov2Model(Dinov2Config(**dino)).save_pretrained(str(folder / "dinov2"), safe_serialization=True)
    return folder / "sd15", folder / "dinov2"
