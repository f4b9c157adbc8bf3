from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from monai_sdfsmis.transforms import (
    PRESETS,
    LoadVolumed,
    ReplicateChanneld,
    ResizeSlicesd,
    ScaleToUnitRange,
    ScaleToUnitRanged,
    load_volume,
)
from tests.utils import requires_totalseg, totalseg_dir


def _volume(seed: int = 0, shape=(1, 12, 10, 6)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(100.0, 40.0, shape).astype(np.float32))


def test_ct_preset_is_the_hu_window():
    x = torch.tensor([[[[-1000.0, -125.0, 75.0, 275.0, 2000.0]]]])
    out = ScaleToUnitRange("ct")(x)
    np.testing.assert_allclose(out.flatten().numpy(), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
    out = ScaleToUnitRange("ct", ct_window=(0.0, 100.0))(torch.tensor([[[[0.0, 50.0, 100.0]]]]))
    np.testing.assert_allclose(out.flatten().numpy(), [-1.0, 0.0, 1.0], atol=1e-6)
    # a fixed window needs no statistics: constant volumes are fine
    assert float(ScaleToUnitRange("ct")(torch.full((1, 4, 4, 4), 75.0)).max()) == 0.0


def test_mr_preset_clips_to_percentiles():
    x = _volume(1)
    lo, hi = np.percentile(x.numpy(), [0.5, 99.5])
    out = ScaleToUnitRange("mr")(x).numpy()
    expected = np.clip((x.numpy() - lo) / (hi - lo) * 2 - 1, -1, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.min() == -1.0 and out.max() == 1.0
    assert (out == 1.0).mean() == pytest.approx(0.005, abs=0.005)


def test_minmax_and_zscore_presets():
    x = _volume(2)
    out = ScaleToUnitRange("minmax")(x)
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    np.testing.assert_allclose(out.numpy(), (x.numpy() - x.min().item()) / np.ptp(x.numpy()) * 2 - 1, atol=1e-6)
    z = ScaleToUnitRange("zscore", zscore_clip=2.0)(x).numpy()
    xn = x.numpy()
    np.testing.assert_allclose(z, np.clip((xn - xn.mean()) / xn.std(), -2, 2) / 2, atol=1e-5)
    assert z.min() >= -1 and z.max() <= 1


def test_output_types_and_dtypes():
    x = (np.arange(60, dtype=np.int16).reshape(1, 5, 4, 3) - 20)
    for preset in PRESETS:
        out = ScaleToUnitRange(preset)(x)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert -1.0 <= out.min() and out.max() <= 1.0
    meta = MetaTensor(torch.from_numpy(x), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = ScaleToUnitRanged("image", preset="minmax")({"image": meta})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(meta.affine))


@requires_totalseg
def test_real_ct_with_ct_preset():
    vol = load_volume(totalseg_dir() / "example_ct_sm.nii.gz")
    out = ScaleToUnitRanged("image", preset="ct")({"image": vol})["image"]
    assert out.dtype == torch.float32 and out.shape == vol.shape
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0  # air below and bone above the window
    inside = float(((out > -1) & (out < 1)).float().mean())
    assert 0.2 < inside < 0.9, inside  # soft tissue lands inside the abdominal window


@requires_totalseg
def test_real_mr_with_mr_preset():
    vol = load_volume(totalseg_dir() / "example_mr_sm.nii.gz")
    out = ScaleToUnitRange("mr")(vol)
    assert float(out.min()) == -1.0 and float(out.max()) == 1.0
    assert float((out == 1.0).float().mean()) <= 0.01


def test_constant_volume_raises_instead_of_nan(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((5, 6, 7), 42.0, np.float32), np.eye(4)), str(path))
    vol = load_volume(path)
    with pytest.raises(ValueError, match=re.escape(f"image {path} (key 'image') has constant intensity 42")):
        ScaleToUnitRanged("image", preset="minmax")({"image": vol})
    with pytest.raises(ValueError, match="preset 'minmax' cannot scale it to \\[-1, 1\\] \\(division by zero\\)"):
        ScaleToUnitRange("minmax")(vol)
    with pytest.raises(ValueError, match="percentiles are both 42; preset 'mr' cannot scale"):
        ScaleToUnitRange("mr")(vol)
    with pytest.raises(ValueError, match="constant intensity 42; preset 'zscore' cannot normalise"):
        ScaleToUnitRange("zscore")(vol)


def test_bad_inputs_and_arguments():
    x = _volume(3)
    x[0, 0, 0, :2] = float("nan")
    with pytest.raises(ValueError, match="image under key 'img' contains 2 NaN or infinite voxels"):
        ScaleToUnitRanged("img")({"img": x})
    with pytest.raises(ValueError, match="preset must be one of"):
        ScaleToUnitRange("hu")
    with pytest.raises(ValueError, match="ct_window must be"):
        ScaleToUnitRange("ct", ct_window=(275, -125))
    with pytest.raises(ValueError, match="mr_percentiles must satisfy"):
        ScaleToUnitRange("mr", mr_percentiles=(50, 10))
    with pytest.raises(ValueError, match="zscore_clip must be > 0"):
        ScaleToUnitRange("zscore", zscore_clip=0)


# ---------------------------------------------------------------- resizing


def _meta(shape, spacing=(3.0, 3.0, 3.0), dtype=torch.float32, seed=0) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 5, shape, generator=g).to(dtype)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.diag(torch.tensor(spacing, dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 20.0, 5.0])
    return MetaTensor(data, affine=affine)


def test_resize_slices_keeps_depth_and_physical_extent():
    image = _meta((1, 122, 101, 30))
    out = ResizeSlicesd("image", 256)({"image": image})["image"]
    assert out.shape == (1, 256, 256, 30) and out.dtype == torch.float32
    spacing = np.linalg.norm(np.asarray(out.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, (3.0 * 122 / 256, 3.0 * 101 / 256, 3.0), rtol=1e-6)
    out2d = ResizeSlicesd("image", (64, 32))({"image": image[..., 0]})["image"]
    assert out2d.shape == (1, 64, 32)


def test_resize_inverse_returns_labels_to_the_input_grid():
    label = _meta((1, 122, 101, 30), dtype=torch.int32)
    image = _meta((1, 122, 101, 30), seed=1)
    pre = Compose([ResizeSlicesd(["image", "label"], 256, mode=("bilinear", "nearest-exact"))])
    d = pre({"image": image, "label": label})
    assert d["label"].shape == (1, 256, 256, 30) and d["label"].dtype == torch.int32
    d["pred"] = d["label"].clone()  # stands in for a network output on the resized grid
    back = Invertd("pred", pre, orig_keys="label", nearest_interp=False)(d)["pred"]
    assert back.shape == label.shape and back.dtype == torch.int32
    np.testing.assert_allclose(np.asarray(back.affine), np.asarray(label.affine), atol=1e-6)
    assert torch.equal(back.as_tensor(), label.as_tensor())  # nearest-exact round trip is lossless
    inv = pre.inverse(pre({"image": image, "label": label}))
    assert inv["image"].shape == image.shape
    np.testing.assert_allclose(np.asarray(inv["image"].affine), np.asarray(image.affine), atol=1e-6)
    # slices invert as well
    rs = ResizeSlicesd("label", 256, mode="nearest-exact")
    sl = label[..., 3]
    assert torch.equal(rs.inverse(rs({"label": sl}))["label"].as_tensor(), sl.as_tensor())


@requires_totalseg
def test_real_ct_pipeline_load_scale_resize():
    d = {"image": totalseg_dir() / "example_ct_sm.nii.gz", "label": totalseg_dir() / "example_seg.nii.gz"}
    d = Compose(
        [
            LoadVolumed(["image", "label"], grid_key="image"),
            ScaleToUnitRanged("image", preset="ct"),
            ResizeSlicesd(["image", "label"], 256, mode=("bilinear", "nearest-exact")),
        ]
    )(d)
    assert d["image"].shape == d["label"].shape == (1, 256, 256, 30)
    assert float(d["image"].min()) >= -1.0 and float(d["image"].max()) <= 1.0
    spacing = np.linalg.norm(np.asarray(d["image"].affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, (3.0 * 122 / 256, 3.0 * 101 / 256, 3.0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d["image"].affine), np.asarray(d["label"].affine))
    assert set(torch.unique(d["label"]).tolist()) >= {0, 1, 2, 3, 5}  # spleen, kidneys, liver survive


def test_resize_anti_aliasing_smooths_downsampling():
    stripes = torch.zeros(1, 64, 64, 2)
    stripes[:, ::2] = 1.0  # one-pixel stripes alias to a constant under plain 2x subsampling
    plain = ResizeSlicesd("image", 32, mode="nearest")({"image": stripes})["image"]
    smooth = ResizeSlicesd("image", 32, mode="bilinear", anti_aliasing=True)({"image": stripes})["image"]
    assert float(plain.std()) == 0.0 and abs(float(plain.mean()) - 0.5) == 0.5
    assert abs(float(smooth.mean()) - 0.5) < 0.1


def test_resize_bad_inputs():
    with pytest.raises(ValueError, match="spatial_size must be a positive int or \\(h, w\\)"):
        ResizeSlicesd("image", (256, 256, 3))
    with pytest.raises(ValueError, match="key 'image': expected a \\[C, H, W, D\\] volume or a \\[C, H, W\\] slice"):
        ResizeSlicesd("image")({"image": torch.zeros(1, 1, 4, 4, 4)})


def test_replicate_channel():
    x = torch.rand(1, 8, 8)
    out = ReplicateChanneld("image")({"image": x})["image"]
    assert out.shape == (3, 8, 8) and all(torch.equal(out[i], x[0]) for i in range(3))
    with pytest.raises(ValueError, match="image under key 'image' has 3 channels"):
        ReplicateChanneld("image")({"image": out})
