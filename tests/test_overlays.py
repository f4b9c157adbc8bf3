"""Overlay PNGs: blended panels checked pixel by pixel against a recomputation, layout, titles, legend."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from monai_sdfsmis.engines.overlays import (
    ORGAN_COLOURS,
    OverlaySaver,
    overlay_panels,
    overlay_png,
    overlay_size,
    volume_dice,
)

H, W, ALPHA = 40, 30, 0.45
LIVER = ORGAN_COLOURS["liver"]


def _case():
    """A gradient image in [-1, 1] and two overlapping rectangles as ground truth and prediction."""
    image = torch.linspace(-1, 1, H * W).reshape(H, W)
    label = torch.zeros(H, W)
    label[5:15, 3:10] = 1
    pred = torch.zeros(H, W)
    pred[10:20, 3:10] = 1
    return image, label, pred


def _expected_panel(image: torch.Tensor, mask: torch.Tensor | None, colour) -> np.ndarray:
    """Recomputed: grey (x + 1) / 2, blended (1 - a) grey + a colour on the mask, then radiological display.

    Display pixel (r, c) of an ``[H, W]`` RAS slice is array pixel (H - 1 - c, W - 1 - r): anterior (high second
    index) at the top, the patient's right (high first index) on the left.
    """
    grey = (image.numpy().astype(np.float64) + 1) / 2
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if mask is not None:
        m = mask.numpy() > 0
        rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * np.asarray(colour) / 255.0
    out = np.zeros((W, H, 3))
    for r in range(W):
        for c in range(H):
            out[r, c] = rgb[H - 1 - c, W - 1 - r]
    return np.rint(out * 255)


def test_panels_are_the_image_in_grey_and_the_masks_in_the_organ_colour():
    image, label, pred = _case()
    panels = overlay_panels(image, label, pred, colour=LIVER, alpha=ALPHA)
    assert [p.shape for p in panels] == [(W, H, 3)] * 3 and all(p.dtype == np.uint8 for p in panels)
    for panel, mask in zip(panels, (None, label, pred)):
        np.testing.assert_allclose(panel, _expected_panel(image, mask, LIVER), atol=1)
    # Outside the masks every panel is the same grey image (R = G = B).
    outside = _expected_panel(image, None, LIVER)
    assert (outside[..., 0] == outside[..., 2]).all()


def test_png_layout_titles_and_legend():
    image, label, pred = _case()
    data = overlay_png(image, label, pred, organ="liver", dice=0.5, title="SD-FSMIS: fold 0, query 1, slice 3")
    png = Image.open(io.BytesIO(data))
    # Panels of W x H upscaled x7 (to >= 256 px), 8 px apart and from the border; 46 px title band, 30 px legend band.
    assert png.size == overlay_size(H, W) == (3 * 40 * 7 + 4 * 8, 46 + 30 * 7 + 30) and png.mode == "RGB"
    assert png.info["Title"] == "SD-FSMIS: fold 0, query 1, slice 3 - volume Dice 50.0%"
    pixels = np.asarray(png).astype(np.float64)
    scale, top, pad = 7, 46, 8
    for i, mask in enumerate((None, label, pred)):
        expected = _expected_panel(image, mask, LIVER)
        left = pad + i * (H * scale + pad)
        block = pixels[top:top + W * scale, left:left + H * scale]
        # Every upscaled pixel block is one flat colour, equal to the recomputed panel pixel.
        sampled = block[scale // 2::scale, scale // 2::scale]
        np.testing.assert_allclose(sampled, expected, atol=1)
        assert np.abs(block - np.kron(expected, np.ones((scale, scale, 1)))).max() <= 1
    # Titles above the panels are drawn (white-ish text on black), and the legend shows the liver colour.
    assert pixels[:top - 2, pad:-pad].max() > 200
    legend = pixels[top + W * scale:]
    assert (np.abs(legend - np.asarray(LIVER)).max(axis=-1) <= 1).sum() > 30


def test_other_organs_get_their_own_colour_and_a_missing_dice_says_so():
    image, label, pred = _case()
    spleen = np.asarray(Image.open(io.BytesIO(overlay_png(image, label, pred, organ="spleen", dice=float("nan")))))
    panel = overlay_panels(image, label, pred, colour=ORGAN_COLOURS["spleen"])[1]
    np.testing.assert_allclose(panel, _expected_panel(image, label, ORGAN_COLOURS["spleen"]), atol=1)
    assert (np.abs(spleen.astype(int) - np.asarray(ORGAN_COLOURS["spleen"])).max(axis=-1) <= 1).sum() > 30
    info = Image.open(io.BytesIO(overlay_png(image, label, pred, dice=float("nan")))).info
    assert info["Title"] == "volume Dice n/a (empty ground truth)"


def test_volume_dice_matches_a_hand_count():
    label = np.zeros((4, 5, 6), bool)
    label[0:2, 0:2, 0:3] = True  # 12 voxels
    pred = np.zeros_like(label)
    pred[1:3, 0:2, 0:3] = True  # 12 voxels, 6 shared
    assert volume_dice(label, pred) == pytest.approx(2 * 6 / 24)
    assert math.isnan(volume_dice(np.zeros_like(label), pred))
    assert volume_dice(label, np.zeros_like(label)) == 0.0


def test_saver_writes_one_titled_png_per_slice_with_the_volume_dice(tmp_path):
    """A real ignite engine feeds the saver one decollated case, as the evaluator does."""
    depth = 8
    image = torch.linspace(-1, 1, H * W * depth).reshape(1, H, W, depth)
    label = torch.zeros(1, H, W, depth)
    label[0, 5:15, 3:10, 2:6] = 1
    pred = torch.zeros(1, H, W, depth)
    pred[0, 10:20, 3:10, 2:6] = 1
    engine = Engine(lambda e, batch: [{"image": image, "label": label, "pred": pred}])
    case = {"fold": torch.tensor([0]), "organ": ["liver"], "query_id": ["2"]}
    saver = OverlaySaver(tmp_path, method="SD-FSMIS", n_slices=2)
    saver.attach(engine)
    engine.run([[case]], max_epochs=1)
    names = sorted(p.name for p in saver.written)
    # Slices 2-5 hold the organ: two parts {2, 3} and {4, 5}, shown at their middles (the protocol's rule).
    assert names == ["fold0_liver_q2_z003.png", "fold0_liver_q2_z005.png"]
    # Dice of the whole volume: 10 x 7 x 4 voxels each, 5 x 7 x 4 shared -> 0.5.
    for path in saver.written:
        info = Image.open(path).info
        z = int(path.stem[-3:])
        assert info["Title"] == f"SD-FSMIS: fold 0, query 2, slice {z} - volume Dice 50.0%"
    assert OverlaySaver.paths_for(tmp_path, "SD-FSMIS") == sorted(saver.written)
