"""Stage 1 of the no-prior mode: SD-layout autoencoder, its slice data, training engine, calibration and saving."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader

from monai_sdfsmis.data.layouts import VolumeRecord, find_alpnet_volumes
from monai_sdfsmis.data.slices import SliceDataset, holdout_slices, split_holdout
from monai_sdfsmis.data.volumes import VolumeStore
from monai_sdfsmis.engines.autoencoder import (
    AutoencoderTrainingStep,
    build_autoencoder_trainer,
    freeze_and_calibrate,
)
from monai_sdfsmis.networks.autoencoder import (
    CALIBRATION_FILE,
    autoencoder_loss,
    build_autoencoder,
    estimate_scaling_factor,
    load_autoencoder,
    reconstruction_metrics,
    save_autoencoder,
)
from tests.utils import chaos_dir

# Small in-plane size for CPU speed: real CHAOS slices, resized by the VolumeStore.
SIZE = 64


class _NoLabelStore(VolumeStore):
    """A store that fails loudly if anything asks for ground truth."""

    def label(self, volume_id: str) -> np.ndarray:  # pragma: no cover - must never run
        raise AssertionError("SliceDataset read a ground-truth label map")


@pytest.fixture(scope="module")
def store():
    """Three CHAOS volumes whose records have **no label files** (labels must never be needed)."""
    if not (chaos_dir() / "image_1.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    records = [
        VolumeRecord(id=r.id, image=r.image, label=None, supervoxel=r.supervoxel)
        for r in find_alpnet_volumes(chaos_dir(), require_supervoxels=True)[:3]
    ]
    return _NoLabelStore(records, spatial_size=SIZE)


@pytest.fixture()
def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder("tiny", sample_size=SIZE)


# --------------------------------------------------------------------------------------------- network
def test_build_autoencoder_shapes_and_sd_layout():
    vae = build_autoencoder("tiny")
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D"] * 4
    assert list(vae.config.up_block_types) == ["UpDecoderBlock2D"] * 4
    assert vae.config.scaling_factor == 1.0  # not calibrated yet
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert posterior.mean.shape == (1, 4, 32, 32)  # 8x downsampling, 4 latent channels
        assert vae.decode(posterior.mean).sample.shape == (1, 3, 256, 256)


def test_default_width_parameter_counts():
    # SD-1.5's VAE is 83.7 M; the default is its layout at half width.
    assert sum(p.numel() for p in build_autoencoder().parameters()) == 20_945_575
    assert list(build_autoencoder().config.block_out_channels) == [64, 128, 256, 256]
    assert sum(p.numel() for p in build_autoencoder("small").parameters()) == 5_252_487
    assert sum(p.numel() for p in build_autoencoder("tiny").parameters()) == 81_215


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_out_channels": (64, 128, 256)}, "4 entries"),
        ({"block_out_channels": (64, 128, 256, 250)}, "must divide"),
        ({"block_out_channels": "huge"}, "Unknown autoencoder width"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"block_out_channels": (0, 32, 32, 32)}, "positive"),
        ({"sample_size": 100}, "multiple of 8"),
    ],
)
def test_build_autoencoder_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_autoencoder(**kwargs)


def test_autoencoder_loss_parts_and_input_checks(tiny_vae):
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    loss, parts = autoencoder_loss(tiny_vae, images, kl_weight=1e-3, sample_posterior=False)
    assert loss.ndim == 0 and loss.requires_grad
    assert torch.isclose(loss.detach(), parts["l1"] + 1e-3 * parts["kl"])
    assert parts["recon"].shape == images.shape
    assert parts["kl"] > 0
    with pytest.raises(ValueError, match="3 channels"):
        autoencoder_loss(tiny_vae, images[:, :1])
    with pytest.raises(ValueError, match="multiples of 8"):
        autoencoder_loss(tiny_vae, images[..., :60])
    with pytest.raises(ValueError, match="kl_weight"):
        autoencoder_loss(tiny_vae, images, kl_weight=-1.0)


# --------------------------------------------------------------------------------------------- data
def test_slice_dataset_items_never_use_ground_truth(store):
    ds = SliceDataset(store, ["1", "2"], mask_fraction=0.5, length=60, seed=3)
    n_masks = 0
    for i in range(len(ds)):
        item = ds[i]
        image = item["image"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        assert image.min() >= -1 and image.max() <= 1
        if item["is_mask"]:
            n_masks += 1
            assert set(torch.unique(image).tolist()) <= {-1.0, 1.0}
            # The mask is exactly one supervoxel's cross-section in that slice.
            sv = store.supervoxels(item["volume_id"])[:, :, item["slice"]]
            ids = np.unique(sv[image[0].numpy() > 0])
            assert len(ids) == 1 and ids[0] != 0
            np.testing.assert_array_equal(sv == ids[0], image[0].numpy() > 0)
            assert (sv == ids[0]).sum() >= ds.min_mask_pixels
        else:
            expected = store.image(item["volume_id"])[:, :, item["slice"]]
            np.testing.assert_array_equal(image[0].numpy(), expected)
    assert 15 <= n_masks <= 45  # about half
    # Seeded items are reproducible; another epoch gives other items.
    assert torch.equal(ds[7]["image"], SliceDataset(store, ["1", "2"], length=60, seed=3)[7]["image"])
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["image"], SliceDataset(store, ["1", "2"], length=60, seed=3)[i]["image"])
               for i in range(5))


def test_slice_dataset_options_and_errors(store, tmp_path):
    images_only = SliceDataset(store, ["3"], include_masks=False, seed=0)
    assert len(images_only) == images_only.num_slices == store.image("3").shape[-1]
    assert not any(bool(images_only[i]["is_mask"]) for i in range(10))
    batch = next(iter(DataLoader(SliceDataset(store, ["1"], length=4, seed=0), batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="mask_fraction"):
        SliceDataset(store, ["1"], mask_fraction=1.0)
    with pytest.raises(ValueError, match="Unknown volume id"):
        SliceDataset(store, ["nope"])
    no_sv = VolumeStore([VolumeRecord(id="1", image=store.record("1").image)], spatial_size=SIZE)
    with pytest.raises(ValueError, match="no supervoxel file"):
        SliceDataset(no_sv)
    assert len(SliceDataset(no_sv, include_masks=False)) > 0
    with pytest.raises(IndexError):
        SliceDataset(store, ["1"], length=2, seed=0)[2]


def test_holdout_helpers(store):
    train, held = split_holdout(["a", "b", "c", "d", "e"], fraction=0.2, seed=1)
    assert len(held) == 1 and sorted(train + held) == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(["a"])
    sample = holdout_slices(store, ["3"], num_slices=6, num_masks=5, seed=0)
    assert sample["images"].shape == (6, 3, SIZE, SIZE)
    assert sample["masks"].shape == (5, 1, SIZE, SIZE)
    assert set(torch.unique(sample["masks"]).tolist()) <= {0.0, 1.0}
    assert all(m.sum() > 0 for m in sample["masks"])


# --------------------------------------------------------------------------------------------- training
def test_autoencoder_learns_on_chaos_slices_with_monai_trainer(store, tiny_vae):
    """50 SupervisedTrainer iterations (AutoencoderTrainingStep) on real slices + supervoxel masks: L1 drops."""
    ds = SliceDataset(store, ["1", "2"], length=50 * 4, seed=0)
    trainer, budget = build_autoencoder_trainer(
        tiny_vae, DataLoader(ds, batch_size=4), lr=1e-3, max_iterations=50, warmup_iterations=5, progress=False
    )
    l1 = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: l1.append(float(e.state.output["l1"])))
    trainer.run()
    assert budget.iterations == 50 == len(l1)
    first, last = np.mean(l1[:10]), np.mean(l1[-10:])
    assert last < 0.7 * first, (first, last)

    # Freeze + calibrate on the training data: latents then have unit std there.
    calib = torch.stack([SliceDataset(store, ["1", "2"], length=32, seed=1)[i]["image"] for i in range(32)])
    freeze_and_calibrate(tiny_vae, DataLoader([{"image": calib[i]} for i in range(32)], batch_size=8))
    assert not any(p.requires_grad for p in tiny_vae.parameters()) and not tiny_vae.training
    factor = tiny_vae.config.scaling_factor
    assert factor != 1.0 and tiny_vae.sdfsmis_calibration["scaling_factor"] == factor
    with torch.no_grad():
        latents = tiny_vae.encode(calib).latent_dist.mean * factor
    assert latents.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # The same factor from a tensor as from a loader of dicts; max_batches limits the data used.
    assert estimate_scaling_factor(tiny_vae, calib, batch_size=8) == pytest.approx(factor, rel=1e-5)
    assert estimate_scaling_factor(tiny_vae, calib, max_batches=1, batch_size=8) == pytest.approx(
        estimate_scaling_factor(tiny_vae, calib[:8]), rel=1e-6
    )

    held = holdout_slices(store, ["3"], num_slices=4, seed=0)
    metrics = reconstruction_metrics(tiny_vae, held["images"], held["masks"])
    with torch.no_grad():
        recon = tiny_vae.decode(tiny_vae.encode(held["images"]).latent_dist.mean).sample.clamp(-1, 1)
    mse = (recon - held["images"]).square().flatten(1).mean(1)
    assert metrics["image_psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-4)
    assert 0.0 <= metrics["mask_dice"] <= 1.0 and math.isfinite(metrics["mask_psnr"])
    assert metrics["num_images"] == 4 and metrics["num_masks"] == 4


def test_reconstruction_metrics_checks_inputs(tiny_vae):
    with pytest.raises(ValueError, match="needs images"):
        reconstruction_metrics(tiny_vae)
    with pytest.raises(ValueError, match="binary"):
        reconstruction_metrics(tiny_vae, masks=torch.full((1, 1, SIZE, SIZE), 0.5))
    with pytest.raises(ValueError, match="1 channels"):
        reconstruction_metrics(tiny_vae, masks=torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="no images"):
        estimate_scaling_factor(tiny_vae, [])


class _ScaledCopy(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction is ``scale * input``: every metric is known by hand."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"in_channels": 3})()

    def encode(self, x):
        return type("Encoded", (), {"latent_dist": type("Posterior", (), {"mean": x})()})()

    def decode(self, z):
        return type("Decoded", (), {"sample": self.scale * z})()


def test_reconstruction_metrics_match_a_hand_computation(tiny_vae):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    masks = torch.zeros(5, 1, 16, 16)
    masks[1, :, 2:9, 3:12] = 1
    masks[3, :, 5:6, 5:15] = 1  # slices 0, 2 and 4 are empty
    # Halved reconstruction: MSE = mean(x^2) / 4 per slice; PSNR = 10 log10(2^2 / MSE); masks keep their sign.
    half = reconstruction_metrics(_ScaledCopy(0.5), images, masks, batch_size=2)
    mse = images.square().flatten(1).mean(1) / 4
    assert half["image_mse"] == pytest.approx(float(mse.mean()), rel=1e-6)
    assert half["image_psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-6)
    assert half["mask_mse"] == pytest.approx(0.25) and half["mask_psnr"] == pytest.approx(10 * math.log10(16))
    assert half["mask_dice"] == pytest.approx(1.0) and half["num_images"] == half["num_masks"] == 5
    # Exact reconstruction: PSNR capped at 100 dB; all-empty masks decoded empty have Dice 1.
    exact = reconstruction_metrics(_ScaledCopy(1.0), images, torch.zeros(2, 1, 16, 16))
    assert exact["image_psnr"] == 100.0 and exact["mask_psnr"] == 100.0 and exact["mask_dice"] == 1.0
    # Negated masks: background decoded as foreground and the reverse, Dice pooled over the slices is 0.
    assert reconstruction_metrics(_ScaledCopy(-1.0), masks=masks)["mask_dice"] == 0.0

    # A real (untrained) autoencoder: the decoded masks binarised by channel mean > 0, Dice pooled over slices.
    torch.manual_seed(1)
    masks = (torch.rand(6, 1, SIZE, SIZE) > 0.5).float()
    metrics = reconstruction_metrics(tiny_vae, masks=masks, batch_size=4)
    with torch.no_grad():
        target = (masks * 2 - 1).expand(-1, 3, -1, -1)
        recon = tiny_vae.decode(tiny_vae.encode(target).latent_dist.mean).sample.clamp(-1, 1)
    predicted, truth = recon.mean(dim=1, keepdim=True) > 0, masks > 0.5
    dice = 2 * (predicted & truth).sum().item() / (predicted.sum().item() + truth.sum().item())
    assert metrics["mask_dice"] == pytest.approx(dice, rel=1e-5)
    assert metrics["mask_mse"] == pytest.approx(float((recon - target).square().mean()), rel=1e-5)


def test_training_step_rejects_non_finite_loss(tiny_vae):
    def engine() -> Engine:
        e = Engine(AutoencoderTrainingStep())
        e.network = tiny_vae
        e.optimizer = torch.optim.AdamW(tiny_vae.parameters(), lr=1e-3)
        return e

    bad = torch.full((1, 3, SIZE, SIZE), float("nan"))
    with pytest.raises(FloatingPointError, match="nan"):
        engine().run([{"image": bad}], max_epochs=1)
    with pytest.raises(ValueError, match="must hold 'image'"):
        engine().run([{"img": bad}], max_epochs=1)
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderTrainingStep(kl_weight=-1)


# --------------------------------------------------------------------------------------------- saving
def test_save_load_round_trip_is_identical_and_atomic(tiny_vae, tmp_path):
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    freeze_and_calibrate(tiny_vae, images)
    folder = save_autoencoder(tiny_vae, tmp_path / "ae", metadata={"fold": 0})
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    record = json.loads((folder / CALIBRATION_FILE).read_text())
    assert record["calibrated"] and record["metadata"] == {"fold": 0}

    loaded = load_autoencoder(folder)
    plain = AutoencoderKL.from_pretrained(folder)  # stage 2 can load it without this package
    assert loaded.config.scaling_factor == plain.config.scaling_factor == tiny_vae.config.scaling_factor
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        expected = tiny_vae.decode(tiny_vae.encode(images).latent_dist.mean).sample
        assert torch.equal(loaded.decode(loaded.encode(images).latent_dist.mean).sample, expected)

    # Saving again replaces the folder and leaves no temporary folders behind.
    tiny_vae.register_to_config(scaling_factor=0.5)
    tiny_vae.sdfsmis_calibration["scaling_factor"] = 0.5
    save_autoencoder(tiny_vae, folder)
    assert load_autoencoder(folder).config.scaling_factor == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_load_autoencoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(tmp_path / "empty")
    uncalibrated = build_autoencoder("tiny")
    save_autoencoder(uncalibrated, tmp_path / "raw")
    with pytest.raises(ValueError, match="scaling factor"):
        load_autoencoder(tmp_path / "raw")
    assert load_autoencoder(tmp_path / "raw", require_calibration=False).config.scaling_factor == 1.0
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a file of that name"):
        save_autoencoder(uncalibrated, tmp_path / "a_file")
