"""No-prior mode: from-scratch SD-layout UNet, SDFSMIS without pretrained weights, and the protocol benchmark."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
from monai_sdfsmis.networks.autoencoder import build_autoencoder, save_autoencoder
from monai_sdfsmis.networks.no_prior import UNET_WIDTHS, build_no_prior_sdfsmis, build_no_prior_unet
from monai_sdfsmis.networks.sdfsmis import SDFSMIS
from tests.utils import REPO_ROOT, chaos_dir, requires_chaos

SIZE = 64  # small slices keep the CPU tests fast; the network is size-agnostic (multiples of 8)


@pytest.fixture(scope="module")
def vae():
    """A tiny stage-1 autoencoder, calibrated on random images (weights need not be trained here)."""
    torch.manual_seed(0)
    model = build_autoencoder("tiny", sample_size=SIZE)
    return freeze_and_calibrate(model, torch.rand(8, 3, SIZE, SIZE) * 2 - 1)


def _episode(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    label = torch.zeros(batch, 1, SIZE, SIZE)
    label[:, :, 16:40, 20:44] = 1
    return image, label, image.flip(-1), label.flip(-1)


# --------------------------------------------------------------------------------------------- UNet
def test_default_unet_has_sd_layout_and_reported_size():
    unet = build_no_prior_unet()
    assert list(unet.config.block_out_channels) == [128, 256, 256, 256]
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.in_channels == unet.config.out_channels == 4 and unet.conv_in.in_channels == 4
    # SD-1.5 has 16 transformer blocks (6 down, 1 mid, 9 up): SII gets one layer in each, as with SD.
    assert sum(isinstance(m, BasicTransformerBlock) for m in unet.modules()) == 16
    assert sum(p.numel() for p in unet.parameters()) == 52_064_900  # SD-1.5's UNet: 859.5 M
    assert sum(p.numel() for p in build_no_prior_unet("small").parameters()) == 34_966_724


def test_unet_forward_shape_and_argument_checks():
    unet = build_no_prior_unet("tiny")
    out = unet(torch.randn(2, 4, 8, 8), 999, encoder_hidden_states=torch.randn(2, 77, 32)).sample
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="Unknown UNet width"):
        build_no_prior_unet("giant")
    with pytest.raises(ValueError, match="must divide"):
        build_no_prior_unet((48, 64, 64, 64), norm_num_groups=32)
    with pytest.raises(ValueError, match="heads per level"):
        build_no_prior_unet((32, 64, 64, 64), attention_head_dim=3, norm_num_groups=8)
    with pytest.raises(ValueError, match="at least 2 levels"):
        build_no_prior_unet((64,))
    assert set(UNET_WIDTHS) >= {"default", "small", "tiny", "wide"}


def test_light_autoencoder_is_small_with_one_resnet_block_per_level():
    """``light`` (RESULTS.md section 19): ``small``'s channels and latent, one ResNet block per encoder level where
    ``small`` has two (decoder: two where ``small`` has three); counted from the diffusers modules, not the table."""
    small, light = build_autoencoder("small", sample_size=64), build_autoencoder("light", sample_size=64)
    assert [b.resnets[0].conv1.out_channels for b in light.encoder.down_blocks] == [32, 64, 128, 128]
    assert [len(b.resnets) for b in small.encoder.down_blocks] == [2, 2, 2, 2]
    assert [len(b.resnets) for b in light.encoder.down_blocks] == [1, 1, 1, 1]
    assert [len(b.resnets) for b in light.decoder.up_blocks] == [2, 2, 2, 2]
    x = torch.randn(1, 3, 64, 64)
    assert light.encode(x).latent_dist.mean.shape == small.encode(x).latent_dist.mean.shape == (1, 4, 8, 8)
    n_small = sum(p.numel() for p in small.parameters())
    assert sum(p.numel() for p in light.parameters()) < 0.8 * n_small


# --------------------------------------------------------------------------------------------- SDFSMIS
def test_no_prior_sdfsmis_trains_the_learned_condition(vae):
    net = build_no_prior_sdfsmis(vae, "tiny", seed=0)
    assert isinstance(net, SDFSMIS)
    assert net.vtct is not None and net.vtct.image_encoder is None  # VTCT falls back to a learned condition
    assert net.settings["image_encoder"] is False and net.empty_prompt_embedding is None
    assert net.vae is vae and net.vae.config.scaling_factor == vae.config.scaling_factor != 1.0
    assert net.unet.conv_in.query.in_channels == 8  # SDFSMIS did the 8-channel surgery on the 4-channel UNet

    loss = net.compute_loss(*_episode())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grad = net.vtct.learned_condition.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in net.vae.parameters())
    unet_grads = [p.grad for p in net.unet.parameters() if p.requires_grad]
    assert all(g is not None for g in unet_grads) and sum(g.abs().sum() for g in unet_grads) > 0
    assert not any(k.startswith("vae.") for k in net.state_dict())

    # Inference interface on the same network.
    net.eval()
    s_img, s_lbl, q_img, _ = _episode(batch=1)
    soft = net.segment(torch.cat([q_img, q_img]), net.encode_support(s_img, s_lbl))
    assert soft.shape == (2, 1, SIZE, SIZE) and soft.min() >= -1 and soft.max() <= 1
    assert net.binarize(soft).dtype == torch.bool


def _distinct_episode(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random images; support and query masks are different rectangles (``_episode``'s flipped mask is its own
    mirror image, so it cannot tell a query-mask target from a support-mask one)."""
    g = torch.Generator().manual_seed(seed)
    support, query = (torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1 for _ in range(2))
    support_label, query_label = torch.zeros(batch, 1, SIZE, SIZE), torch.zeros(batch, 1, SIZE, SIZE)
    support_label[:, :, 8:24, 10:30] = 1
    query_label[:, :, 28:60, 24:56] = 1
    return support, support_label, query, query_label


def test_no_prior_loss_and_segment_match_hand_recomputation(vae):
    """Eq. 5 and the decoder by hand on the no-prior network (learned condition, data-derived scaling factor,
    posterior means in training by default)."""
    from tests import hand_reference

    net = build_no_prior_sdfsmis(vae, "tiny", seed=0).train()
    assert net.config.vae_sample_in_training is False and vae.config.scaling_factor != 0.18215
    episode = _distinct_episode()
    with hand_reference.record_unet(net) as calls:
        loss = net.compute_loss(*episode)
    result = hand_reference.hand_loss_check(net, *episode, loss, calls)
    assert result["target_vs_support"] > 0.1 and result["target_error"] < 1e-5, result

    net.eval()
    si, sl, qi, _ = episode
    ctx = net.encode_support(si[:1], sl[:1])
    with hand_reference.record_unet(net) as calls:
        soft = net.segment(qi, ctx)
    z_qi = hand_reference.scaled_mean_latent(net.vae, qi)
    x0 = hand_reference.v_prediction_x0(calls.only("query").output, z_qi, 0.0)
    hand_soft, decoded = hand_reference.hand_decode(net.vae, x0)
    torch.testing.assert_close(soft, hand_soft)
    assert torch.equal(net.binarize(soft), hand_soft > 0)
    assert (decoded[:, :1] - hand_soft).abs().mean() > 0.01  # the three decoded channels differ


def test_no_prior_sdfsmis_options(vae, tmp_path):
    a = build_no_prior_sdfsmis(vae, "tiny", seed=3)
    b = build_no_prior_sdfsmis(vae, "tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Without VTCT (or with an "empty" support condition) the constant prompt is zeros: there is no text encoder.
    plain = build_no_prior_sdfsmis(vae, "tiny", use_vtct=False, use_qe=False, sii_mode="kv_concat")
    assert plain.vtct is None and torch.count_nonzero(plain.empty_prompt_embedding) == 0
    assert plain.empty_prompt_embedding.shape == (1, 77, 32)
    plain.compute_loss(*_episode()).backward()

    # From a saved folder (what stage 2 of a bundle does); an uncalibrated folder is refused.
    folder = save_autoencoder(vae, tmp_path / "ae")
    from_folder = build_no_prior_sdfsmis(folder, "tiny")
    assert from_folder.vae.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    save_autoencoder(build_autoencoder("tiny"), tmp_path / "raw")
    with pytest.raises(ValueError, match="scaling factor"):
        build_no_prior_sdfsmis(tmp_path / "raw", "tiny")
    with pytest.raises(ValueError, match="image_encoder"):
        build_no_prior_sdfsmis(vae, "tiny", image_encoder=torch.nn.Identity())
    with pytest.raises(ValueError, match="AutoencoderKL or a folder"):
        build_no_prior_sdfsmis(42, "tiny")


# ------------------------------------------------------------------------------------------ learning, measured in Dice
def _pooled_dice(net: SDFSMIS, episodes: list[dict], support_shift: int = 0) -> tuple[float, float]:
    """(Dice pooled over the episodes, predicted / true foreground area) of ``binarize(segment(query))``.

    Query ``i`` is segmented with the support of episode ``(i + support_shift) % n`` (0: its own support).
    """
    net.eval()
    tp = predicted = truth = 0.0
    with torch.no_grad():
        for i, episode in enumerate(episodes):
            support = episodes[(i + support_shift) % len(episodes)]
            ctx = net.encode_support(support["support_image"][None], support["support_label"][None])
            mask = net.binarize(net.segment(episode["query_image"][None], ctx))[0].float()
            label = episode["query_label"]
            tp += float((mask * label).sum())
            predicted += float(mask.sum())
            truth += float(label.sum())
    return 2 * tp / (predicted + truth), predicted / truth


def _train_no_prior_on_phantoms(tmp_path, seed: int = 0) -> dict[str, float]:
    """Both stages of the no-prior mode at CI size on 3 phantoms; Dice on 24 episodes of a 4th one.

    Stage 1: the tiny autoencoder, 400 iterations of 8 slices (90 % supervoxel masks), then frozen and calibrated.
    Stage 2: the tiny no-prior SD-FSMIS, 120 EpisodeTrainer iterations of 8 supervoxel episodes with a LatentCache.
    """
    from monai.data import DataLoader

    from monai_sdfsmis.data.episodes import EpisodeDataset
    from monai_sdfsmis.data.phantoms import make_phantom_dataset
    from monai_sdfsmis.data.slices import SliceDataset, holdout_slices
    from monai_sdfsmis.data.volumes import VolumeStore
    from monai_sdfsmis.engines.autoencoder import build_autoencoder_trainer
    from monai_sdfsmis.engines.trainer import EpisodeTrainer
    from monai_sdfsmis.networks.autoencoder import reconstruction_metrics
    from monai_sdfsmis.networks.latent_cache import LatentCache

    start = time.process_time()
    store = VolumeStore(make_phantom_dataset(tmp_path / "phantoms", n_volumes=4, shape=(48, 48, 12), seed=0),
                        spatial_size=SIZE)
    train_ids, test_ids = ["1", "2", "3"], ["4"]

    # Stage 1. A constant learning rate: at 64 px the supervoxel masks are small, and with cosine decay, or a constant
    # lr <= 3e-3 for 100-200 iterations, the tiny autoencoder still decoded (nearly) every mask as empty (mask Dice
    # 0.00-0.10, measured on the earlier CI machine).
    # 5e-3 for 200 iterations sat on a knife edge: 0.72-0.80 on one CPU, 0.00 for seed 0 on another (AMD EPYC,
    # 2026-12-07). 2e-3 for 400 iterations gave 0.81-0.84 for seeds 0-5 there; 300 iterations, 0.69 for seed 0.
    torch.manual_seed(seed)
    vae = build_autoencoder("tiny", sample_size=SIZE)
    ae_iters, ae_batch = 400, 8
    slices = SliceDataset(store, train_ids, mask_fraction=0.9, length=ae_iters * ae_batch, seed=seed)
    trainer, _ = build_autoencoder_trainer(vae, DataLoader(slices, batch_size=ae_batch), lr=2e-3, schedule="constant",
                                           max_iterations=ae_iters, warmup_iterations=10, progress=False)
    trainer.run()
    held_out = holdout_slices(store, test_ids, num_slices=16, seed=0)
    ae_mask_dice = reconstruction_metrics(vae, masks=held_out["masks"])["mask_dice"]
    calibration = torch.stack([SliceDataset(store, train_ids, length=64, seed=1)[i]["image"] for i in range(64)])
    freeze_and_calibrate(vae, calibration)
    stage1 = time.process_time() - start

    # Stage 2.
    net = build_no_prior_sdfsmis(vae, "tiny", seed=seed)
    test_set = EpisodeDataset(store, test_ids, length=24, seed=123, min_size=20)
    test_episodes = [test_set[i] for i in range(len(test_set))]
    untrained, _ = _pooled_dice(net, test_episodes)
    seg_iters, seg_batch = 120, 8
    episodes = EpisodeDataset(store, train_ids, length=seg_iters * seg_batch, seed=seed, min_size=20)
    cache = LatentCache()
    optimizer = torch.optim.AdamW(net.parameter_groups(lr_unet=2e-3, lr_new=2e-3))
    EpisodeTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(episodes, batch_size=seg_batch),
                   network=net, optimizer=optimizer, latent_cache=cache).run()
    trained, area = _pooled_dice(net, test_episodes)
    shuffled, _ = _pooled_dice(net, test_episodes, support_shift=7)
    copy = 2 * sum(float((e["support_label"] * e["query_label"]).sum()) for e in test_episodes) / sum(
        float(e["support_label"].sum() + e["query_label"].sum()) for e in test_episodes)
    return {"ae_mask_dice": ae_mask_dice, "untrained": untrained, "trained": trained, "area_ratio": area,
            "shuffled": shuffled, "support_copy": copy, "hit_rate": cache.hit_rate, "cpu_stage1_s": stage1,
            "cpu_total_s": time.process_time() - start}


def test_no_prior_pipeline_learns_to_segment_held_out_phantoms(tmp_path):
    """Learning judged by Dice, not by the loss: the trained network segments episodes of an unseen phantom.

    Measured on the 2-core AMD EPYC sandbox (1 thread, 2026-12-07), seeds 0 / 1 / 2 / 3 of
    ``_train_no_prior_on_phantoms``: autoencoder mask Dice 0.83 / 0.84 / 0.84 / 0.83; segmenter Dice untrained
    0.00 / 0.01 / 0.10 / 0.00, trained 0.56 / 0.52 / 0.54 / 0.65, the trained network with shuffled supports
    0.17 / 0.18 / 0.15 / 0.17 (copying the adjacent slice's support mask: 0.77); 80-100 s of CPU each, two runs
    side by side. The earlier stage 1 (5e-3, 200 iterations) decoded every mask of seed 0 as empty on this CPU
    (0.00) and at 0.72 on the earlier CI machine: that knife edge, not the segmenter, failed CI.
    """
    r = _train_no_prior_on_phantoms(tmp_path, seed=0)
    print("\nno-prior phantoms, Dice on a held-out phantom: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    assert r["ae_mask_dice"] > 0.5  # stage 1 decodes masks (the premise of any Dice in stage 2)
    assert r["trained"] > 0.3 and r["trained"] > r["untrained"] + 0.2
    assert r["trained"] > r["shuffled"] + 0.15  # the prediction follows the support, not only the query image
    assert r["hit_rate"] > 0.8  # stage 2 ran on the LatentCache (un-augmented episodes repeat their slices)


# --------------------------------------------------------------------------------------------- benchmark
def _load_benchmark(name: str = "no_prior_protocol"):
    path = REPO_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_chaos
def test_autoencoder_curve_reports_held_out_quality_at_each_measurement():
    curve = _load_benchmark("autoencoder_curve").main(
        ["--dataset_dir", str(chaos_dir()), "--width", "tiny", "--spatial_size", "32", "--batch", "2", "--iters", "3",
         "--every", "2", "--holdout_slices", "4"]
    )
    assert [point["it"] for point in curve] == [2, 3]
    for point in curve:
        assert 0 <= point["organ_dice"] <= 100 and 0 <= point["sv_dice"] <= 100 and point["psnr"] > 0


def test_flop_count_grows_with_the_autoencoder_width():
    rows = _load_benchmark("no_prior_flops").main(["--size", "32", "--unet_width", "tiny", "--widths", "tiny", "small"])
    tiny, small = rows
    assert small["parameters"] > tiny["parameters"]
    for key in ("stage1_step", "encoding", "episode"):
        assert small[key] > tiny[key] > 0
    assert tiny["episode"] > 4 * tiny["encoding"]  # four frozen encodings plus the UNet passes
