"""Labelled 2-D slices for the supervised mode (SDSeg): an image slice and one organ's ground-truth mask.

Where the few-shot modes never read a label map for training, the supervised mode
(:class:`~monai_sdfsmis.networks.supervised.SupervisedLatentSegmenter`) learns from the user's labelled volumes
directly: each item is one slice and the binary mask of one organ in it, with the organ's index so that one
network serves every organ.
"""

from __future__ import annotations

__all__ = ["LabelledSliceDataset"]

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_numpy

from monai_sdfsmis.data.episodes import slice_label_counts
from monai_sdfsmis.data.seeded import SeededDataset
from monai_sdfsmis.data.volumes import VolumeStore

_MAX_AUGMENT_TRIES = 8


class LabelledSliceDataset(SeededDataset):
    """Map-style dataset of ``(slice, organ mask, organ index)`` items from labelled volumes.

    Item ``i``: an organ drawn uniformly from ``organ_ids``; with probability ``foreground_fraction`` a slice that
    contains it (a volume drawn uniformly among those that have it, then one of its organ slices), otherwise a slice
    drawn uniformly among all slices of the training volumes (mostly without the organ: the network must learn to
    answer "nothing here" as well). With a ``seed`` the item depends only on ``(seed, epoch, i)``.

    Parameters
    ----------
    store
        Volumes with label maps (every one of ``ids`` needs one).
    organ_ids
        Label ids the network learns, in the order of its organ conditions (CHAOS ``1, 2, 3, 4``).
    ids
        Training volume ids (default: all of ``store``).
    length
        Items per epoch.
    foreground_fraction
        Probability that an item's slice contains its organ, in ``[0, 1]``.
    augment
        Callable on ``{"image": [1, H, W], "label": [1, H, W]}`` float32 tensors (e.g.
        :class:`~monai_sdfsmis.transforms.augmentation.RPTAugmentd` with ``support_keys=("image", "label")``); if it
        has ``set_random_state`` it is re-seeded from the item's generator. Images are clipped to ``[-1, 1]`` and masks
        re-binarised afterwards; a draw that empties a foreground slice's mask is redrawn (8 tries, then the slice
        stays as it is).
    seed
        Makes item ``i`` a pure function of ``(seed, epoch, i)``; ``None`` draws fresh randomness.

    Returns (``__getitem__``)
    -------------------------
    dict
        ``image``: float32 ``[3, H, W]`` in ``[-1, 1]``; ``label``: float32 ``[1, H, W]`` in ``{0, 1}``;
        ``organ_index`` (int, position in ``organ_ids``), ``organ_id`` (int), ``volume_id`` (str), ``slice`` (int).
    """

    def __init__(
        self,
        store: VolumeStore,
        organ_ids: Sequence[int],
        ids: Sequence[str] | None = None,
        length: int = 1000,
        foreground_fraction: float = 0.8,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int | None = None,
    ) -> None:
        if int(length) < 1:
            raise ValueError(f"length (items per epoch) must be at least 1, got {length}.")
        if not 0.0 <= float(foreground_fraction) <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}.")
        super().__init__(seed)
        self.organ_ids = [int(v) for v in organ_ids]
        if not self.organ_ids or len(set(self.organ_ids)) != len(self.organ_ids) or min(self.organ_ids) < 1:
            raise ValueError(f"organ_ids must be distinct positive label ids, got {list(organ_ids)}.")
        self.store = store
        self.ids = [str(i) for i in (store.ids if ids is None else ids)]
        if not self.ids:
            raise ValueError("LabelledSliceDataset needs at least one training volume id.")
        unlabelled = [vid for vid in self.ids if not store.has_label(vid)]
        if unlabelled:
            raise ValueError(
                f"the supervised mode trains on label maps, but volumes {unlabelled[:5]} "
                f"(e.g. '{store.record(unlabelled[0]).image}') have none"
            )
        self.length = int(length)
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment

        depths = [int(store.image(vid).shape[-1]) for vid in self.ids]
        self._all_slices = np.array([(v, z) for v, d in enumerate(depths) for z in range(d)], dtype=np.int64)
        # Per organ: the (volume index, slice) pairs where it is present.
        self._organ_slices: list[np.ndarray] = []
        for organ in self.organ_ids:
            pairs = []
            for v, vid in enumerate(self.ids):
                label_ids, counts = store.memo("label_slice_counts", vid, lambda vid=vid: slice_label_counts(store.label(vid)))
                rows = np.flatnonzero(label_ids == organ)
                if rows.size:
                    pairs.extend((v, int(z)) for z in np.flatnonzero(counts[rows[0]] > 0))
            if not pairs:
                raise ValueError(
                    f"organ label {organ} appears in none of the training volumes' label maps "
                    f"(e.g. '{store.record(self.ids[0]).label}'); check organ_ids"
                )
            self._organ_slices.append(np.asarray(pairs, dtype=np.int64))

    def __len__(self) -> int:
        return self.length

    def _augmented(self, item: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        had_organ = bool(item["label"].any())
        for _ in range(_MAX_AUGMENT_TRIES):
            if hasattr(self.augment, "set_random_state"):
                self.augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
            augmented = dict(self.augment(dict(item)))
            image = np.clip(convert_to_numpy(augmented["image"], dtype=np.float32), -1.0, 1.0)
            label = (convert_to_numpy(augmented["label"]) > 0.5).astype(np.float32)
            if label.any() or not had_organ:
                return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"Item index {index} is outside 0..{self.length - 1}.")
        rng = self._rng(index)
        organ_index = int(rng.integers(len(self.organ_ids)))
        pool = self._organ_slices[organ_index] if rng.random() < self.foreground_fraction else self._all_slices
        volume, z = (int(v) for v in pool[int(rng.integers(len(pool)))])
        vid = self.ids[volume]
        organ = self.organ_ids[organ_index]
        item = {
            "image": torch.from_numpy(np.asarray(self.store.image(vid)[None, :, :, z], dtype=np.float32).copy()),
            "label": torch.from_numpy((np.asarray(self.store.label(vid))[None, :, :, z] == organ).astype(np.float32)),
        }
        if self.augment is not None:
            item = self._augmented(item, rng)
        return {
            "image": torch.from_numpy(np.repeat(item["image"].numpy(), 3, axis=0)),
            "label": item["label"],
            "organ_index": organ_index,
            "organ_id": organ,
            "volume_id": vid,
            "slice": z,
        }
