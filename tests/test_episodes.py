"""Training episodes from supervoxels on real CHAOS data (RPT's sampler; Setting 2 exclusion)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import RandGaussianNoised
from torch.utils.data import DataLoader

from monai_sdfsmis.data import (
    ALPNET_LABEL_GROUPS,
    EpisodeDataset,
    VolumeRecord,
    VolumeStore,
    find_alpnet_volumes,
    slice_label_counts,
    slices_to_exclude,
)
from monai_sdfsmis.transforms.augmentation import RPTAugmentd
from tests.utils import chaos_dir, requires_chaos

ORGANS = (1, 2, 3, 4)
N_EPISODES = 50
TENSOR_KEYS = ("support_image", "support_label", "query_image", "query_label")


@pytest.fixture(scope="module")
def store():
    if not (chaos_dir() / "image_1.nii.gz").exists():
        pytest.skip("CHAOS T2-SPIR copy not found (set SDFSMIS_DATA_DIR)")
    s = VolumeStore(find_alpnet_volumes(chaos_dir(), require_labels=True, require_supervoxels=True))
    s.preload(kinds=("image", "supervoxel", "label"), progress=False)
    return s


@pytest.fixture(scope="module")
def setting1(store):
    ds = EpisodeDataset(store, length=N_EPISODES, seed=2024)
    return ds, [ds[i] for i in range(N_EPISODES)]


# --------------------------------------------------------------------------------------------- pure functions
def test_slices_to_exclude_by_hand():
    label = np.zeros((3, 3, 5), np.int16)
    label[0, 0, 0] = 1  # slice 0: organ 1
    label[1, 1, 1] = 2  # slice 1: organs 1 and 2
    label[0, 0, 1] = 1
    label[2, 2, 3] = 7  # slice 3: another label only
    np.testing.assert_array_equal(slices_to_exclude(label, (1, 2), "or"), [True, True, False, False, False])
    np.testing.assert_array_equal(slices_to_exclude(label, (1, 2), "and"), [False, True, False, False, False])
    np.testing.assert_array_equal(slices_to_exclude(label[None], (7,), "or"), [False, False, False, True, False])
    with pytest.raises(ValueError, match="Unknown exclusion mode"):
        slices_to_exclude(label, (1,), "xor")
    with pytest.raises(ValueError, match="empty"):
        slices_to_exclude(label, (), "or")


def test_slice_label_counts_matches_brute_force():
    sv = np.random.default_rng(0).integers(0, 6, size=(7, 5, 4)).astype(np.int32)
    sv[sv == 4] = 0  # a missing id must not appear
    ids, counts = slice_label_counts(sv)
    np.testing.assert_array_equal(ids, [1, 2, 3, 5])
    for row, i in enumerate(ids):
        np.testing.assert_array_equal(counts[row], (sv == i).sum(axis=(0, 1)))
    # ids too large for direct counting take the sorting path
    ids_big, counts_big = slice_label_counts(sv * 10**8)
    np.testing.assert_array_equal(ids_big, ids * 10**8)
    np.testing.assert_array_equal(counts_big, counts)


# --------------------------------------------------------------------------------------------- Setting 1, real data
@requires_chaos
def test_setting1_episode_invariants(store, setting1):
    ds, episodes = setting1
    assert len(ds) == N_EPISODES
    orders = set()
    for ep in episodes:
        # checked in NumPy: tiny torch ops are slow on a busy 2-core machine
        arr = {key: ep[key].numpy() for key in TENSOR_KEYS}
        for key in ("support_image", "query_image"):
            assert ep[key].dtype == torch.float32 and arr[key].shape == (3, 256, 256)
            assert arr[key].min() >= -1.0 and arr[key].max() <= 1.0
            assert (arr[key][0] == arr[key][1]).all() and (arr[key][0] == arr[key][2]).all()
        for key in ("support_label", "query_label"):
            assert ep[key].dtype == torch.float32 and arr[key].shape == (1, 256, 256)
            assert np.isin(arr[key], (0.0, 1.0)).all()
        vid, sv_id, zs, zq = ep["volume_id"], ep["supervoxel_id"], ep["support_slice"], ep["query_slice"]
        assert isinstance(vid, str) and vid in store.ids
        assert abs(zs - zq) == 1, "support and query must be adjacent slices"
        sv = store.supervoxels(vid)
        image = store.image(vid)
        # the masks are exactly the supervoxel in each slice, and the images are those slices
        np.testing.assert_array_equal(arr["support_label"][0], sv[:, :, zs] == sv_id)
        np.testing.assert_array_equal(arr["query_label"][0], sv[:, :, zq] == sv_id)
        np.testing.assert_array_equal(arr["support_image"][0], image[:, :, zs])
        np.testing.assert_array_equal(arr["query_image"][0], image[:, :, zq])
        sizes = (int(arr["support_label"].sum()), int(arr["query_label"].sum()))
        assert min(sizes) > 0, "both slices contain the supervoxel"
        assert max(sizes) >= 200, "min_size of the larger mask"
        orders.add(zs < zq)
    assert orders == {True, False}, "the pair order is swapped with p = 0.5"
    assert len({ep["volume_id"] for ep in episodes}) > 10


@requires_chaos
def test_setting1_reproducible(store, setting1):
    ds, episodes = setting1
    again = EpisodeDataset(store, length=N_EPISODES, seed=2024)
    for i in (0, 7, 31, N_EPISODES - 1):  # any order of access gives the same episode
        other = again[i]
        for key in TENSOR_KEYS:
            np.testing.assert_array_equal(other[key].numpy(), episodes[i][key].numpy())
        assert (other["volume_id"], other["supervoxel_id"], other["support_slice"]) == (
            episodes[i]["volume_id"],
            episodes[i]["supervoxel_id"],
            episodes[i]["support_slice"],
        )
    meta = lambda e: (e["volume_id"], e["supervoxel_id"], e["support_slice"], e["query_slice"])  # noqa: E731
    different = EpisodeDataset(store, length=N_EPISODES, seed=2025)
    assert [meta(different[i]) for i in range(10)] != [meta(e) for e in episodes[:10]]
    again.set_epoch(1)
    assert [meta(again[i]) for i in range(10)] != [meta(e) for e in episodes[:10]]
    with pytest.raises(IndexError):
        ds[N_EPISODES]


@requires_chaos
def test_slice_gap_pairs_span_the_supervoxel(store, setting1):
    _, adjacent = setting1
    ds = EpisodeDataset(store, length=N_EPISODES, seed=2024, max_slice_gap=3)
    gaps = []
    for i in range(N_EPISODES):
        ep = ds[i]
        vid, sv_id, zs, zq = ep["volume_id"], ep["supervoxel_id"], ep["support_slice"], ep["query_slice"]
        sv = store.supervoxels(vid)
        low, high = sorted((zs, zq))
        # both slices and every slice between them hold the supervoxel (one 3-D run of it)
        assert all((sv[:, :, z] == sv_id).any() for z in range(low, high + 1))
        np.testing.assert_array_equal(ep["query_label"][0].numpy(), sv[:, :, zq] == sv_id)
        gaps.append(high - low)
    assert set(gaps) <= {1, 2, 3} and {1, 2, 3} <= set(gaps), f"gaps drawn: {sorted(set(gaps))}"
    # the default draws the same adjacent pairs as before the setting existed (seeded runs stay reproducible)
    default = EpisodeDataset(store, length=N_EPISODES, seed=2024, max_slice_gap=1)
    assert [(default[i]["volume_id"], default[i]["support_slice"], default[i]["query_slice"]) for i in range(10)] == [
        (e["volume_id"], e["support_slice"], e["query_slice"]) for e in adjacent[:10]]
    with pytest.raises(ValueError, match="max_slice_gap"):
        EpisodeDataset(store, length=4, max_slice_gap=0)


@requires_chaos
def test_same_slice_episodes_are_one_slice_on_both_sides(store, setting1):
    _, adjacent = setting1
    everything = EpisodeDataset(store, length=N_EPISODES, seed=2024, same_slice_fraction=1.0)
    for i in range(N_EPISODES):
        ep = everything[i]
        vid, sv_id, z = ep["volume_id"], ep["supervoxel_id"], ep["support_slice"]
        assert ep["query_slice"] == z
        # both sides are the stored slice and that slice's supervoxel mask, read here from the files' arrays
        expected = store.supervoxels(vid)[:, :, z] == sv_id
        assert expected.sum() >= 200  # RPT's min_size holds for the one slice
        np.testing.assert_array_equal(ep["support_label"][0].numpy(), expected)
        np.testing.assert_array_equal(ep["query_label"][0].numpy(), expected)
        np.testing.assert_array_equal(ep["query_image"][0].numpy(), store.image(vid)[:, :, z])
    half = EpisodeDataset(store, length=N_EPISODES, seed=2024, same_slice_fraction=0.5)
    same = sum(half[i]["support_slice"] == half[i]["query_slice"] for i in range(N_EPISODES))
    assert 10 <= same <= 40, f"{same} of {N_EPISODES} same-slice episodes at a fraction of 0.5"
    # the default (0) draws the episodes of a dataset built before the setting existed
    none = EpisodeDataset(store, length=N_EPISODES, seed=2024, same_slice_fraction=0.0)
    assert [(none[i]["volume_id"], none[i]["support_slice"], none[i]["query_slice"]) for i in range(10)] == [
        (e["volume_id"], e["support_slice"], e["query_slice"]) for e in adjacent[:10]]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="same_slice_fraction"):
            EpisodeDataset(store, length=4, same_slice_fraction=bad)


@requires_chaos
def test_dataloader_workers_reproduce_indexing(store, setting1):
    ds, episodes = setting1
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["support_image"].shape == (2, 3, 256, 256) and batch["query_label"].shape == (2, 1, 256, 256)
    assert list(batch["volume_id"]) == [episodes[0]["volume_id"], episodes[1]["volume_id"]]
    assert torch.equal(batch["query_image"][1], episodes[1]["query_image"])


@requires_chaos
def test_training_ids_restrict_volumes(store):
    ids = ["1", "2", "3"]
    ds = EpisodeDataset(store, ids=ids, length=20, seed=0)
    assert {ds[i]["volume_id"] for i in range(20)} <= set(ids)


@requires_chaos
def test_augmentation_is_applied_and_reproducible(store):
    plain = EpisodeDataset(store, length=4, seed=5)
    noisy = EpisodeDataset(
        store, length=4, seed=5, augment=RandGaussianNoised(keys=["support_image", "query_image"], prob=1.0, std=0.2)
    )
    noisy_again = EpisodeDataset(
        store, length=4, seed=5, augment=RandGaussianNoised(keys=["support_image", "query_image"], prob=1.0, std=0.2)
    )
    a, b, c = plain[2], noisy[2], noisy_again[2]
    assert a["support_slice"] == b["support_slice"] and a["volume_id"] == b["volume_id"]
    assert not torch.equal(a["support_image"], b["support_image"])
    assert torch.equal(b["support_image"], c["support_image"]), "augmentation is seeded from the episode"
    assert b["support_image"].min() >= -1 and b["support_image"].max() <= 1  # clipped back into range
    assert torch.equal(b["support_image"][0], b["support_image"][2])


@requires_chaos
def test_rpt_augmentation(store):
    ds = EpisodeDataset(store, length=2, seed=9, augment=RPTAugmentd(mode="one_of_two"))
    twin = EpisodeDataset(store, length=2, seed=9, augment=RPTAugmentd(mode="one_of_two"))
    for i in range(2):
        ep, other = ds[i], twin[i]
        for key in TENSOR_KEYS:
            assert torch.equal(ep[key], other[key])
        assert ep["support_image"].shape == (3, 256, 256) and ep["query_label"].shape == (1, 256, 256)
        assert set(torch.unique(ep["query_label"]).tolist()) <= {0.0, 1.0}


class _EmptySupportFirst:
    """An 'augmentation' that erases the support mask on its first ``failures`` calls, then changes nothing."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.seeds = failures, 0, []

    def set_random_state(self, seed: int) -> None:
        self.seeds.append(seed)

    def __call__(self, episode: dict) -> dict:
        self.calls += 1
        if self.calls <= self.failures:
            episode = dict(episode, support_label=torch.zeros_like(episode["support_label"]))
        return episode


@requires_chaos
def test_augmentation_that_empties_the_support_mask_is_redrawn(store):
    # Seen in a real run: an RPT draw at 128 px scaled a small supervoxel out of the support slice, and
    # compute_loss stopped training on the empty support mask.
    plain = EpisodeDataset(store, length=1, seed=3)[0]
    redraw = _EmptySupportFirst(failures=2)
    episode = EpisodeDataset(store, length=1, seed=3, augment=redraw)[0]
    assert redraw.calls == 3 and len(set(redraw.seeds)) == 3  # a fresh random state for every draw
    assert episode["support_label"].sum() > 0
    assert torch.equal(episode["support_label"], plain["support_label"])

    never = _EmptySupportFirst(failures=100)
    episode = EpisodeDataset(store, length=1, seed=3, augment=never)[0]
    assert never.calls == 8  # then the episode stays un-augmented
    for key in TENSOR_KEYS:
        assert torch.equal(episode[key], plain[key])


# --------------------------------------------------------------------------------------------- Setting 2, real data
def _contains(store, vid, z, labels) -> set[int]:
    return set(np.unique(store.label(vid)[:, :, z]).tolist()) & set(labels)


@requires_chaos
def test_setting2_or_never_shows_a_test_organ(store):
    # in CHAOS volumes 13 and 15 every slice pair that shares a large supervoxel also shows a test organ
    with pytest.warns(UserWarning, match=r"Skipping volumes \['13', '15'\]"):
        ds = EpisodeDataset(store, length=N_EPISODES, setting=2, exclusion="or", seed=11)
    assert len(ds.volume_ids) == 18
    for i in range(N_EPISODES):
        ep = ds[i]
        for z in (ep["support_slice"], ep["query_slice"]):
            assert not _contains(store, ep["volume_id"], z, ORGANS), f"episode {i} uses slice {z} with a test organ"
        assert abs(ep["support_slice"] - ep["query_slice"]) == 1
        assert max(ep["support_label"].numpy().sum(), ep["query_label"].numpy().sum()) >= 200


@requires_chaos
def test_setting2_and_differs_from_or(store):
    n_or = n_and = 0
    for v in store.ids:
        excl_or = slices_to_exclude(store.label(v), ORGANS, "or")
        excl_and = slices_to_exclude(store.label(v), ORGANS, "and")
        assert not (excl_and & ~excl_or).any()
        n_or, n_and = n_or + int(excl_or.sum()), n_and + int(excl_and.sum())
    # RPT's AND removes only the slices showing all four organs at once; OR removes every organ slice
    assert 0 < n_and < n_or
    ds = EpisodeDataset(store, length=N_EPISODES, setting=2, exclusion="and", seed=11)
    with_organ = 0
    for i in range(N_EPISODES):
        ep = ds[i]
        for z in (ep["support_slice"], ep["query_slice"]):
            assert _contains(store, ep["volume_id"], z, ORGANS) != set(ORGANS)
            with_organ += bool(_contains(store, ep["volume_id"], z, ORGANS))
    assert with_organ > 0, "AND keeps slices that show some test organs"


@requires_chaos
def test_setting2_alpnet_groups(store):
    kidneys, liver_spleen = EpisodeDataset.for_groups(store, None, ALPNET_LABEL_GROUPS["chaos"], length=20, seed=3)
    assert kidneys.excluded_labels == (2, 3) and liver_spleen.excluded_labels == (1, 4)
    for i in range(20):
        ep = kidneys[i]
        assert not _contains(store, ep["volume_id"], ep["support_slice"], (2, 3))
        assert not _contains(store, ep["volume_id"], ep["query_slice"], (2, 3))
    with pytest.raises(ValueError, match="needs `group`"):
        EpisodeDataset(store, setting=2, exclusion="groups", label_groups=ALPNET_LABEL_GROUPS["chaos"])
    with pytest.raises(ValueError, match="needs label_groups"):
        EpisodeDataset(store, setting=2, exclusion="groups")


# --------------------------------------------------------------------------------------------- errors
@requires_chaos
def test_no_usable_volume_names_dataset(store):
    with pytest.raises(ValueError, match="chaos_t2spir.*min_size"):
        EpisodeDataset(store, ids=["1", "2"], min_size=10**6)


@requires_chaos
def test_bad_arguments(store):
    with pytest.raises(ValueError, match="setting must be 1 or 2"):
        EpisodeDataset(store, setting=3)
    with pytest.raises(ValueError, match="Unknown exclusion"):
        EpisodeDataset(store, setting=2, exclusion="xor")
    with pytest.raises(ValueError, match="Unknown volume id '999'"):
        EpisodeDataset(store, ids=["999"])
    with pytest.raises(ValueError, match="length"):
        EpisodeDataset(store, length=0)


def test_setting2_without_labels_and_without_supervoxels(tmp_path):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), affine), str(tmp_path / "image_1.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), affine), str(tmp_path / "sv_1.nii.gz"))
    rec = VolumeRecord("1", tmp_path / "image_1.nii.gz", None, tmp_path / "sv_1.nii.gz")
    store = VolumeStore([rec], spatial_size=None)
    with pytest.raises(ValueError, match="Setting 2 needs ground-truth label maps.*image_1.nii.gz"):
        EpisodeDataset(store, setting=2)
    store_nosv = VolumeStore([VolumeRecord("1", tmp_path / "image_1.nii.gz")], spatial_size=None)
    with pytest.raises(ValueError, match="no supervoxel file"):
        EpisodeDataset(store_nosv)
    # one supervoxel filling the volume: 64 pixels per slice, so min_size 64 works and 65 does not
    ds = EpisodeDataset(store, length=3, min_size=64, seed=0)
    assert ds[0]["support_image"].shape == (3, 8, 8)
    with pytest.warns(UserWarning, match=r"Skipping volumes \['2'\]"):
        rec2 = VolumeRecord("2", tmp_path / "image_1.nii.gz", None, tmp_path / "image_1.nii.gz")
        two = VolumeStore([rec, rec2], spatial_size=None)  # volume 2: every voxel its own supervoxel
        assert EpisodeDataset(two, length=3, min_size=2, seed=0).volume_ids == ["1"]


def test_fallback_draw_stays_valid(tmp_path, monkeypatch):
    """When rejection sampling gives up, the episode is drawn among the valid pairs (never an invalid one)."""
    sv = np.zeros((8, 8, 6), np.int16)
    sv[:, :, 0:2] = 1  # supervoxel 1: 64 px in slices 0, 1
    sv[:2, :2, 2:6] = 2  # supervoxel 2: 4 px per slice, too small for min_size 10
    image = np.random.default_rng(1).normal(size=sv.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image(sv, np.eye(4)), str(tmp_path / "sv.nii.gz"))
    store = VolumeStore([VolumeRecord("a", tmp_path / "image.nii.gz", None, tmp_path / "sv.nii.gz")], spatial_size=None)
    monkeypatch.setattr("monai_sdfsmis.data.episodes._MAX_TRIES", 0)
    ds = EpisodeDataset(store, length=10, min_size=10, seed=0)
    for i in range(10):
        ep = ds[i]
        assert ep["supervoxel_id"] == 1 and {ep["support_slice"], ep["query_slice"]} == {0, 1}


def test_episode_sampler_resumes_mid_epoch_and_splits_replicas():
    from monai_sdfsmis.data.episodes import EpisodeSampler

    sampler = EpisodeSampler(10)
    assert list(sampler) == list(range(10)) and len(sampler) == 10
    sampler.set_start(4)
    assert sampler.start == 4
    assert list(sampler) == [4, 5, 6, 7, 8, 9]
    assert list(sampler) == list(range(10)), "only the pass after set_start is shortened"
    replicas = [EpisodeSampler(10, num_replicas=3, rank=r) for r in range(3)]
    assert [list(s) for s in replicas] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # padded by wrapping around
    replicas[1].set_start(2)
    assert list(replicas[1]) == [7, 0]
    with pytest.raises(ValueError, match="cannot skip 5 of the 4"):
        replicas[0].set_start(5)
    with pytest.raises(ValueError, match="rank must be in 0..2"):
        EpisodeSampler(10, num_replicas=3, rank=3)
