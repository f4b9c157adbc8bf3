"""Support alignment (``support_alignment="body_box"``): hand-placed boxes and organs, checked against hand mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_sdfsmis.engines.model_folder import resolve_support_alignment
from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.inferers.alignment import BodyBox, align_support, body_box
from monai_sdfsmis.networks.support_copy import SupportMaskCopy

BACKGROUND, BODY, ORGAN = -1.0, 0.2, 0.8


def _slice(size: int, body: tuple[int, int, int, int], organ: tuple[int, int, int, int]) -> tuple:
    """A ``[1, 3, S, S]`` image (background, a body rectangle, a brighter organ) and its organ mask; bounds inclusive."""
    image = torch.full((1, 3, size, size), BACKGROUND)
    image[..., body[0] : body[1] + 1, body[2] : body[3] + 1] = BODY
    image[..., organ[0] : organ[1] + 1, organ[2] : organ[3] + 1] = ORGAN
    label = torch.zeros(1, 1, size, size)
    label[..., organ[0] : organ[1] + 1, organ[2] : organ[3] + 1] = 1
    return image, label


def _box_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.nonzero(mask[0, 0].any(dim=1)).flatten()
    cols = torch.nonzero(mask[0, 0].any(dim=0)).flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def test_body_box_is_the_rectangle_drawn_and_none_on_a_flat_slice():
    image, _ = _slice(128, (10, 50, 20, 90), (20, 29, 30, 39))
    assert body_box(image) == BodyBox(10, 50, 20, 90)
    assert body_box(torch.full((2, 3, 64, 64), BACKGROUND)) is None


def test_the_support_organ_lands_where_the_box_to_box_map_puts_it():
    # Support body rows 10..50, query body rows 20..100: scale 1/2 from query to support pixels, centres 30 and 60,
    # so support row r' is query row 2 (r' - 30) + 60; the organ's rows 20..29 (mask > 0.5 between 19.5 and 29.5)
    # land on query rows 40..58. Columns: support 20..60 (centre 40) onto query 40..80 (centre 60), scale 1:
    # the organ's columns 30..39 land on 50..59.
    image, label = _slice(128, (10, 50, 20, 60), (20, 29, 30, 39))
    query, _ = _slice(128, (20, 100, 40, 80), (0, -1, 0, -1))
    aligned_image, aligned_label = align_support(image, label, body_box(query))
    assert _box_of(aligned_label) == (40, 58, 50, 59)
    assert aligned_label.dtype == label.dtype and aligned_label.shape == label.shape
    # The image moved with the mask: its body is now the query's (to the pixel that blends body and background).
    moved = body_box(aligned_image)
    assert moved is not None and max(abs(a - b) for a, b in zip(moved, BodyBox(20, 100, 40, 80))) <= 1


def test_the_same_body_box_leaves_the_support_unchanged():
    image, label = _slice(96, (8, 80, 12, 70), (30, 41, 20, 33))
    query, _ = _slice(96, (8, 80, 12, 70), (50, 60, 50, 60))
    aligned_image, aligned_label = align_support(image, label, body_box(query))
    assert torch.equal(aligned_label, label)
    assert torch.allclose(aligned_image, image, atol=1e-5)


def test_without_a_body_in_the_query_the_support_is_kept():
    image, label = _slice(64, (5, 50, 5, 50), (10, 20, 10, 20))
    aligned_image, aligned_label = align_support(image, label, body_box(torch.full((1, 3, 64, 64), BACKGROUND)))
    assert aligned_image is image and aligned_label is label


def _shifted_volumes(depth: int = 9, shift: int = 12) -> tuple[torch.Tensor, ...]:
    """Support and query volumes ``[1, 1, 64, 64, D]``: the query's body and organ are the support's moved by
    ``shift`` rows and columns."""
    support = torch.full((1, 1, 64, 64, depth), BACKGROUND)
    support_label = torch.zeros(1, 1, 64, 64, depth)
    support[:, :, 4:40, 4:40] = BODY
    support[:, :, 12:24, 14:26] = ORGAN
    support_label[:, :, 12:24, 14:26] = 1
    query = torch.roll(support, (shift, shift), dims=(2, 3))
    query_label = torch.roll(support_label, (shift, shift), dims=(2, 3))
    return support, support_label, query, query_label


def _dice(mask: torch.Tensor, truth: torch.Tensor) -> float:
    return float(2 * (mask.bool() & truth.bool()).sum() / (mask.bool().sum() + truth.bool().sum()))


@pytest.mark.parametrize("query_range", ["protocol", "all"])
def test_the_copy_of_an_aligned_support_finds_a_moved_organ(query_range):
    support, support_label, query, query_label = _shifted_volumes()
    kwargs = {"support_image": support, "support_label": support_label, "query_label": query_label}
    plain = SlidingSupportInferer(spatial_size=64, query_range=query_range)(query, SupportMaskCopy(), **kwargs)
    aligned = SlidingSupportInferer(spatial_size=64, query_range=query_range, support_alignment="body_box")(
        query, SupportMaskCopy(), **kwargs
    )
    # The organ moved by its own height and width: the plain copy misses it; the aligned support is it.
    assert _dice(plain, query_label) < 0.05
    assert _dice(aligned, query_label) == pytest.approx(1.0)


def test_alignment_settings_are_checked_and_read_from_the_model_folder(tmp_path):
    with pytest.raises(ValueError, match="support_alignment must be one of"):
        SlidingSupportInferer(support_alignment="affine")
    assert resolve_support_alignment(None, {}) == "none"
    assert resolve_support_alignment(None, {"support_alignment": "body_box"}) == "body_box"
    assert resolve_support_alignment("none", {"support_alignment": "body_box"}) == "none"
    config = tmp_path / "model_config.json"
    config.write_text(json.dumps({"support_alignment": "rigid"}))
    with pytest.raises(ValueError, match=r"model_config.json: support_alignment must be one of"):
        resolve_support_alignment(None, {"support_alignment": "rigid", "_path": str(config)})


def test_a_bright_speck_outside_the_body_is_not_body():
    rng = np.random.default_rng(0)
    image = torch.full((1, 3, 128, 128), BACKGROUND)
    image[..., 30:100, 20:110] = torch.from_numpy(rng.uniform(0.0, 1.0, (70, 90)).astype(np.float32))
    image[..., 5, 5] = 1.0  # one bright speck outside the body: the opening removes it
    box = body_box(image)
    assert box is not None and (box.top, box.left) != (5, 5)
    assert abs(box.top - 30) <= 2 and abs(box.bottom - 99) <= 2 and abs(box.left - 20) <= 2 and abs(box.right - 109) <= 2


@pytest.mark.parametrize("override, stored, expected", [
    (None, None, "none"), (None, "body_box", "body_box"), ("none", "body_box", "none"), ("body_box", None, "body_box"),
])
def test_the_bundle_takes_the_alignment_from_the_command_line_else_the_model_folder(tmp_path, override, stored, expected):
    from monai.bundle import ConfigParser

    from tests.utils import REPO_ROOT

    configs = REPO_ROOT / "bundles" / "sd_fsmis" / "configs"
    (tmp_path / "model_config.json").write_text(json.dumps({} if stored is None else {"support_alignment": stored}))
    for files in (["inference.json"], ["train.json", "evaluate.json"]):
        parser = ConfigParser(ConfigParser.load_config_files([str(configs / f) for f in files]))
        parser["ckpt_path"] = str(tmp_path / "model.pt")
        parser["spatial_size"] = 64
        if override is not None:
            parser["support_alignment"] = override
        assert parser.get_parsed_content("inferer").support_alignment == expected, files
