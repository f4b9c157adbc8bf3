from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Affine
from scipy import ndimage

from monai_sdfsmis.transforms import (
    RandRPTAffined,
    RandRPTElasticd,
    ReplicateChanneld,
    RPTAugmentd,
    ScaleToUnitRanged,
    load_volume,
    rpt_affine_matrix,
    rpt_elastic_displacement,
)
from monai_sdfsmis.transforms.augmentation import _sampling_grid
from tests.utils import chaos_dir, requires_chaos

KEYS = ("support_image", "support_label", "query_image", "query_label")


def _disk(h=96, w=96, centre=(40, 55), radius=18) -> torch.Tensor:
    yy, xx = np.mgrid[:h, :w]
    return torch.from_numpy(((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2).astype(np.float32))[None]


def _slice_pair(seed=0, h=96, w=96):
    mask = _disk(h, w)
    noise = torch.from_numpy(np.random.default_rng(seed).uniform(-0.1, 0.1, (3, h, w)).astype(np.float32))
    image = mask.repeat(3, 1, 1) * 1.2 - 0.8 + noise  # organ bright, background dark, in [-1, 1]
    return image, mask


def _episode(seed=0):
    s_img, s_lab = _slice_pair(seed)
    q_img, q_lab = _slice_pair(seed + 1)
    return {"support_image": s_img, "support_label": s_lab, "query_image": q_img, "query_label": q_lab}


def _changed(a, b) -> bool:
    return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# ---------------------------------------------------------------- gamma


def _gamma_curve(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """RPT's gamma curve written out without its 1e-5 offset (which moves only the darkest pixels, by < 5e-3)."""
    m = float(x.min())
    r = float(x.max()) - m
    return r * ((x - m) / r) ** gamma + m


def test_episode_gamma_follows_rpts_curve_on_images_only_one_gamma_per_side():
    episode = _episode(4)
    t = RPTAugmentd(prob_gamma=1.0, prob_geometric=0.0).set_random_state(3)
    out = t(episode)
    for side in ("support", "query"):
        gamma = float(t.sides[side]["gamma"].adjuster.gamma_value)
        assert 0.5 <= gamma <= 1.5 and abs(gamma - 1.0) > 1e-3
        image = torch.as_tensor(episode[f"{side}_image"])
        torch.testing.assert_close(torch.as_tensor(out[f"{side}_image"]), _gamma_curve(image, gamma), atol=1e-5,
                                   rtol=0)
        assert type(out[f"{side}_image"]) is type(episode[f"{side}_image"])  # no MetaTensor from MONAI's transform
        assert float(out[f"{side}_image"].min()) == pytest.approx(float(image.min()), abs=1e-6)
        assert float(out[f"{side}_image"].max()) == pytest.approx(float(image.max()), abs=1e-6)
        assert torch.equal(torch.as_tensor(out[f"{side}_label"]), torch.as_tensor(episode[f"{side}_label"]))
    assert t.sides["support"]["gamma"].adjuster.gamma_value != t.sides["query"]["gamma"].adjuster.gamma_value
    with pytest.raises(ValueError, match="gamma_range must satisfy 0 < low <= high"):
        RPTAugmentd(gamma_range=(0.0, 1.0))


# ---------------------------------------------------------------- affine


def test_rpt_affine_matrix_semantics():
    np.testing.assert_allclose(rpt_affine_matrix(), np.eye(3))
    # output = Zoom @ Shear @ Translate @ Rotate @ input, in centred (row, col) pixels
    p = np.array([-10.0, 0.0, 1.0])  # 10 px above the centre
    np.testing.assert_allclose(rpt_affine_matrix(rotate_deg=90) @ p, [0.0, -10.0, 1.0], atol=1e-12)  # -> left
    np.testing.assert_allclose(rpt_affine_matrix(translate_px=(3, -2)) @ p, [-7.0, -2.0, 1.0])
    np.testing.assert_allclose(rpt_affine_matrix(zoom=1.2) @ p, [-12.0, 0.0, 1.0])
    a = np.deg2rad(5)
    np.testing.assert_allclose(rpt_affine_matrix(shear_deg=5) @ p, [-10 * np.cos(a), 10 * np.sin(a), 1.0])
    m = rpt_affine_matrix(4, (1, 2), -3, 1.1)
    expected = rpt_affine_matrix(zoom=1.1) @ rpt_affine_matrix(shear_deg=-3) @ rpt_affine_matrix(
        translate_px=(1, 2)
    ) @ rpt_affine_matrix(rotate_deg=4)
    np.testing.assert_allclose(m, expected)


@pytest.mark.parametrize("params", [(5, (3, -4), 2, 1.1), (90, (0, 0), 0, 1.0), (-4, (1, 2), -5, 0.9)])
def test_sampling_grid_matches_monai_affine(params):
    x = torch.rand(2, 40, 56)
    inverse = np.linalg.inv(rpt_affine_matrix(*params))
    ref = Affine(affine=torch.as_tensor(inverse), image_only=True)(x, mode="bilinear", padding_mode="zeros")
    ours = F.grid_sample(x[None], _sampling_grid(inverse, (40, 56)), padding_mode="zeros", align_corners=False)[0]
    torch.testing.assert_close(ours, torch.as_tensor(ref), atol=1e-4, rtol=0)


def test_affine_moves_image_and_mask_together():
    image, mask = _slice_pair()
    image[0] = mask[0]  # channel 0 is the mask itself: after warping, rounding it must give the warped mask
    t = RandRPTAffined(["image", "label"], prob=1.0, rotate_deg=20, translate_px=8, shear_deg=10, zoom=(0.8, 1.3))
    for seed in range(5):
        out = t.set_random_state(seed)({"image": image, "label": mask})
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
        assert _changed(out["label"], mask)
        torch.testing.assert_close(torch.floor(out["image"][0] + 0.5), out["label"][0])
        assert out["image"].dtype == torch.float32 and bool(torch.isfinite(out["image"]).all())


def test_affine_translation_moves_mask_centroid():
    _, mask = _slice_pair()
    t = RandRPTAffined("label", prob=1.0, rotate_deg=0, translate_px=(6, 0), shear_deg=0, zoom=(1, 1))
    out = t.set_random_state(0)({"label": mask})
    shift = t.matrix[0, 2]
    before, after = ndimage.center_of_mass(mask[0].numpy()), ndimage.center_of_mass(out["label"][0].numpy())
    assert abs(after[0] - before[0] - shift) < 0.6 and abs(after[1] - before[1]) < 0.1


def test_affine_identity_parameters_leave_data_unchanged():
    image, mask = _slice_pair()
    t = RandRPTAffined(["image", "label"], prob=1.0, rotate_deg=0, translate_px=0, shear_deg=0, zoom=(1, 1))
    out = t({"image": image, "label": mask})
    torch.testing.assert_close(out["image"], image, atol=1e-5, rtol=0)
    assert torch.equal(out["label"], mask)


def test_affine_keeps_types_and_integer_masks():
    image, mask = _slice_pair()
    meta = MetaTensor(image, meta={"filename_or_obj": "x.nii.gz"})
    out = RandRPTAffined(["image", "label"], prob=1.0).set_random_state(1)(
        {"image": meta, "label": mask.numpy().astype(np.uint8)}
    )
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "x.nii.gz"
    assert isinstance(out["label"], np.ndarray) and out["label"].dtype == np.uint8
    assert set(np.unique(out["label"]).tolist()) == {0, 1}


# ---------------------------------------------------------------- elastic


def test_elastic_field_magnitude_is_rpt_like():
    field = rpt_elastic_displacement((256, 256), 10.0, 5.0, np.random.RandomState(0))
    assert field.shape == (2, 256, 256) and field.dtype == np.float32
    # U(-1,1) noise (sd 0.577) blurred by a sigma-5 Gaussian has sd ~0.577 / (2 sqrt(pi) 5) = 0.033; x alpha = 10.
    assert 0.2 < float(field.std()) < 0.5 and float(np.abs(field).max()) < 3.0
    assert np.all(rpt_elastic_displacement((32, 32), 0.0, 5.0, np.random.RandomState(0)) == 0)


def test_elastic_same_field_for_image_and_mask():
    image, mask = _slice_pair()
    image[0] = mask[0]
    t = RandRPTElasticd(["image", "label"], prob=1.0, alpha=300.0, sigma=6.0)  # strong, to see the warp
    out = t.set_random_state(0)({"image": image, "label": mask})
    assert _changed(out["label"], mask)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(torch.floor(out["image"][0] + 0.5), out["label"][0])
    again = t.set_random_state(0)({"image": image, "label": mask})
    assert torch.equal(again["image"], out["image"])
    identity = RandRPTElasticd(["image", "label"], prob=1.0, alpha=0.0)({"image": image, "label": mask})
    torch.testing.assert_close(identity["image"], image)


def test_slice_checks():
    with pytest.raises(ValueError, match="key 'image' must hold a \\[C, H, W\\] slice, got shape \\(1, 8, 8, 4\\)"):
        RandRPTAffined("image", prob=1.0)({"image": torch.zeros(1, 8, 8, 4)})
    with pytest.raises(ValueError, match="must share one in-plane size"):
        RandRPTElasticd(["image", "label"], prob=1.0)({"image": torch.zeros(1, 8, 8), "label": torch.zeros(1, 8, 9)})
    with pytest.raises(ValueError, match="mode must be one of"):
        RandRPTAffined("image", mode="area")
    with pytest.raises(ValueError, match="zoom must satisfy"):
        RandRPTAffined("image", zoom=(1.2, 0.9))


# ---------------------------------------------------------------- episode level


def test_episode_augmentation_is_reproducible_with_a_seed():
    ep = _episode()
    outs = [RPTAugmentd(prob_gamma=1.0, prob_geometric=1.0).set_random_state(7)(ep) for _ in range(2)]
    for k in KEYS:
        assert torch.equal(outs[0][k], outs[1][k]), k
    other = RPTAugmentd(prob_gamma=1.0, prob_geometric=1.0).set_random_state(8)(ep)
    assert _changed(other["query_image"], outs[0]["query_image"])
    assert _changed(other["support_image"], outs[0]["support_image"])
    # support and query draw different parameters from the shared stream
    s_shift = ndimage.center_of_mass(outs[0]["support_label"][0].numpy())
    q_shift = ndimage.center_of_mass(outs[0]["query_label"][0].numpy())
    assert not np.allclose(s_shift, q_shift)  # same disk in both, moved differently


def test_independent_mode_decisions():
    ep = _episode()
    none = RPTAugmentd(prob_gamma=0.0, prob_geometric=0.0).set_random_state(0)(ep)
    assert all(torch.equal(none[k], ep[k]) for k in KEYS)
    both = RPTAugmentd(prob_gamma=1.0, prob_geometric=1.0).set_random_state(0)(ep)
    assert all(_changed(both[k], ep[k]) for k in KEYS)
    t = RPTAugmentd().set_random_state(0)
    counts = np.zeros(4)
    for _ in range(400):
        t.randomize()
        counts += [*t.decisions["support"], *t.decisions["query"]]
    assert np.all(np.abs(counts / 400 - 0.5) < 0.1), counts


def test_one_of_two_mode_touches_exactly_one_side():
    ep = _episode()
    to_query = RPTAugmentd(mode="one_of_two", prob_gamma=1.0, prob_geometric=1.0).set_random_state(0)(ep)
    assert torch.equal(to_query["support_image"], ep["support_image"])
    assert torch.equal(to_query["support_label"], ep["support_label"])
    assert _changed(to_query["query_image"], ep["query_image"]) and _changed(to_query["query_label"], ep["query_label"])
    to_support = RPTAugmentd(mode="one_of_two", prob_gamma=0.0, prob_geometric=0.0).set_random_state(0)(ep)
    assert torch.equal(to_support["query_image"], ep["query_image"])
    assert _changed(to_support["support_image"], ep["support_image"])
    t = RPTAugmentd(mode="one_of_two").set_random_state(1)
    gamma_sides = []
    for _ in range(200):
        t.randomize()
        (g_s, geo_s), (g_q, geo_q) = t.decisions["support"], t.decisions["query"]
        assert g_s != g_q and geo_s != geo_q
        gamma_sides.append(g_q)
    assert 0.4 < np.mean(gamma_sides) < 0.6


def test_gamma_only_changes_images():
    ep = _episode()
    t = RPTAugmentd(prob_gamma=1.0, prob_geometric=0.0).set_random_state(0)
    out = t(ep)
    assert torch.equal(out["support_label"], ep["support_label"]) and torch.equal(out["query_label"], ep["query_label"])
    assert _changed(out["support_image"], ep["support_image"])


def test_episode_argument_checks():
    with pytest.raises(ValueError, match="mode must be one of"):
        RPTAugmentd(mode="both")
    with pytest.raises(ValueError, match="support_keys must be \\(image_key, label_key\\)"):
        RPTAugmentd(support_keys=("support_image",))
    with pytest.raises(ValueError, match="prob_gamma must be in \\[0, 1\\]"):
        RPTAugmentd(prob_gamma=1.5)


@requires_chaos
def test_real_chaos_episode_stays_binary_and_finite():
    image = ScaleToUnitRanged("image", preset="minmax")({"image": load_volume(chaos_dir() / "image_2.nii.gz")})["image"]
    label = load_volume(chaos_dir() / "label_2.nii.gz", dtype=np.int32)
    liver = (label == 1).float()
    z = int(torch.argmax(liver.sum(dim=(0, 1, 2))))
    rep = ReplicateChanneld(["support_image", "query_image"])
    ep = rep(
        {
            "support_image": image[..., z].as_tensor(),
            "support_label": liver[..., z].as_tensor(),
            "query_image": image[..., z + 1].as_tensor(),
            "query_label": liver[..., z + 1].as_tensor(),
        }
    )
    for mode in RPTAugmentd.MODES:
        t = RPTAugmentd(mode=mode, prob_gamma=1.0, prob_geometric=1.0)
        for seed in range(3):
            out = t.set_random_state(seed)(ep)
            for side in ("support", "query"):
                img, lab = out[f"{side}_image"], out[f"{side}_label"]
                assert img.shape == (3, 256, 256) and lab.shape == (1, 256, 256)
                assert bool(torch.isfinite(img).all()) and -1.0 - 1e-4 <= float(img.min()) <= float(img.max()) <= 1.0
                assert set(torch.unique(lab).tolist()) <= {0.0, 1.0}
                ratio = float(lab.sum()) / float(ep[f"{side}_label"].sum())
                assert 0.6 < ratio < 1.6, ratio  # zoom 0.9..1.2 -> area 0.81..1.44


def test_rpt_augment_records_its_settings_for_a_run_s_provenance():
    aug = RPTAugmentd(translate_px=7, rotate_deg=15.0, zoom=(0.8, 1.25), prob_geometric=0.25)
    assert aug.settings["translate_px"] == [7.0, 7.0] and aug.settings["rotate_deg"] == 15.0
    assert aug.settings["zoom"] == [0.8, 1.25] and aug.settings["prob_geometric"] == 0.25
    assert aug.settings["mode"] == "independent" and aug.settings["gamma_range"] == [0.5, 1.5]
    assert RPTAugmentd(translate_px=(3, 9)).settings["translate_px"] == [3.0, 9.0]
