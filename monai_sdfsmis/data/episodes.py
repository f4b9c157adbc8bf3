"""Self-supervised training episodes drawn from supervoxel pseudo-labels (RPT's sampler).

An episode is two **adjacent slices of the same volume** and the binary mask of **one 3-D supervoxel**
in each: one slice is the support (image + mask), the other the query (image + mask to predict).
No ground truth is used, except in Setting 2, where the label maps only decide which slices are
left out (:func:`slices_to_exclude`).
"""

from __future__ import annotations

__all__ = [
    "EpisodeDataset",
    "EpisodeSampler",
    "slices_to_exclude",
    "slice_label_counts",
    "supervoxel_slice_counts",
    "ALPNET_LABEL_GROUPS",
    "LATENT_KEY_SUFFIX",
]

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_numpy
from torch.utils.data import Sampler

from monai_sdfsmis.data.protocol import organ_id_list
from monai_sdfsmis.data.seeded import SeededDataset
from monai_sdfsmis.data.volumes import VolumeStore

#: ALPNet's Setting-2 label groups, one training run per group: kidneys, then liver + spleen.
ALPNET_LABEL_GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "chaos": ((2, 3), (1, 4)),
    "sabs": ((2, 3), (1, 6)),
}

_EXCLUSION_MODES = ("or", "and", "groups")
# Rejection sampling draws (supervoxel, pair) uniformly like RPT; past this many misses the draw falls back to a
# uniform choice among the valid pairs, so that a volume with very few valid pairs cannot stall a worker.
_MAX_TRIES = 10_000
_MAX_AUGMENT_TRIES = 8
#: ``episode[name + LATENT_KEY_SUFFIX]`` names the content of ``episode[name]`` for a latent cache.
LATENT_KEY_SUFFIX = "_key"


def slices_to_exclude(label_volume: np.ndarray, labels: Sequence[int], mode: str = "or") -> np.ndarray:
    """Slices (last axis) that Setting 2 removes from the training candidates.

    Parameters
    ----------
    label_volume
        Ground-truth label map ``[H, W, D]`` (or ``[1, H, W, D]``).
    labels
        Label ids of the test organs (e.g. ``(1, 2, 3, 4)`` for CHAOS, ``(1, 2, 3, 6)`` for SABS).
    mode
        ``"or"``: a slice is excluded if it contains **any** of ``labels`` (the paper's wording,
        ALPNet; our default). ``"and"``: excluded only if it contains **all** of
        them (what RPT/ADNet/DIFD/FAMNet code does). ALPNet's per-group runs are
        ``"or"`` over one group (see :class:`EpisodeDataset` ``exclusion="groups"``).

    Returns
    -------
    np.ndarray
        bool ``[D]``, True where the slice is excluded.
    """
    arr = np.asarray(label_volume)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"label_volume must be [H, W, D] or [1, H, W, D], got shape {tuple(arr.shape)}.")
    if len(labels) == 0:
        raise ValueError("labels to exclude is empty.")
    if mode not in ("or", "and"):
        raise ValueError(f"Unknown exclusion mode {mode!r}; expected 'or' or 'and'.")
    ids, counts = slice_label_counts(arr)
    return _exclusion_from_counts(ids, counts, labels, mode)


def slice_label_counts(label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count of every non-zero id of an integer map (supervoxels or labels) in every slice.

    Parameters
    ----------
    label_map
        Integer map ``[H, W, D]``, 0 = background.

    Returns
    -------
    (ids, counts)
        ``ids``: int64 ``[K]`` sorted non-zero ids present; ``counts``: int64 ``[K, D]``.
    """
    arr = np.asarray(label_map)
    if arr.ndim != 3:
        raise ValueError(f"label map must be [H, W, D], got shape {tuple(arr.shape)}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label map must hold integers, got dtype {arr.dtype}.")
    depth = arr.shape[2]
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > 65_535:
        # Few ids spread over a huge range: rank them first so that the counting table stays small.
        ids, ranks = np.unique(arr, return_inverse=True)
        arr = ranks.reshape(arr.shape)
    else:
        ids = np.arange(high + 1)
    # One bincount per slice on a contiguous copy of it (slices are strided in [H, W, D]).
    counts = np.stack([np.bincount(arr[:, :, z].ravel(), minlength=len(ids)) for z in range(depth)], axis=1)
    keep = (ids != 0) & counts.any(axis=1)
    return ids[keep].astype(np.int64), counts[keep].astype(np.int64)


#: The same function under the name it has when applied to supervoxel maps.
supervoxel_slice_counts = slice_label_counts


def _exclusion_from_counts(ids: np.ndarray, counts: np.ndarray, labels: Sequence[int], mode: str) -> np.ndarray:
    labels = [int(v) for v in labels]
    if not labels:
        raise ValueError("labels to exclude is empty.")
    if mode not in ("or", "and"):
        raise ValueError(f"Unknown exclusion mode {mode!r}; expected 'or' or 'and'.")
    rows = {int(i): r for r, i in enumerate(ids)}
    present = np.stack([counts[rows[v]] > 0 if v in rows else np.zeros(counts.shape[1], bool) for v in labels])
    return present.any(axis=0) if mode == "or" else present.all(axis=0)


@dataclass
class _VolumeTable:
    """Per-volume lookup built once: which (supervoxel, slice pair) an episode may use."""

    volume_id: str
    sv_ids: np.ndarray  # [K]
    counts: np.ndarray  # [K, D] pixels of supervoxel k in slice z
    allowed: np.ndarray  # [D] bool, slices not excluded by Setting 2
    valid_pairs: np.ndarray  # [K, D-1] bool, pair (z, z+1) usable for supervoxel k


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive True entries of length >= 2, as inclusive ``(start, end)``."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2] - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e > s]


def _excluded_labels(
    setting: int,
    exclusion: str,
    exclude_labels: Sequence[int],
    label_groups: Sequence[Sequence[int]] | None,
    group: int | None,
) -> tuple[tuple[int, ...], str]:
    """The label ids whose slices Setting 2 excludes, and how (``"or"``/``"and"``); ``()`` for Setting 1."""
    if setting != 2:
        return (), exclusion
    if exclusion != "groups":
        # One parser for every organ id setting: "liver" is one bad id, not the ids 'l', 'i', 'v', 'e', 'r'.
        given = isinstance(exclude_labels, str) or not isinstance(exclude_labels, Sequence) or len(exclude_labels) > 0
        labels = tuple(organ_id_list(exclude_labels, key="exclude_labels")) if given else ()
    else:
        if not label_groups:
            raise ValueError("exclusion='groups' needs label_groups, e.g. ALPNET_LABEL_GROUPS['chaos'].")
        if group is None:
            if len(label_groups) != 1:
                raise ValueError(
                    f"exclusion='groups' with {len(label_groups)} label groups needs `group` (0..{len(label_groups) - 1}); "
                    "use EpisodeDataset.for_groups to build one dataset per group."
                )
            group = 0
        if not 0 <= group < len(label_groups):
            raise ValueError(f"group {group} is outside the {len(label_groups)} label groups.")
        labels, exclusion = tuple(int(v) for v in label_groups[group]), "or"
    if not labels:
        raise ValueError("Setting 2 needs at least one label to exclude.")
    return labels, exclusion


def _check_volume_files(store: VolumeStore, ids: Sequence[str], setting: int) -> None:
    """``ValueError`` naming a volume without the supervoxel file (or, Setting 2, the label file) episodes need."""
    if setting == 2:
        missing = [vid for vid in ids if not store.has_label(vid)]
        if missing:
            raise ValueError(
                f"Setting 2 needs ground-truth label maps to exclude slices, but volumes {missing[:5]} "
                f"(e.g. '{store.record(missing[0]).image}') have no label file."
            )
    missing_sv = [vid for vid in ids if not store.has_supervoxels(vid)]
    if missing_sv:
        raise ValueError(
            f"Volumes {missing_sv[:5]} (e.g. '{store.record(missing_sv[0]).image}') have no supervoxel file; "
            "compute supervoxels first (monai_sdfsmis.data.supervoxels.write_supervoxels)."
        )


class EpisodeDataset(SeededDataset):
    """Map-style dataset of self-supervised 1-way 1-shot episodes (adjacent slices or one slice, one supervoxel).

    For item ``i``: pick a training volume uniformly, a supervoxel id uniformly, the slices that
    contain it (minus the Setting-2 excluded slices), a random maximal run of >= 2 consecutive such
    slices and a random adjacent pair ``(z, z+1)`` inside it (``(z, z+g)``, ``g <= max_slice_gap``, when asked); reject and redraw the supervoxel if the
    larger of the two mask areas is below ``min_size`` pixels; swap the two with probability 0.5
    (RPT's ``TrainDataset``). With a ``seed`` the draw depends only on ``(seed, epoch, i)``, so DataLoader
    workers and a ``DistributedSampler`` give the same episodes on every run.

    Parameters
    ----------
    store
        Volumes with supervoxel maps (and label maps for Setting 2).
    ids
        Training volume ids (default: all of ``store``), e.g. ``[r.id for r in fold_split(records, k)[0]]``.
    length
        Episodes per epoch (``__len__``), i.e. iterations per epoch.
    setting
        1: every slice may be used; 2: slices containing the test organs are excluded using the label maps.
    exclude_labels
        Setting 2: label ids of the test organs (CHAOS ``1, 2, 3, 4``; SABS ``1, 2, 3, 6``).
    exclusion
        Setting 2: ``"or"`` (default, any listed organ), ``"and"`` (RPT code: all listed organs at
        once), ``"groups"`` (ALPNet: ``"or"`` over ``label_groups[group]``, one dataset per group).
    label_groups, group
        For ``exclusion="groups"``: the groups (e.g. :data:`ALPNET_LABEL_GROUPS` ``["chaos"]``) and the
        index of the one this dataset excludes (may be omitted when there is one group).
    min_size
        Minimum pixel count of the larger of the two masks (RPT: 200).
    augment
        Callable applied to each episode dict after slicing, e.g.
        :class:`~monai_sdfsmis.transforms.augmentation.RPTAugmentd`. It receives 1-channel images
        ``[1, H, W]`` and masks ``[1, H, W]`` (float32 tensors); images are replicated to 3 channels
        afterwards. If it has ``set_random_state`` it is re-seeded from the episode's generator. A draw
        that empties the support mask is redrawn (the episode stays un-augmented after 8 such draws).
    seed
        Makes episode ``i`` a pure function of ``(seed, epoch, i)``; ``None`` draws fresh randomness.
    max_slice_gap
        1 (RPT): the two slices are adjacent. ``g > 1``: their distance is drawn uniformly from ``1..g`` (at most
        the length of the run), both slices and every slice between them containing the supervoxel. Farther
        pairs make copying the support a worse answer, closer to a support and a query from different volumes.

    Returns (``__getitem__``)
    -------------------------
    dict
        ``support_image``, ``query_image``: float32 ``[3, H, W]`` in ``[-1, 1]``;
        ``support_label``, ``query_label``: float32 ``[1, H, W]`` in ``{0, 1}``;
        ``episode_index`` (int, the ``index`` asked for), ``volume_id`` (str), ``supervoxel_id``, ``support_slice``,
        ``query_slice`` (int);
        ``support_image_key``, ``support_label_key``, ``query_image_key``, ``query_label_key`` (str): what each
        tensor is (``"volume/slice"``, ``"volume/slice/supervoxel"``), or ``""`` where augmentation changed it,
        the keys of a :class:`~monai_sdfsmis.networks.latent_cache.LatentCache`.
    """

    def __init__(
        self,
        store: VolumeStore,
        ids: Sequence[str] | None = None,
        length: int = 1000,
        setting: int = 1,
        exclude_labels: Sequence[int] = (1, 2, 3, 4),
        exclusion: str = "or",
        label_groups: Sequence[Sequence[int]] | None = None,
        group: int | None = None,
        min_size: int = 200,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int | None = None,
        max_slice_gap: int = 1,
        same_slice_fraction: float = 0.0,
    ) -> None:
        if int(length) < 1:
            raise ValueError(f"length (episodes per epoch) must be at least 1, got {length}.")
        if setting not in (1, 2):
            raise ValueError(f"setting must be 1 or 2, got {setting!r}.")
        if exclusion not in _EXCLUSION_MODES:
            raise ValueError(f"Unknown exclusion {exclusion!r}; expected one of {_EXCLUSION_MODES}.")
        if min_size < 0:
            raise ValueError(f"min_size must be non-negative, got {min_size}.")
        super().__init__(seed)
        if int(max_slice_gap) != max_slice_gap or int(max_slice_gap) < 1:
            raise ValueError(f"max_slice_gap must be a positive integer, got {max_slice_gap!r} (bundle key 'max_slice_gap').")
        if not 0.0 <= float(same_slice_fraction) <= 1.0:
            raise ValueError(
                f"same_slice_fraction must be in [0, 1], got {same_slice_fraction!r} (bundle key 'same_slice_fraction')."
            )
        self.store = store
        self.ids = [str(i) for i in (store.ids if ids is None else ids)]
        if not self.ids:
            raise ValueError("EpisodeDataset needs at least one training volume id.")
        for vid in self.ids:
            store.record(vid)  # unknown ids fail here, naming the id
        self.length = int(length)
        self.setting = setting
        self.exclusion = exclusion
        self.min_size = int(min_size)
        self.augment = augment
        self.max_slice_gap = int(max_slice_gap)
        self.same_slice_fraction = float(same_slice_fraction)
        self.excluded_labels, mode = _excluded_labels(setting, exclusion, exclude_labels, label_groups, group)
        _check_volume_files(store, self.ids, setting)

        self._tables: list[_VolumeTable] = []
        unusable = []
        for vid in self.ids:
            table = self._build_table(vid, mode)
            if table.valid_pairs.any():
                self._tables.append(table)
            else:
                unusable.append(vid)
        if not self._tables:
            where = store.record(self.ids[0]).image.parent
            raise ValueError(
                f"No training volume of the dataset in '{where}' (ids {self.ids[:10]}) has two adjacent slices sharing a "
                f"supervoxel of at least {self.min_size} pixels"
                f"{' outside the excluded slices' if setting == 2 else ''}; lower min_size or check the supervoxels."
            )
        if unusable:
            warnings.warn(
                f"Skipping volumes {unusable} for episode sampling: no adjacent slice pair shares a supervoxel of "
                f">= {self.min_size} pixels{' outside the excluded slices' if setting == 2 else ''}.",
                stacklevel=2,
            )
        # Images are read on first use anyway; loading them now lets forked DataLoader workers share them.
        if store.cache:
            store.preload([t.volume_id for t in self._tables], kinds=("image",))

    @classmethod
    def for_groups(
        cls, store: VolumeStore, ids: Sequence[str] | None, label_groups: Sequence[Sequence[int]], **kwargs: Any
    ) -> list[EpisodeDataset]:
        """ALPNet-style Setting 2: one dataset per label group (e.g. kidneys, then liver + spleen)."""
        return [
            cls(store, ids, setting=2, exclusion="groups", label_groups=label_groups, group=g, **kwargs)
            for g in range(len(label_groups))
        ]

    def _build_table(self, vid: str, mode: str) -> _VolumeTable:
        # Counting is the costly part; the store memoises it so that further datasets (folds, groups) reuse it.
        sv_ids, counts = self.store.memo(
            "supervoxel_slice_counts", vid, lambda: slice_label_counts(self.store.supervoxels(vid))
        )
        depth = counts.shape[1]
        if self.setting == 2:
            label_ids, label_counts = self.store.memo(
                "label_slice_counts", vid, lambda: slice_label_counts(self.store.label(vid))
            )
            allowed = ~_exclusion_from_counts(label_ids, label_counts, self.excluded_labels, mode)
        else:
            allowed = np.ones(depth, dtype=bool)
        present = (counts > 0) & allowed[None, :]
        big = np.maximum(counts[:, :-1], counts[:, 1:]) >= self.min_size
        valid = present[:, :-1] & present[:, 1:] & big
        return _VolumeTable(vid, sv_ids, counts, allowed, valid)

    @property
    def volume_ids(self) -> list[str]:
        """Ids of the volumes episodes are actually drawn from (volumes without a usable pair are skipped)."""
        return [t.volume_id for t in self._tables]

    def __len__(self) -> int:
        return self.length

    def _draw(self, rng: np.random.Generator) -> tuple[_VolumeTable, int, int, int]:
        """(volume table, supervoxel row k, first slice z, gap g) of the pair ``(z, z + g)`` (``g = 0``: one slice)."""
        table = self._tables[int(rng.integers(len(self._tables)))]
        n_sv = len(table.sv_ids)
        for _ in range(_MAX_TRIES):
            k = int(rng.integers(n_sv))
            present = (table.counts[k] > 0) & table.allowed
            runs = _runs(present)
            if not runs:
                continue
            start, end = runs[int(rng.integers(len(runs)))]
            # Drawn only when asked for, so that the defaults keep the seeded episodes of earlier runs.
            gap = int(rng.integers(1, min(self.max_slice_gap, end - start) + 1)) if self.max_slice_gap > 1 else 1
            if self.same_slice_fraction > 0 and rng.random() < self.same_slice_fraction:
                gap = 0
            z = int(rng.integers(start, end - gap + 1))  # z and z + gap both inside the run
            if max(table.counts[k, z], table.counts[k, z + gap]) >= self.min_size:
                return table, k, z, gap
        rows, cols = np.nonzero(table.valid_pairs)
        pick = int(rng.integers(len(rows)))
        return table, int(rows[pick]), int(cols[pick]), 1

    def _augmented(self, episode: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """``augment`` applied to ``episode``, images clipped to [-1, 1] and masks re-binarised.

        A draw that leaves the support mask empty (a small supervoxel scaled or deformed away) is redrawn, up to
        ``_MAX_AUGMENT_TRIES`` times, then the episode stays un-augmented: training needs a support pixel, and
        the un-augmented support mask has one by construction.
        """
        for _ in range(_MAX_AUGMENT_TRIES):
            if hasattr(self.augment, "set_random_state"):
                self.augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
            augmented = dict(self.augment(dict(episode)))
            for key in ("support_image", "query_image"):
                img = np.clip(convert_to_numpy(augmented[key], dtype=np.float32), -1.0, 1.0)
                augmented[key] = torch.from_numpy(img)
            for key in ("support_label", "query_label"):
                augmented[key] = torch.from_numpy((convert_to_numpy(augmented[key]) > 0.5).astype(np.float32))
            if augmented["support_label"].any():
                return augmented
        return episode

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"Episode index {index} is outside 0..{self.length - 1}.")
        rng = self._rng(index)
        table, k, z, gap = self._draw(rng)
        support_z, query_z = (z, z + gap) if rng.random() >= 0.5 else (z + gap, z)
        sv_id = int(table.sv_ids[k])
        image = self.store.image(table.volume_id)
        sv = self.store.supervoxels(table.volume_id)
        # Slices are cut and converted in NumPy: tiny torch ops are slow in DataLoader workers sharing few cores.
        episode: dict[str, Any] = {
            "support_image": torch.from_numpy(image[None, :, :, support_z].copy()),
            "support_label": torch.from_numpy((sv[None, :, :, support_z] == sv_id).astype(np.float32)),
            "query_image": torch.from_numpy(image[None, :, :, query_z].copy()),
            "query_label": torch.from_numpy((sv[None, :, :, query_z] == sv_id).astype(np.float32)),
        }
        keys = {
            "support_image": f"{table.volume_id}/{support_z}", "support_label": f"{table.volume_id}/{support_z}/{sv_id}",
            "query_image": f"{table.volume_id}/{query_z}", "query_label": f"{table.volume_id}/{query_z}/{sv_id}",
        }
        if self.augment is not None:
            original = episode
            episode = self._augmented(episode, rng)
            # A side that augmentation changed is no longer the stored slice: it must be encoded afresh.
            keys = {k: (v if torch.equal(episode[k], original[k]) else "") for k, v in keys.items()}
        for key in ("support_image", "query_image"):
            if episode[key].shape[0] == 1:
                episode[key] = torch.from_numpy(np.repeat(episode[key].numpy(), 3, axis=0))
        episode.update(
            episode_index=index, volume_id=table.volume_id, supervoxel_id=sv_id,
            support_slice=int(support_z), query_slice=int(query_z),
            **{f"{k}{LATENT_KEY_SUFFIX}": v for k, v in keys.items()},
        )
        return episode


class EpisodeSampler(Sampler[int]):
    """Episode indices in order, resumable in the middle of an epoch.

    An ignite engine resumed from a mid-epoch checkpoint counts on from the checkpoint's iteration but iterates
    its loader from the start again, so the episodes of the interrupted epoch would be trained twice and its
    last ones never. :class:`~monai_sdfsmis.engines.checkpoints.ResumeFromCheckpoint` calls :meth:`set_start`
    with the number of samples already consumed; with a seeded :class:`EpisodeDataset` (episode ``i`` a pure
    function of ``(seed, epoch, i)``) the resumed run then sees exactly the episodes an uninterrupted run sees.

    Parameters
    ----------
    data_source
        The dataset (only its length is used) or the number of episodes per epoch.
    num_replicas, rank
        Distributed training: replica ``rank`` of ``num_replicas`` yields indices ``rank, rank + num_replicas,
        ...`` (padded by wrapping around so every replica yields as many, like ``DistributedSampler`` with
        ``even_divisible=True``). ``None``: taken from ``torch.distributed`` when it is initialised, else 1 and 0.
    """

    def __init__(self, data_source: Any, num_replicas: int | None = None, rank: int | None = None) -> None:
        length = int(data_source) if isinstance(data_source, (int, np.integer)) else len(data_source)
        if length < 1:
            raise ValueError(f"EpisodeSampler needs at least one episode, got a length of {length}.")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            num_replicas = (dist.get_world_size() if initialised else 1) if num_replicas is None else num_replicas
            rank = (dist.get_rank() if initialised else 0) if rank is None else rank
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank must be in 0..{int(num_replicas) - 1}, got {rank}.")
        self.length = length
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.num_samples = math.ceil(length / self.num_replicas)
        self._start = 0

    def set_start(self, consumed: int) -> None:
        """Make the next pass skip its first ``consumed`` indices (later passes start at the beginning again)."""
        consumed = int(consumed)
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"cannot skip {consumed} of the {self.num_samples} indices of an epoch.")
        self._start = consumed

    @property
    def start(self) -> int:
        """Indices the next pass skips."""
        return self._start

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        total = self.num_samples * self.num_replicas
        return iter([i % self.length for i in range(self.rank + start * self.num_replicas, total, self.num_replicas)])

    def __len__(self) -> int:
        # The full epoch, also on a resumed pass: ignite takes the epoch length from the checkpoint anyway, and a
        # DataLoader whose length changed between passes would confuse progress bars and schedulers.
        return self.num_samples
