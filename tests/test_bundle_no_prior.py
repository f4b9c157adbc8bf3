"""The no-prior mode's two bundle stages, run as a user types them: autoencoder, then segmenter."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL

from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis
from tests.test_bundle import _bundle_cli, _overrides

STAGE1 = "['configs/train.json','configs/quickstart.json','configs/train_autoencoder.json']"
STAGE2 = "['configs/train.json','configs/quickstart.json','configs/network_no_prior.json','configs/train_no_prior.json']"


def test_two_stage_no_prior_training_on_phantoms(tmp_path):
    out = tmp_path / "run"
    common = {"output_dir": str(out), "spatial_size": 64, "num_workers": 0}
    stage1 = _bundle_cli(
        "run", "training", "--config_file", STAGE1,
        *_overrides({**common, "ae_width": "tiny", "ae_iterations": 4, "ae_batch_size": 4, "calibration_slices": 8}),
    )
    assert stage1.returncode == 0
    ae_dir = out / "models" / "autoencoder"
    vae = AutoencoderKL.from_pretrained(ae_dir)
    calibration = json.loads((ae_dir / "calibration.json").read_text())
    # the latent scale is measured on the data, not SD's 0.18215
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0
    assert calibration["scaling_factor"] == vae.config.scaling_factor

    stage2 = _bundle_cli(
        "run", "training", "--config_file", STAGE2,
        *_overrides({**common, "unet_width": "tiny", "iterations": 3, "batch_size": 2, "val_interval": 3}),
    )
    assert stage2.returncode == 0
    assert "val_mean_dice" in stage2.stdout + stage2.stderr
    # the final model.pt loads strictly into the same no-prior architecture built on the stage-1 autoencoder
    net = build_no_prior_sdfsmis(ae_dir, unet_channels="tiny", seed=0)
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    assert net.vtct.image_encoder is None
