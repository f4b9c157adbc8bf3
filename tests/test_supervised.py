"""Supervised mode (SDSeg): the network against hand recomputation, the labelled-slice dataset on real CHAOS labels,
and the inferer without a support against a hand-run slice loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from monai_sdfsmis.data import VolumeStore, find_alpnet_volumes
from monai_sdfsmis.data.labelled_slices import LabelledSliceDataset
from monai_sdfsmis.engines.autoencoder import freeze_and_calibrate
from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.networks.autoencoder import build_autoencoder
from monai_sdfsmis.networks.supervised import SupervisedLatentSegmenter, build_supervised_segmenter
from monai_sdfsmis.transforms.augmentation import RPTAugmentd
from tests import hand_reference
from tests.utils import chaos_dir, requires_chaos

SIZE = 64
ORGANS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = build_autoencoder("tiny", sample_size=SIZE)
    return freeze_and_calibrate(model, torch.rand(8, 3, SIZE, SIZE) * 2 - 1)


@pytest.fixture(scope="module")
def net(vae):
    network = build_supervised_segmenter(vae, ORGANS, "tiny", seed=0)
    # A random UNet's output barely depends on its condition; spread the organ conditions so that it does.
    with torch.no_grad():
        network.organ_conditions.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return network.eval()


def _slices(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    label = torch.zeros(batch, 1, SIZE, SIZE)
    label[0, :, 10:30, 12:40] = 1
    label[1, :, 30:50, 20:28] = 1  # item 2 stays empty: a slice without the organ
    return image, label


class _UNetCalls:
    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[dict] = []
        self.handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs["sample"]
        condition = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append({"sample": sample.detach().clone(), "condition": condition.detach().clone(),
                           "output": out.detach().clone()})


# --------------------------------------------------------------------------------------------- network
def test_loss_and_segment_match_hand_recomputation(net):
    """SDSeg's latent fusion and the one-step x0 by hand: input [z_image, 0], x0 = -output, MSE to the mask latent."""
    image, label = _slices()
    index = torch.tensor([2, 0, 3])
    recorder = _UNetCalls(net.unet)
    try:
        loss = net.compute_loss(image, label, index)
        soft = net.segment(image[:1], net.organ_context(4))
    finally:
        recorder.handle.remove()
    train_call, segment_call = recorder.calls
    z_image = hand_reference.scaled_mean_latent(net.vae, image)
    z_mask = hand_reference.scaled_mean_latent(net.vae, hand_reference.mask_image(label))
    torch.testing.assert_close(train_call["sample"], torch.cat([z_image, torch.zeros_like(z_image)], dim=1))
    torch.testing.assert_close(train_call["condition"], net.organ_conditions.detach()[index])
    alpha_bar = hand_reference.one_step_alpha_bar(net.scheduler, net.config.timestep)
    x0 = hand_reference.v_prediction_x0(train_call["output"], train_call["sample"][:, :4], alpha_bar)
    torch.testing.assert_close(loss, F.mse_loss(x0, z_mask))
    assert float(F.mse_loss(z_mask, torch.zeros_like(z_mask))) > 0.05  # the target is not the trivial zero latent

    torch.testing.assert_close(segment_call["condition"], net.organ_conditions.detach()[3:4])  # organ label 4
    x0 = hand_reference.v_prediction_x0(segment_call["output"], z_image[:1], alpha_bar)
    hand_soft, _ = hand_reference.hand_decode(net.vae, x0)
    torch.testing.assert_close(soft, hand_soft)


def test_each_organ_has_its_own_condition(net):
    image, _ = _slices(batch=2)
    by_organ = [net.segment(image, net.organ_context(organ)) for organ in ORGANS]
    assert all((by_organ[0] - other).abs().max() > 1e-3 for other in by_organ[1:])
    with pytest.raises(ValueError, match=r"organ labels \[1, 2, 3, 4\]; it has none for 6"):
        net.organ_context(6)
    with pytest.raises(ValueError, match="organ_index must hold 3 positions"):
        net.compute_loss(*_slices(), torch.tensor([0, 1, 4]))


def test_training_step_moves_the_unet_and_the_organ_conditions(vae):
    network = build_supervised_segmenter(vae, ORGANS, "tiny", seed=0).train()
    optimizer = torch.optim.AdamW(network.parameter_groups(1e-3, 1e-3))
    before = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}
    image, label = _slices()
    index = torch.tensor([1, 1, 2])
    loss = network(image, label, index, mode="loss")
    loss.backward()
    optimizer.step()
    changed = {n for n, p in network.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert "organ_conditions" in changed and any(n.startswith("unet.") for n in changed)
    assert not any(n.startswith("vae.") for n, p in network.named_parameters() if p.requires_grad)
    # only the rows of the organs in the batch received a gradient
    grad = network.organ_conditions.grad.abs().flatten(1).sum(dim=1)
    assert grad[1] > 0 and grad[2] > 0 and grad[0] == 0 and grad[3] == 0
    network.vae.encoder.conv_in.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"outside the UNet and the new modules: \['vae\.encoder\.conv_in\."):
        network.parameter_groups()


def test_state_dict_and_diffusers_round_trip(net, vae, tmp_path):
    state = net.state_dict()
    assert not any(k.startswith("vae.") for k in state) and "organ_conditions" in state
    again = build_supervised_segmenter(vae, ORGANS, "tiny", seed=5)
    again.load_state_dict(state, strict=True)
    image, _ = _slices(batch=2)
    torch.testing.assert_close(again.eval().segment(image, again.organ_context(2)), net.segment(image, net.organ_context(2)))
    # the widened input convolution is a plain Conv2d recorded in the UNet's config: diffusers' own format keeps it
    net.unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.config.in_channels == 8 and loaded.conv_in.weight.shape[1] == 8
    torch.testing.assert_close(loaded.conv_in.weight, net.unet.conv_in.weight)


def test_bad_arguments(vae):
    with pytest.raises(ValueError, match="distinct label ids"):
        build_supervised_segmenter(vae, [1, 1], "tiny")
    network = build_supervised_segmenter(vae, ORGANS, "tiny", seed=0)
    with pytest.raises(ValueError, match="4-channel Conv2d"):
        SupervisedLatentSegmenter(vae, network.unet, ORGANS)  # its conv_in is already widened


# --------------------------------------------------------------------------------------------- inferer
def _hand_slice_loop(network, volume: torch.Tensor, organ: int, slices: list[int]) -> torch.Tensor:
    """Each listed slice through segment + binarize by hand, zero elsewhere (the volume is at the network's size)."""
    out = torch.zeros(volume.shape[1:])
    context = network.organ_context(organ)
    for z in slices:
        image = volume[:, :, :, z].expand(3, -1, -1)[None]
        out[:, :, z] = network.binarize(network.segment(image, context))[0, 0].float()
    return out


def test_inferer_without_support_matches_a_hand_slice_loop(net):
    g = torch.Generator().manual_seed(3)
    volume = torch.rand(1, SIZE, SIZE, 7, generator=g) * 2 - 1
    query_label = torch.zeros(1, 1, SIZE, SIZE, 7)
    query_label[..., 2:5] = 1
    inferer = SlidingSupportInferer(spatial_size=SIZE, sw_batch_size=2)
    for organ in (2, 4):
        out = inferer(volume[None], net, query_label=query_label, organ_id=organ)
        expected = _hand_slice_loop(net, volume, organ, [2, 3, 4])
        torch.testing.assert_close(out[0, 0], expected)
    # several organs: the label map of the separate calls (overlaps resolved by probability, as the few-shot path)
    both = inferer(volume[None], net, query_label=query_label.repeat(1, 2, 1, 1, 1), organ_id=[2, 4])
    separate = [inferer(volume[None], net, query_label=query_label, organ_id=o)[0, 0] for o in (2, 4)]
    only_one = (separate[0] > 0) ^ (separate[1] > 0)
    expected = torch.where(separate[0] > 0, 1.0, torch.where(separate[1] > 0, 2.0, 0.0))
    torch.testing.assert_close(both[0, 0][only_one], expected[only_one])
    assert torch.equal(both[0, 0] == 0, (separate[0] == 0) & (separate[1] == 0))
    # deployment mode: every slice once, then the longest run of slices with foreground
    whole = SlidingSupportInferer(spatial_size=SIZE, query_range="all")(volume[None], net, organ_id=2)
    every = _hand_slice_loop(net, volume, 2, list(range(7)))
    flags = every.flatten(0, 1).any(dim=0).tolist()
    from monai_sdfsmis.inferers.sliding_support import largest_run

    run = largest_run(flags)
    keep = torch.zeros(7, dtype=torch.bool)
    if run is not None:
        keep[run[0] : run[1]] = True
    torch.testing.assert_close(whole[0, 0], every * keep)
    with pytest.raises(ValueError, match="needs organ_id"):
        inferer(volume[None], net, query_label=query_label)


class _BrightPixels(torch.nn.Module):
    """A support-free network whose answer is known by hand: foreground where the slice is brighter than 0.5."""

    uses_support = False

    def organ_context(self, organ_id: int) -> torch.Tensor:
        return torch.tensor(float(organ_id))

    def segment(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.where(image[:, :1] > 0.5, 1.0, -1.0)

    def binarize(self, soft: torch.Tensor) -> torch.Tensor:
        return soft > 0


def test_deployment_mode_keeps_the_longest_run_of_a_support_free_network():
    volume = -torch.ones(1, 1, 16, 16, 9)
    volume[..., 4:8, 4:8, 1:4] = 1.0  # slices 1-3: the longest run
    volume[..., 2:5, 2:5, 6] = 1.0  # slice 6: a shorter run, dropped
    out = SlidingSupportInferer(spatial_size=16, query_range="all")(volume, _BrightPixels(), organ_id=1)
    expected = torch.zeros(16, 16, 9)
    expected[4:8, 4:8, 1:4] = 1.0
    torch.testing.assert_close(out[0, 0], expected)


# --------------------------------------------------------------------------------------------- dataset (real CHAOS)
@pytest.fixture(scope="module")
def store():
    if not (chaos_dir() / "image_1.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    records = find_alpnet_volumes(chaos_dir(), require_labels=True)[:4]
    s = VolumeStore(records, spatial_size=128)
    s.preload(kinds=("image", "label"), progress=False)
    return s


@requires_chaos
def test_labelled_slices_are_the_organ_masks_of_their_slices(store):
    ds = LabelledSliceDataset(store, ORGANS, length=60, foreground_fraction=0.75, seed=7)
    with_organ = 0
    for i in range(len(ds)):
        item = ds[i]
        label = np.asarray(store.label(item["volume_id"]))[:, :, item["slice"]]
        image = np.asarray(store.image(item["volume_id"]))[:, :, item["slice"]]
        assert item["organ_id"] == ORGANS[item["organ_index"]]
        np.testing.assert_array_equal(item["label"][0].numpy(), (label == item["organ_id"]).astype(np.float32))
        np.testing.assert_array_equal(item["image"].numpy(), np.repeat(image[None], 3, axis=0))
        with_organ += bool(item["label"].any())
    assert 0.6 * len(ds) <= with_organ < len(ds)  # 75 % drawn from organ slices, a few of the rest hit one by chance
    assert {ds[i]["organ_index"] for i in range(len(ds))} == {0, 1, 2, 3}
    again = LabelledSliceDataset(store, ORGANS, length=60, foreground_fraction=0.75, seed=7)
    assert all((again[i]["volume_id"], again[i]["slice"], again[i]["organ_id"]) ==
               (ds[i]["volume_id"], ds[i]["slice"], ds[i]["organ_id"]) for i in (0, 13, 59))


@requires_chaos
def test_labelled_slices_augmented_and_refusals(store):
    augment = RPTAugmentd(support_keys=("image", "label"), query_keys=("query_image", "query_label"),
                          allow_missing_keys=True, prob_gamma=1.0, prob_geometric=1.0)
    plain = LabelledSliceDataset(store, ORGANS, length=8, foreground_fraction=1.0, seed=3)
    moved = LabelledSliceDataset(store, ORGANS, length=8, foreground_fraction=1.0, seed=3, augment=augment)
    for i in range(8):
        a, b = plain[i], moved[i]
        assert (a["volume_id"], a["slice"]) == (b["volume_id"], b["slice"])
        assert not torch.equal(a["image"], b["image"]) and b["label"].any()
        assert set(torch.unique(b["label"]).tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="organ label 9 appears in none"):
        LabelledSliceDataset(store, [1, 9], length=4)
    with pytest.raises(ValueError, match="foreground_fraction"):
        LabelledSliceDataset(store, ORGANS, foreground_fraction=1.5)


# --------------------------------------------------------------------------------------------- the user's commands
def test_train_supervised_then_infer_without_a_support(tmp_path):
    """train --supervised writes a supervised model folder and the protocol table; infer then needs no support, writes
    the organs' label map on the query's grid, and refuses a support; a wrong organ is one line."""
    import json

    import nibabel as nib

    from monai_sdfsmis.data import make_phantom_dataset
    from tests.test_training_recipe import TINY, _cli

    phantoms = tmp_path / "phantoms"
    make_phantom_dataset(phantoms, n_volumes=6, shape=(64, 64, 12), seed=1)
    out = tmp_path / "run"
    proc = _cli("train", "--supervised", "--dataset_dir", str(phantoms), "--output_dir", str(out), "--holdout", "0",
                "1", "2", "--iterations", "3", "--set", *TINY, "organ_ids=[1,2,3,4]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "model" / "model_config.json").read_text())
    assert config["network_type"] == "supervised" and config["settings"]["organ_ids"] == [1, 2, 3, 4]
    assert config["unet"]["block_out_channels"] == [16, 32, 32, 32] and config["training"]["segmenter"]["iterations"] == 3
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"support-mask copy", "SDSeg supervised"}
    assert "--support" not in proc.stdout.strip().splitlines()[-1]

    masks = tmp_path / "masks"
    proc = _cli("infer", "--query", str(phantoms / "image_6.nii.gz"), "--model", str(out / "model"),
                "--organ_id", "1", "3", "--output_dir", str(masks))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = nib.load(str(masks / "image_6_seg.nii.gz"))
    query = nib.load(str(phantoms / "image_6.nii.gz"))
    assert written.shape == query.shape and np.allclose(written.affine, query.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 3}
    refused = _cli("infer", "--query", str(phantoms / "image_6.nii.gz"), "--model", str(out / "model"),
                   "--support", str(phantoms / "image_5.nii.gz"), "--support_label", str(phantoms / "label_5.nii.gz"),
                   "--organ_id", "1", "--output_dir", str(tmp_path / "other"))
    assert refused.returncode != 0 and "is a supervised model (trained on label maps): it segments without a support" \
        in refused.stderr.strip().splitlines()[-1]
    # the bundle's inference config: a supervised model folder takes no support by default
    import os
    import subprocess
    import sys

    from tests.test_training_recipe import BUNDLE, _env

    bundle_out = tmp_path / "bundle"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--model_dir", str(out / "model"), "--query_image", str(phantoms / "image_6.nii.gz"), "--organ_id", "3",
         "--output_dir", str(bundle_out), "--num_threads", "1"],
        cwd=BUNDLE, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    from_bundle = np.asarray(nib.load(str(bundle_out / "image_6_seg.nii.gz")).dataobj)
    from_cli = np.asarray(written.dataobj)
    single = _cli("infer", "--query", str(phantoms / "image_6.nii.gz"), "--model", str(out / "model"),
                  "--organ_id", "3", "--output_dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    np.testing.assert_array_equal(from_bundle, np.asarray(nib.load(str(tmp_path / "single" / "image_6_seg.nii.gz")).dataobj))
    # organ 3 alone claims at least every voxel that the two-organ label map gives it
    assert ((from_cli == 3) <= (from_bundle == 1)).all() and os.path.isfile(bundle_out / "image_6_seg.nii.gz")

    unknown = _cli("infer", "--query", str(phantoms / "image_6.nii.gz"), "--model", str(out / "model"),
                   "--organ_id", "7", "--output_dir", str(tmp_path / "other"))
    assert unknown.returncode != 0 and "has none for 7" in unknown.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
