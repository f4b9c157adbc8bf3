from __future__ import annotations

import pytest
import torch

from monai_sdfsmis.networks.support_copy import SupportMaskCopy


def _support(h: int = 16, w: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(1, 3, h, w) * 2 - 1
    label = torch.zeros(1, 1, h, w)
    label[..., 3:9, 2:7] = 1
    return image, label


def test_segment_returns_support_mask_for_every_query():
    net = SupportMaskCopy()
    image, label = _support()
    context = net.encode_support(image, label)
    soft = net.segment(torch.rand(5, 3, 16, 12), context)
    assert soft.shape == (5, 1, 16, 12)
    assert set(torch.unique(soft).tolist()) == {-1.0, 1.0}
    mask = net.binarize(soft)
    assert mask.dtype == torch.bool
    for k in range(5):
        assert torch.equal(mask[k, 0], label[0, 0].bool())
    # the one-call form gives the same answer
    assert torch.equal(net(torch.rand(2, 3, 16, 12), image, label), soft[:2])


def test_segment_output_is_independent_of_later_edits():
    net = SupportMaskCopy()
    image, label = _support()
    soft = net.segment(torch.rand(2, 3, 16, 12), net.encode_support(image, label))
    soft[0].fill_(5.0)
    assert soft[1].max() == 1.0  # the rows are not views of one shared tensor


def test_to_device_and_no_trainable_parameters():
    net = SupportMaskCopy().to(torch.device("cpu"), dtype=torch.float64)
    assert list(net.parameters()) == []
    assert net.device == torch.device("cpu")
    assert next(iter(net.buffers())).device.type == "cpu"
    assert net.state_dict() == {}  # nothing to save or load


@pytest.mark.parametrize(
    "image_shape, label_shape",
    [((3, 16, 12), (1, 16, 12)), ((1, 3, 16, 12), (2, 1, 16, 12)), ((1, 3, 16, 12), (1, 1, 8, 12))],
)
def test_encode_support_rejects_bad_shapes(image_shape, label_shape):
    with pytest.raises(ValueError, match="support"):
        SupportMaskCopy().encode_support(torch.zeros(image_shape), torch.zeros(label_shape))


def test_segment_rejects_mismatched_query():
    net = SupportMaskCopy()
    context = net.encode_support(*_support())
    with pytest.raises(ValueError, match="height/width"):
        net.segment(torch.zeros(2, 3, 8, 12), context)
    with pytest.raises(ValueError, match="query_image"):
        net.segment(torch.zeros(3, 16, 12), context)
