from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_sdfsmis.engines.model_folder import resolve_postprocess
from monai_sdfsmis.inferers import SlidingSupportInferer
from monai_sdfsmis.networks.support_copy import SupportMaskCopy
from monai_sdfsmis.transforms.postprocess import OrganMaskPostprocess, check_postprocess_steps


def _organ_with_island_and_hole() -> torch.Tensor:
    mask = torch.zeros(1, 1, 12, 12, 6)
    mask[0, 0, 2:8, 2:8, 1:5] = 1  # the organ: 6 x 6 x 4
    mask[0, 0, 4, 4, 2] = 0  # a hole enclosed in 3D
    mask[0, 0, 10, 10, 3] = 1  # an island, not touching the organ (not even diagonally)
    return mask


def test_steps_by_hand():
    mask = _organ_with_island_and_hole()
    before = mask.clone()
    largest = OrganMaskPostprocess(["largest_component"])(mask)
    assert torch.equal(mask, before)  # the input is not modified (MONAI's transforms write in place)
    expected = before.clone()
    expected[0, 0, 10, 10, 3] = 0
    assert torch.equal(largest, expected)
    both = OrganMaskPostprocess(["fill_holes", "largest_component"])(mask)
    expected[0, 0, 4, 4, 2] = 1
    assert torch.equal(both, expected) and both.dtype == mask.dtype
    assert int(both.sum()) == 6 * 6 * 4
    assert OrganMaskPostprocess(None)(mask) is mask
    channel_first = OrganMaskPostprocess("largest_component")(mask[0])
    assert torch.equal(channel_first, largest[0])


def test_step_names_are_checked():
    assert check_postprocess_steps(["fill_holes", "largest_component"]) == ("largest_component", "fill_holes")
    assert check_postprocess_steps("none") == () == check_postprocess_steps(None) == check_postprocess_steps([])
    with pytest.raises(ValueError, match="unknown post-processing step"):
        check_postprocess_steps(["keep_largest"])
    assert resolve_postprocess(None, {"postprocess": ["largest_component"]}) == ("largest_component",)
    assert resolve_postprocess(["none"], {"postprocess": ["largest_component"]}) == ()
    assert resolve_postprocess(None, {}) == ()
    with pytest.raises(ValueError, match="model_config.json.*unknown post-processing step"):
        resolve_postprocess(None, {"postprocess": ["lcc"], "_path": "/m/model_config.json"})


def test_inferer_drops_an_island_of_the_copied_support():
    # The copy pastes the support's middle organ slice of each chunk; an island drawn into that slice is pasted
    # too and is the smaller 3D component of the query's mask.
    depth = 9
    support_label = torch.zeros(1, 1, 32, 32, depth)
    support_label[0, 0, 8:20, 8:20, :] = 1
    support_label[0, 0, 28:30, 28:30, 4] = 1  # island on the middle slice (the second chunk's support slice)
    support_image = torch.zeros(1, 1, 32, 32, depth)
    query = torch.zeros(1, 1, 32, 32, depth)
    query_label = torch.zeros(1, 1, 32, 32, depth)
    query_label[..., 2:7] = 1
    kwargs = {"support_image": support_image, "support_label": support_label, "query_label": query_label}
    raw = SlidingSupportInferer(spatial_size=32)(query, SupportMaskCopy(), **kwargs)
    clean = SlidingSupportInferer(spatial_size=32, postprocess=["largest_component"])(query, SupportMaskCopy(), **kwargs)
    island = np.zeros((32, 32), bool)
    island[28:30, 28:30] = True
    raw_np, clean_np = raw[0, 0].numpy().astype(bool), clean[0, 0].numpy().astype(bool)
    assert any(raw_np[..., d][island].all() for d in range(depth))  # the raw copy holds the island
    assert not clean_np[np.broadcast_to(island[..., None], clean_np.shape)].any()
    assert np.array_equal(clean_np, raw_np & ~np.broadcast_to(island[..., None], raw_np.shape))
