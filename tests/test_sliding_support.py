from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from monai_sdfsmis.data.layouts import VolumeRecord, find_alpnet_volumes
from monai_sdfsmis.data.volumes import VolumeStore
from monai_sdfsmis.inferers import SlidingSupportInferer, largest_run
from monai_sdfsmis.inferers.chunks import nearest_support
from monai_sdfsmis.networks.support_copy import SupportMaskCopy
from tests.utils import chaos_dir, requires_chaos, requires_totalseg, totalseg_dir

LIVER, RIGHT_KIDNEY = 1, 2


def _rpt_support_positions(n_slices: int, n_chunks: int = 3) -> list[int]:
    # RPT get_support_index written out: the middle of each of n parts of the organ extent.
    half = 1 / (2 * n_chunks)
    interval = (1.0 - 1.0 / n_chunks) / (n_chunks - 1)
    return [int((half + interval * k) * n_slices) for k in range(n_chunks)]


def _volume(array: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.float32))[None, None]


class ThresholdNet(nn.Module):
    """Stand-in network: foreground where the query's first channel exceeds 0.5; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))
        self.calls: Counter = Counter()
        self.batch_sizes: list[int] = []

    def encode_support(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        assert image.shape[:2] == (1, 3) and label.shape == (1, 1, *image.shape[-2:])
        assert bool(label.any())
        self.calls["encode_support"] += 1
        return label

    def segment(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        assert query.shape[1] == 3
        self.batch_sizes.append(int(query.shape[0]))
        return torch.where(query[:, :1] > 0.5, 1.0, -1.0)

    def binarize(self, soft: torch.Tensor) -> torch.Tensor:
        return soft > 0


@pytest.fixture(scope="module")
def chaos():
    records = [r for r in find_alpnet_volumes(chaos_dir()) if r.id in ("1", "3")]
    return VolumeStore(records, intensity="minmax", spatial_size=256)


def _case(store: VolumeStore, organ: int, support: str = "3", query: str = "1"):
    s_label = store.label(support) == organ
    q_label = store.label(query) == organ
    return (
        _volume(store.image(query)),
        _volume(store.image(support)),
        _volume(s_label),
        _volume(q_label),
        s_label,
        q_label,
    )


@requires_chaos
@pytest.mark.parametrize("organ", [LIVER, RIGHT_KIDNEY])
def test_protocol_mode_copies_support_slice_of_each_chunk(chaos, organ):
    query, s_image, s_label_t, q_label_t, s_label, q_label = _case(chaos, organ)
    out = SlidingSupportInferer(sw_batch_size=4)(
        query, SupportMaskCopy(), support_image=s_image, support_label=s_label_t, query_label=q_label_t
    )
    assert out.shape == query.shape and out.dtype == torch.float32
    out = out[0, 0].numpy()

    s_slices = np.flatnonzero(s_label.any(axis=(0, 1)))
    picks = [s_slices[i] for i in _rpt_support_positions(len(s_slices))]
    q_slices = np.flatnonzero(q_label.any(axis=(0, 1)))
    edges = np.linspace(0, len(q_slices), 4).astype(int)
    expected = np.zeros_like(out)
    for j in range(3):
        for d in q_slices[edges[j] : edges[j + 1]]:
            expected[..., d] = s_label[..., picks[j]]
    np.testing.assert_array_equal(out, expected)
    # every slice outside the query's organ extent is empty
    outside = np.setdiff1d(np.arange(out.shape[-1]), q_slices)
    assert not out[..., outside].any()


@requires_chaos
def test_deployment_mode_with_copy_covers_whole_volume(chaos):
    query, s_image, s_label_t, _, s_label, _ = _case(chaos, LIVER)
    inferer = SlidingSupportInferer(query_range="all")
    out = inferer(query, SupportMaskCopy(), support_image=s_image, support_label=s_label_t)[0, 0].numpy()
    depth = out.shape[-1]
    s_slices = np.flatnonzero(s_label.any(axis=(0, 1)))
    picks = [s_slices[i] for i in _rpt_support_positions(len(s_slices))]
    edges = np.linspace(0, depth, 4).astype(int)
    # the copy predicts foreground on every slice, so the organ range is the whole volume
    for j in range(3):
        for d in range(edges[j], edges[j + 1]):
            np.testing.assert_array_equal(out[..., d], s_label[..., picks[j]])


def test_deployment_mode_keeps_longest_predicted_run_and_rechunks():
    depth = 30
    query = torch.full((1, 1, 40, 40, depth), -1.0)
    query[..., 10:20, 10:20, 6:18] = 1.0  # organ-like run of 12 slices
    query[..., 5:8, 5:8, 22:25] = 1.0  # a shorter false-positive run
    support = torch.full((1, 1, 40, 40, 9), -1.0)
    support_label = torch.zeros((1, 1, 40, 40, 9))
    support_label[..., 2:5] = 1
    net = ThresholdNet()
    out = SlidingSupportInferer(query_range="all", sw_batch_size=5, spatial_size=40)(
        query, net, support_image=support, support_label=support_label
    )
    assert out.shape == (1, 1, 40, 40, depth)
    fg = out[0, 0].flatten(0, 1).any(dim=0)
    assert fg.nonzero().flatten().tolist() == list(range(6, 18))
    np.testing.assert_array_equal(out[0, 0, ..., 10].numpy(), (query[0, 0, ..., 10] > 0.5).float().numpy())
    # pass 1 over 30 slices in 3 chunks, pass 2 only for slices whose chunk changed
    # (range 6..17 -> chunks 6-9, 10-13, 14-17; pass-1 chunks 0-9, 10-19, 20-29: 14-17 change chunk);
    # pass 2 reuses pass 1's support contexts
    assert net.calls["encode_support"] == 3
    assert sum(net.batch_sizes) == depth + 4
    assert max(net.batch_sizes) <= 5


def test_deployment_mode_without_any_foreground_returns_zeros():
    query = torch.full((1, 1, 16, 16, 7), -1.0)
    support_label = torch.zeros((1, 1, 16, 16, 3))
    support_label[..., 1] = 1
    out = SlidingSupportInferer(query_range="all")(
        query, ThresholdNet(), support_image=torch.zeros(1, 1, 16, 16, 3), support_label=support_label
    )
    assert out.shape == (1, 1, 16, 16, 7) and not out.any()


def test_protocol_mode_encodes_support_once_per_chunk_and_batches_queries():
    query = torch.rand(1, 3, 64, 48, 20) * 2 - 1
    query_label = torch.zeros(1, 1, 64, 48, 20)
    query_label[..., 20:30, 10:20, 3:17] = 1  # 14 organ slices -> chunks of 4, 5, 5
    support_label = torch.zeros(1, 1, 64, 48, 6)
    support_label[..., 5:9, 5:9, 1:5] = 1
    net = ThresholdNet()
    out = SlidingSupportInferer(sw_batch_size=3)(
        query, net, support_image=torch.zeros(1, 1, 64, 48, 6), support_label=support_label, query_label=query_label
    )
    assert net.calls["encode_support"] == 3
    assert sum(net.batch_sizes) == 14 and max(net.batch_sizes) <= 3
    assert out.shape == (1, 1, 64, 48, 20)
    assert not out[..., :3].any() and not out[..., 17:].any()
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}


def test_metatensor_metadata_is_kept():
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    query = MetaTensor(torch.rand(1, 1, 32, 32, 6) * 2 - 1, affine=affine, meta={"filename_or_obj": "q.nii.gz"})
    label = MetaTensor(torch.zeros(1, 1, 32, 32, 6), affine=affine)
    label[..., 10:20, 10:20, 2:4] = 1
    out = SlidingSupportInferer()(
        query, SupportMaskCopy(), support_image=query.clone(), support_label=label, query_label=label
    )
    assert isinstance(out, MetaTensor)
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "q.nii.gz"
    assert torch.equal(out.as_tensor(), label.as_tensor())


def _ct_case(organ_label: int = 2):
    """The TotalSegmentator CT example (122 x 101 x 30) normalised to [-1, 1] and one organ's mask."""
    record = VolumeRecord(
        id="ct", image=totalseg_dir() / "example_ct_sm.nii.gz", label=totalseg_dir() / "example_seg.nii.gz"
    )
    store = VolumeStore([record], intensity="ct", spatial_size=None)
    image, mask = store.image("ct"), store.label("ct") == organ_label
    assert image.shape[:2] == (122, 101)
    return _volume(image), _volume(mask), mask


@requires_totalseg
def test_non_256_input_is_resized_and_returned_on_its_own_grid():
    image, label_t, mask = _ct_case()
    out = SlidingSupportInferer()(image, SupportMaskCopy(), support_image=image, support_label=label_t, query_label=label_t)
    assert out.shape == image.shape == (1, 1, 122, 101, 30)
    out = out[0, 0].numpy().astype(bool)
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    assert not out[..., np.setdiff1d(np.arange(30), slices)].any()
    # the support slice of each chunk is copied back onto its own grid: the 122x101 -> 256 -> 122x101 round
    # trip of a mask is exact (pixel-centre aligned nearest resizing)
    picks = [slices[i] for i in _rpt_support_positions(len(slices))]
    edges = np.linspace(0, len(slices), 4).astype(int)
    for j, z in enumerate(picks):
        for d in slices[edges[j] : edges[j + 1]]:
            np.testing.assert_array_equal(out[..., d], mask[..., z])


@requires_totalseg
def test_tiny_sdfsmis_protocol_and_deployment_shapes():
    sdfsmis = pytest.importorskip("monai_sdfsmis.networks.sdfsmis")
    net = sdfsmis.SDFSMIS.tiny(seed=0).eval()
    image, label_t, mask = _ct_case()
    last = int(np.flatnonzero(mask.any(axis=(0, 1)))[-1])
    # the organ's last three slices and two organ-free slices after them keep the (CPU) test short
    lo, hi = last - 2, min(last + 3, mask.shape[-1])
    image, label_t = image[..., lo:hi], label_t[..., lo:hi]
    organ = label_t[0, 0].flatten(0, 1).any(dim=0)
    assert int(organ.sum()) == 3 and not bool(organ.all())
    out = SlidingSupportInferer(n_chunks=2, sw_batch_size=8)(
        image, net, support_image=image, support_label=label_t, query_label=label_t
    )
    assert out.shape == image.shape and out.shape[2:4] == (122, 101) and out.dtype == torch.float32
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    assert not out[0, 0][..., ~organ].any()

    organ_only = image[..., organ]
    deployed = SlidingSupportInferer(query_range="all", n_chunks=1)(
        organ_only, net, support_image=image, support_label=label_t
    )
    assert deployed.shape == organ_only.shape
    assert set(torch.unique(deployed).tolist()) <= {0.0, 1.0}


def test_largest_run():
    assert largest_run([]) is None
    assert largest_run([False, False]) is None
    assert largest_run([True, True, False, True]) == (0, 2)
    assert largest_run([False, True, False, True, True, True]) == (3, 6)
    assert largest_run([True, False, True]) == (0, 1)  # first on a tie
    assert largest_run(torch.tensor([0, 1, 1, 1])) == (1, 4)


def _valid():
    query = torch.zeros(1, 1, 16, 16, 5)
    label = torch.zeros(1, 1, 16, 16, 5)
    label[..., 4:8, 4:8, 1:3] = 1
    return query, label


@pytest.mark.parametrize(
    "change, message",
    [
        ({"inputs": torch.zeros(16, 16, 5)}, r"inputs \(query volume\) must be \[1, C, H, W, D\]"),
        ({"inputs": torch.zeros(2, 1, 16, 16, 5)}, "inputs"),
        ({"inputs": torch.zeros(1, 2, 16, 16, 5)}, "C in"),
        ({"inputs": torch.full((1, 1, 16, 16, 5), 200.0)}, r"intensities must be in \[-1, 1\]"),
        ({"support_image": None}, "needs support_image and support_label"),
        ({"support_label": torch.zeros(1, 1, 16, 16, 5)}, "support_label is empty"),
        ({"support_label": torch.full((1, 1, 16, 16, 5), 3.0)}, "binary organ mask"),
        ({"support_label": torch.zeros(1, 1, 8, 16, 5)}, "same spatial shape"),
        ({"support_label": torch.zeros(1, 0, 16, 16, 5)}, r"support_label must be \[1, C, H, W, D\] with C >= 1"),
        # two organs need the query's mask of both in protocol mode
        ({"support_label": torch.zeros(1, 2, 16, 16, 5)}, r"query_label must be \[1, C, H, W, D\] with C in \(2,\)"),
        ({"query_label": None}, "needs query_label"),
        ({"query_label": torch.zeros(1, 1, 16, 16, 5)}, "query_label is empty"),
        ({"query_label": torch.ones(1, 1, 16, 16, 4)}, "same spatial shape"),
        ({"query_label": torch.full((1, 1, 16, 16, 5), 2.0)}, "query_label must be a binary organ mask"),
        ({"support": torch.zeros(1, 1, 16, 16, 5)}, "unexpected arguments"),
        ({"network": nn.Linear(2, 2)}, "no 'encode_support' method"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    query, label = _valid()
    args = {
        "inputs": query,
        "network": SupportMaskCopy(),
        "support_image": query,
        "support_label": label,
        "query_label": label,
    }
    args.update(change)
    inputs, network = args.pop("inputs"), args.pop("network")
    with pytest.raises(ValueError, match=message):
        SlidingSupportInferer()(inputs, network, **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_chunks": 0}, "n_chunks"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"spatial_size": 0}, "spatial_size"),
        ({"query_range": "organ"}, "query_range"),
        ({"flip_axes": [2]}, "flip_axes"),
        ({"flip_axes": [0, 0]}, "flip_axes"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingSupportInferer(**kwargs)


def test_progress_bar_and_no_grad():
    query, label = _valid()
    query = query.clone().requires_grad_(True)
    out = SlidingSupportInferer(progress=True)(
        query, SupportMaskCopy(), support_image=query, support_label=label, query_label=label
    )
    assert not out.requires_grad


def _with_nan(volume: torch.Tensor, n: int) -> torch.Tensor:
    out = volume.clone()
    out.view(-1)[:n] = float("nan")
    return out


@pytest.mark.parametrize("query_range", ["protocol", "all"])
@pytest.mark.parametrize(
    "name, n_bad, message",
    [
        ("inputs", 1280, r"inputs \(query volume\) contains 1280 non-finite"),
        ("inputs", 3, r"inputs \(query volume\) contains 3 non-finite"),
        ("support_image", 7, "support_image contains 7 non-finite"),
        ("support_label", 2, "support_label contains 2 non-finite"),
    ],
)
def test_non_finite_volumes_are_rejected(query_range, name, n_bad, message):
    """NaN fails every range comparison, so a NaN query used to give an empty mask instead of an error."""
    query, label = _valid()
    args = {"inputs": query, "support_image": query.clone(), "support_label": label, "query_label": label}
    args[name] = _with_nan(args[name], n_bad)
    inputs = args.pop("inputs")
    if query_range == "all":
        args.pop("query_label")
    with pytest.raises(ValueError, match=message):
        SlidingSupportInferer(query_range=query_range)(inputs, SupportMaskCopy(), **args)


def test_infinite_query_is_rejected():
    query, label = _valid()
    bad = query.clone()
    bad[0, 0, 0, 0, :2] = float("inf")
    with pytest.raises(ValueError, match=r"inputs \(query volume\) contains 2 non-finite"):
        SlidingSupportInferer(query_range="all")(bad, SupportMaskCopy(), support_image=query, support_label=label)


def _tiny_sdfsmis_case():
    """A tiny SDFSMIS whose support matters, a 7-slice query (organ slices 1-5) and a 6-slice support."""
    from monai_sdfsmis.networks.sdfsmis import SDFSMIS
    from monai_sdfsmis.networks.sqi import sii_blocks

    net = SDFSMIS.tiny(seed=0).eval()
    with torch.no_grad():  # SII and VTCT away from their zero init, so that the support changes the output
        for _, block in sii_blocks(net.unet):
            block.attn_sq.attn.to_out[0].weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(2))
        net.vtct.gate.fill_(0.5)
    g = torch.Generator().manual_seed(0)
    size, depth = 64, 7
    query = torch.rand(1, 1, size, size, depth, generator=g) * 2 - 1
    support = torch.rand(1, 1, size, size, 6, generator=g) * 2 - 1
    support_label = torch.zeros(1, 1, size, size, 6)
    support_label[..., 20:40, 18:44, 1:5] = 1
    support_label[..., 20:30, 18:24, 2] = 0  # support slices differ, so a wrong pairing shows
    query_label = torch.zeros(1, 1, size, size, depth)
    query_label[..., 1:6] = 1  # 5 organ slices -> chunks of 1, 2, 2
    return net, query, support, support_label, query_label


def test_tiny_sdfsmis_runs_the_support_pass_once_per_chunk_and_matches_the_naive_path():
    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    size = query.shape[2]

    calls: Counter = Counter()
    hooks = [
        net.vae.encoder.register_forward_hook(lambda m, i, o: calls.update(["vae_encoder"])),
        net.unet.register_forward_pre_hook(lambda m, i: calls.update([f"unet_{m.conv_in.branch}"])),
    ]
    inferer = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=size)
    soft_calls: list[torch.Tensor] = []
    decode = net.decode_mask
    net.decode_mask = lambda z: soft_calls.append(decode(z)) or soft_calls[-1]  # keep the soft masks
    try:
        out = inferer(query, net, support_image=support, support_label=support_label, query_label=query_label)
    finally:
        del net.decode_mask
        for h in hooks:
            h.remove()
    # one support pass per chunk (support + mask in one VAE call), one VAE call and UNet call per query batch
    assert calls["unet_support"] == 3
    assert calls["unet_query"] == 3 and calls["vae_encoder"] == 3 + 3

    # naive path: every query slice alone, its support slice re-encoded for it
    picks = [1 + k for k in _rpt_support_positions(4)]  # the support organ is slices 1-4
    chunks = [[1], [2, 3], [4, 5]]
    image = lambda v, d: v[0, :, :, :, d][None].expand(-1, 3, -1, -1)  # noqa: E731
    naive_soft = {}
    with torch.no_grad():
        for j, slices in enumerate(chunks):
            for d in slices:
                ctx = net.encode_support(image(support, picks[j]), support_label[0, :, :, :, picks[j]][None])
                naive_soft[d] = net.segment(image(query, d), ctx)
    fast_soft = torch.cat(soft_calls)
    torch.testing.assert_close(fast_soft, torch.cat([naive_soft[d] for d in range(1, 6)]), rtol=1e-4, atol=1e-5)
    expected = torch.zeros_like(out)
    for d, soft in naive_soft.items():
        expected[0, 0, :, :, d] = net.binarize(soft)[0, 0].float()
    assert bool(out.any())
    flips = (out != expected).float().mean()
    assert flips < 1e-3  # binarised at 0: a soft value within rounding of 0 may flip


@pytest.mark.parametrize("flip_axes", [(0,), (0, 1)])
def test_flip_tta_averages_the_mirrored_passes_of_query_and_support(flip_axes):
    """Recomputed slice by slice: each flip mirrors query and support slice, the soft masks are mirrored back and
    averaged with the plain pass, then binarised."""
    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    out = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], flip_axes=flip_axes)(
        query, net, support_image=support, support_label=support_label, query_label=query_label
    )
    plain = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2])(
        query, net, support_image=support, support_label=support_label, query_label=query_label
    )
    picks = [1 + k for k in _rpt_support_positions(4)]
    chunks = [[1], [2, 3], [4, 5]]
    image = lambda v, d: v[0, :, :, :, d][None].expand(-1, 3, -1, -1)  # noqa: E731
    expected = torch.zeros_like(out)
    with torch.no_grad():
        for j, slices in enumerate(chunks):
            s_img, s_lab = image(support, picks[j]), support_label[0, :, :, :, picks[j]][None]
            for d in slices:
                softs = [net.segment(image(query, d), net.encode_support(s_img, s_lab))]
                for axis in flip_axes:
                    dim = axis + 2  # volume axis 0 is dim 2 of a [1, 3, H, W] slice
                    mirrored = net.encode_support(s_img.flip(dim), s_lab.flip(dim))
                    softs.append(net.segment(image(query, d).flip(dim), mirrored).flip(dim))
                expected[0, 0, :, :, d] = net.binarize(torch.stack(softs).mean(0))[0, 0].float()
    assert bool(out.any())
    assert (out != expected).float().mean() < 1e-3  # binarised at 0: a soft value within rounding of 0 may flip
    assert (out != plain).float().mean() > 0.01  # the flipped passes do change the mask


@pytest.mark.parametrize("postprocess", [None, "largest_component"])
def test_probabilities_are_the_soft_masks_and_threshold_to_the_mask(postprocess):
    """Recomputed slice by slice: (soft + 1) / 2 of each query slice with its chunk's support, 0 off the organ
    range; > 0.5 exactly where the returned mask is 1, also where post-processing or the binarization rule decided
    otherwise."""
    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    net.config.binarize_mode = "relative"  # a threshold that is not soft > 0: the probability must still cut at 0.5
    inferer = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], probabilities=True,
                                    postprocess=postprocess)
    out = inferer(query, net, support_image=support, support_label=support_label, query_label=query_label)
    mask_only = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], postprocess=postprocess)(
        query, net, support_image=support, support_label=support_label, query_label=query_label
    )
    assert out.shape == (1, 2, *query.shape[2:]) and out.dtype == torch.float32
    assert torch.equal(out[:, :1], mask_only)
    mask, probability = out[0, 0].bool(), out[0, 1]
    assert torch.equal(probability > 0.5, mask)
    assert float(probability.min()) >= 0.0 and float(probability.max()) <= 1.0

    picks = [1 + k for k in _rpt_support_positions(4)]
    chunks = [[1], [2, 3], [4, 5]]
    image = lambda v, d: v[0, :, :, :, d][None].expand(-1, 3, -1, -1)  # noqa: E731
    expected = torch.zeros(query.shape[2:])
    with torch.no_grad():
        for j, slices in enumerate(chunks):
            ctx = net.encode_support(image(support, picks[j]), support_label[0, :, :, :, picks[j]][None])
            for d in slices:
                expected[:, :, d] = ((net.segment(image(query, d), ctx)[0, 0] + 1) / 2).clamp(0, 1)
    # the probability is the recomputed one wherever it already agrees with the mask; elsewhere it sits at 0.5
    agrees = (expected > 0.5) == mask
    assert bool(agrees.any()) and bool((~agrees).any())  # the relative rule keeps some soft < 0 voxels
    torch.testing.assert_close(probability[agrees], expected[agrees], rtol=0, atol=1e-5)
    assert torch.all((probability[~agrees] - 0.5).abs() < 1e-6)
    assert torch.equal(probability[..., [0, 6]], torch.zeros_like(probability[..., [0, 6]]))  # off the organ range


def test_k_shot_averages_the_soft_masks_of_every_support_for_each_chunk():
    """Two supports of different sizes: chunk j of the query is segmented with slice j of each support; recomputed
    slice by slice, the two soft masks averaged, then binarised. Their order does not matter; one support in a list
    is the 1-shot call."""
    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    g = torch.Generator().manual_seed(5)
    second = torch.rand(1, 1, 64, 64, 9, generator=g) * 2 - 1
    second_label = torch.zeros(1, 1, 64, 64, 9)
    second_label[..., 10:30, 30:50, 2:8] = 1  # 6 organ slices, another place than the first support's
    inferer = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], probabilities=True)
    call = lambda images, labels: inferer(query, net, support_image=images, support_label=labels,  # noqa: E731
                                          query_label=query_label)
    out = call([support, second], [support_label, second_label])
    one_shot = call(support, support_label)
    assert torch.equal(call([support], [support_label]), one_shot)
    assert torch.allclose(call([second, support], [second_label, support_label]), out, atol=1e-6)

    picks = ([1 + k for k in _rpt_support_positions(4)], [2 + k for k in _rpt_support_positions(6)])
    chunks = [[1], [2, 3], [4, 5]]
    image = lambda v, d: v[0, :, :, :, d][None].expand(-1, 3, -1, -1)  # noqa: E731
    expected = torch.zeros(query.shape[2:])
    with torch.no_grad():
        for j, slices in enumerate(chunks):
            contexts = [net.encode_support(image(v, p[j]), m[0, :, :, :, p[j]][None])
                        for v, m, p in ((support, support_label, picks[0]), (second, second_label, picks[1]))]
            for d in slices:
                expected[:, :, d] = torch.stack([net.segment(image(query, d), c) for c in contexts]).mean(0)[0, 0]
    mask = out[0, 0].bool()
    assert (mask != (expected > 0)).float().mean() < 1e-3
    assert (mask != one_shot[0, 0].bool()).float().mean() > 0.01  # the second support does change the mask
    agrees = ((expected > 0) == mask)[..., 1:6]  # the query's organ slices
    torch.testing.assert_close(out[0, 1][..., 1:6][agrees], ((expected[..., 1:6][agrees] + 1) / 2).clamp(0, 1),
                               rtol=0, atol=1e-5)


def test_nearest_support_is_the_highest_correlation_whatever_the_intensity_scale():
    x = torch.linspace(-1, 1, 8)
    ramp_down, ramp_across = x.view(1, 8, 1).expand(3, 8, 8), x.view(1, 1, 8).expand(3, 8, 8)
    ring = (x.view(8, 1) ** 2 + x.view(1, 8) ** 2).expand(3, 8, 8)
    supports = torch.stack([ramp_down, ramp_across, ring])
    # each query is one support under another linear intensity change (NCC 1), plus a little noise
    g = torch.Generator().manual_seed(0)
    queries = torch.stack([0.3 * ring - 0.5, 2.0 * ramp_down + 0.1, -0.2 + 0.5 * ramp_across])
    queries = queries + 0.01 * torch.randn(queries.shape, generator=g)
    assert nearest_support(queries, supports).tolist() == [2, 0, 1]
    assert nearest_support(-queries, supports).tolist() != [2, 0, 1]  # anti-correlated is not near


def test_nearest_fusion_gives_each_query_slice_the_mask_of_its_most_alike_support():
    """Two supports with unlike images and masks in opposite halves; query slices 0-1 look like the first support
    (brighter), 2-3 like the second: with the copy baseline, "nearest" returns each half exactly where "average"
    (the supports disagree everywhere) returns nothing."""
    x = torch.linspace(-1, 1, 16)
    down, across = x.view(16, 1).expand(16, 16), x.view(1, 16).expand(16, 16)
    stack = lambda *slices: torch.stack(slices, dim=-1)[None, None]  # noqa: E731
    first, second = stack(*[down] * 4), stack(*[across] * 4)
    left, right = torch.zeros(16, 16), torch.zeros(16, 16)
    left[:, :8], right[:, 8:] = 1, 1
    query = stack(0.8 * down, 0.5 * down + 0.1, 0.7 * across - 0.2, 0.9 * across)
    query_label = torch.ones_like(query)
    copy = SupportMaskCopy()
    rows: list[int] = []
    segment = copy.segment
    copy.segment = lambda queries, context: rows.append(queries.shape[0]) or segment(queries, context)
    call = lambda fusion: SlidingSupportInferer(  # noqa: E731
        n_chunks=1, spatial_size=16, support_fusion=fusion
    )(query, copy, support_image=[first, second], support_label=[stack(*[left] * 4), stack(*[right] * 4)],
      query_label=query_label)
    expected = stack(left, left, right, right).bool()
    assert torch.equal(call("nearest").bool(), expected)
    assert sum(rows) == 4  # each query slice is segmented with its nearest support only
    rows.clear()
    assert not call("average").any()
    assert sum(rows) == 8


@pytest.mark.parametrize(
    "images, labels, message",
    [
        ("two", "one", r"got 2 support image\(s\) and 1 support label\(s\)"),
        ("two", "second empty", r"support_label\[1\] is empty"),
        ("two", "second not binary", r"support_label\[1\] must be a binary organ mask"),
    ],
)
def test_k_shot_errors_name_the_support(images, labels, message):
    query = torch.rand(1, 1, 16, 16, 4) * 2 - 1
    label = torch.zeros(1, 1, 16, 16, 4)
    label[..., 4:10, 4:10, 1:3] = 1
    bad = {"one": [label], "second empty": [label, torch.zeros_like(label)], "second not binary": [label, label * 2]}
    with pytest.raises(ValueError, match=message):
        SlidingSupportInferer(spatial_size=16, query_range="all")(
            query, SupportMaskCopy(), support_image=[query, query], support_label=bad[labels]
        )


def test_several_organs_in_one_call_are_the_separate_calls_with_overlaps_to_the_more_probable():
    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    second = torch.zeros_like(support_label)
    second[..., 10:36, 24:60, 1:6] = 1  # overlaps the first organ's region in the support
    both = torch.cat([support_label, second], dim=1)
    inferer = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], query_range="all",
                                    probabilities=True)
    out = inferer(query, net, support_image=support, support_label=both)
    alone = [inferer(query, net, support_image=support, support_label=m) for m in (support_label, second)]
    masks = torch.cat([a[:, :1] for a in alone], dim=1).bool()
    probs = torch.cat([a[:, 1:] for a in alone], dim=1)
    assert out.shape == (1, 3, *query.shape[2:])
    labels = out[0, 0]
    # by hand: outside every mask 0; in one mask that organ; in both the larger probability (the first on a tie)
    expected = torch.zeros_like(labels)
    expected[masks[0, 0]] = 1
    expected[masks[0, 1] & ~masks[0, 0]] = 2
    contested = masks[0, 0] & masks[0, 1]
    expected[contested & (probs[0, 1] > probs[0, 0])] = 2
    assert bool(contested.any()) and bool(((labels == 1) & masks[0, 0]).any()) and bool((labels == 2).any())
    assert torch.equal(labels, expected)
    for k in (0, 1):
        assert torch.equal(out[0, 1 + k] > 0.5, labels == k + 1)
        kept = labels == k + 1
        torch.testing.assert_close(out[0, 1 + k][kept], probs[0, k][kept])
    # without probabilities: the label map alone
    plain = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], query_range="all")
    assert torch.equal(plain(query, net, support_image=support, support_label=both), out[:, :1])


def test_the_query_is_encoded_once_for_all_supports_and_organs():
    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    encoded: list[int] = []
    hook = net.vae.encoder.register_forward_hook(lambda m, i, o: encoded.append(int(i[0].shape[0])))
    second = torch.zeros_like(support_label)
    second[..., 10:36, 24:60, 1:6] = 1
    try:
        inferer = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], query_range="all")
        inferer(query, net, support_image=[support, support], support_label=[torch.cat([support_label, second], 1)] * 2)
    finally:
        hook.remove()
    # supports: 2 volumes x 2 organs x 3 chunks, each one VAE call of image + mask; the query's 7 slices once
    support_calls = [n for n in encoded if n == 2]
    assert len(support_calls) >= 12 and sum(encoded) - 2 * 12 == 7


def test_network_fusion_attends_to_every_support_in_one_query_pass():
    """SDFSMIS.fuse_supports: a support fused with itself is that support (attention over duplicated tokens is
    unchanged); the inferer's "network" fusion is one query pass per chunk with the fused context, recomputed here."""
    from monai_sdfsmis.networks.sdfsmis import SDFSMIS

    net, query, support, support_label, query_label = _tiny_sdfsmis_case()
    image = lambda v, d: v[0, :, :, :, d][None].expand(-1, 3, -1, -1)  # noqa: E731
    with torch.no_grad():
        one = net.encode_support(image(support, 2), support_label[0, :, :, :, 2][None])
        other = net.encode_support(image(support, 4), support_label[0, :, :, :, 4][None])
        twice = SDFSMIS.fuse_supports([one, one])
        assert all(twice.features[k].shape[1] == 2 * one.features[k].shape[1] for k in one.features)
        q = image(query, 3)
        torch.testing.assert_close(net.segment(q, twice), net.segment(q, one), rtol=1e-4, atol=1e-5)
        both = net.segment(q, SDFSMIS.fuse_supports([one, other]))
        assert (both - net.segment(q, one)).abs().max() > 1e-3 and (both - net.segment(q, other)).abs().max() > 1e-3

    second = torch.flip(support, dims=[2])
    second_label = torch.flip(support_label, dims=[2])
    queries: list[int] = []
    hook = net.unet.register_forward_pre_hook(lambda m, i: queries.append(1) if m.conv_in.branch == "query" else None)
    try:
        out = SlidingSupportInferer(n_chunks=3, sw_batch_size=2, spatial_size=query.shape[2], support_fusion="network")(
            query, net, support_image=[support, second], support_label=[support_label, second_label],
            query_label=query_label)
    finally:
        hook.remove()
    assert len(queries) == 3  # one query pass per chunk (batches of 1, 2, 2 slices), not one per support
    picks = [1 + k for k in _rpt_support_positions(4)]
    chunks = [[1], [2, 3], [4, 5]]
    expected = torch.zeros_like(out)
    with torch.no_grad():
        for j, slices in enumerate(chunks):
            fused = SDFSMIS.fuse_supports([net.encode_support(image(v, picks[j]), m[0, :, :, :, picks[j]][None])
                                           for v, m in ((support, support_label), (second, second_label))])
            for d in slices:
                expected[0, 0, :, :, d] = net.binarize(net.segment(image(query, d), fused))[0, 0].float()
    assert bool(out.any()) and (out != expected).float().mean() < 1e-3
    with pytest.raises(ValueError, match="needs a network with fuse_supports"):
        SlidingSupportInferer(spatial_size=16, query_range="all", support_fusion="network")(
            torch.zeros(1, 1, 16, 16, 4), SupportMaskCopy(), support_image=[torch.zeros(1, 1, 16, 16, 4)] * 2,
            support_label=[torch.ones(1, 1, 16, 16, 4)] * 2)
