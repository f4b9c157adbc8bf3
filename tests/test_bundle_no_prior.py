"""The no-prior mode through the bundle, run as a user types it: the README's quick start (both stages in one
command), and the two stages as separate commands (autoencoder, then segmenter)."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL

from monai_sdfsmis.networks.no_prior import build_no_prior_sdfsmis
from tests.test_bundle import _bundle_cli, _overrides
from tests.utils import REPO_ROOT

STAGE1 = "['configs/train.json','configs/quickstart.json','configs/train_autoencoder.json']"
STAGE2 = "['configs/train.json','configs/quickstart.json','configs/network_no_prior.json','configs/train_no_prior.json']"
# The README's main job: both stages, then one evaluation, from one command.
QUICKSTART = (
    "['configs/train.json','configs/quickstart.json','configs/train_autoencoder.json',"
    "'configs/network_no_prior.json','configs/train_no_prior.json','configs/quickstart_no_prior.json']"
)


def test_no_prior_quickstart_as_the_readme_runs_it_ends_in_its_table(tmp_path):
    """The README command at reduced size (fewer iterations, output in tmp): stage 1, stage 2, one evaluation."""
    readme = (REPO_ROOT / "README.md").read_text()
    command = f'(cd bundles/sd_fsmis && python -m monai.bundle run training --config_file "{QUICKSTART}")'
    assert command in readme, "the README's main job is not this quick start"
    out = tmp_path / "run"
    proc = _bundle_cli(
        "run", "training", "--config_file", QUICKSTART,
        *_overrides({"output_dir": str(out), "ae_iterations": 3, "calibration_slices": 8, "iterations": 3}),
    )
    assert proc.returncode == 0
    # SD-FSMIS is evaluated once: two protocol runs (the baseline, then the model), no validation during training.
    assert (proc.stdout + proc.stderr).count("ProtocolEvaluator - INFO - Engine run finished") == 2
    # The run ends by printing the table it wrote: Dice, HD95 and ASSD, each with the baseline row, then the model's.
    table = (out / "evaluation" / "fold_0" / "protocol_table.md").read_text()
    assert proc.stdout.replace("\r", "").rstrip().endswith(table.rstrip())
    rows = [line.split("|")[1].strip() for line in table.splitlines() if "(folds 0) |" in line]
    assert rows == ["support-mask copy (folds 0)", "SD-FSMIS no-prior (folds 0)"] * 3
    assert (out / "models" / "autoencoder" / "calibration.json").is_file()
    assert sorted(p.name for p in (out / "models").glob("*.pt")) == ["checkpoint_iteration=3.pt", "model.pt"]
    results = json.loads((out / "evaluation" / "fold_0" / "protocol_results.json").read_text())
    assert set(results["methods"]) == {"support-mask copy", "SD-FSMIS no-prior"}


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
