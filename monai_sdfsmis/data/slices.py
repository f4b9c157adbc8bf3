"""2-D slices and supervoxel masks for training the no-prior autoencoder (stage 1).

The autoencoder of the no-prior mode (``monai_sdfsmis.networks.autoencoder``) has to reconstruct
the two kinds of input SD-FSMIS encodes: image slices and binary masks replicated to 3 channels in
{-1, 1} (as SD's VAE takes them). Masks come from the **supervoxel** pseudo-labels,
never from the ground truth: this module does not read label maps at all.
"""

from __future__ import annotations

__all__ = ["SliceDataset", "split_holdout", "holdout_slices", "organ_mask_slices"]

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor

from monai_sdfsmis.data.episodes import supervoxel_slice_counts
from monai_sdfsmis.data.seeded import SeededDataset
from monai_sdfsmis.data.volumes import VolumeStore


class SliceDataset(SeededDataset):
    """Map-style dataset of single slices: normalised images or supervoxel masks, never ground truth.

    Item ``i`` is, with probability ``mask_fraction``, a **mask**: a training volume drawn uniformly,
    one of its supervoxels drawn uniformly, one slice in which that supervoxel covers at least
    ``min_mask_pixels`` pixels, and the supervoxel's binary mask there mapped to {-1, 1}; otherwise an
    **image**: a slice drawn uniformly among all slices of the training volumes. Both are replicated
    to 3 channels, the input convention of SD's VAE.

    Parameters
    ----------
    store
        Volumes with supervoxel maps (needed only when ``include_masks``); label maps are never read.
    ids
        Volume ids to draw from (default: all of ``store``).
    include_masks
        Draw masks as well as images; ``False`` gives image slices only.
    mask_fraction
        Probability that an item is a mask (when ``include_masks``), in (0, 1).
    length
        Items per epoch; default: the number of slices of the ``ids`` volumes.
    min_mask_pixels
        Smallest supervoxel cross-section used as a mask.
    augment
        Callable on ``{"image": [1, H, W] float32 tensor}`` applied before channel replication (e.g. a
        MONAI dictionary transform with ``keys="image"``); if it has ``set_random_state`` it is
        re-seeded from the item's generator. Masks are re-binarised to {-1, 1} afterwards.
    seed
        Makes item ``i`` a pure function of ``(seed, epoch, i)`` (reproducible with any number of
        DataLoader workers); ``None`` draws fresh randomness.

    Returns (``__getitem__``)
    -------------------------
    dict
        ``image``: float32 ``[3, H, W]`` in [-1, 1]; ``is_mask``: bool scalar tensor;
        ``volume_id`` (str); ``slice`` (int).
    """

    def __init__(
        self,
        store: VolumeStore,
        ids: Sequence[str] | None = None,
        include_masks: bool = True,
        mask_fraction: float = 0.5,
        length: int | None = None,
        min_mask_pixels: int = 16,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int | None = None,
    ) -> None:
        if include_masks and not 0.0 < float(mask_fraction) < 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1) when include_masks is True, got {mask_fraction}.")
        if length is not None and int(length) < 1:
            raise ValueError(f"length must be a positive integer or None, got {length}.")
        if int(min_mask_pixels) < 1:
            raise ValueError(f"min_mask_pixels must be at least 1, got {min_mask_pixels}.")
        super().__init__(seed)
        self.store = store
        self.ids = [str(i) for i in (store.ids if ids is None else ids)]
        if not self.ids:
            raise ValueError("SliceDataset needs at least one volume id.")
        for vid in self.ids:
            store.record(vid)  # an unknown id fails here, naming it
        self.include_masks = bool(include_masks)
        self.mask_fraction = float(mask_fraction) if include_masks else 0.0
        self.min_mask_pixels = int(min_mask_pixels)
        self.augment = augment

        depths = [int(store.image(vid).shape[-1]) for vid in self.ids]
        # (volume index, slice) of every image slice: images are drawn uniformly over slices.
        self._slices = np.array([(v, z) for v, d in enumerate(depths) for z in range(d)], dtype=np.int64)
        self.length = len(self._slices) if length is None else int(length)

        # Per volume: supervoxel ids [K] and, per supervoxel, the slices it covers enough.
        self._mask_tables: list[tuple[str, np.ndarray, list[np.ndarray]]] = []
        if self.include_masks:
            missing = [vid for vid in self.ids if not store.has_supervoxels(vid)]
            if missing:
                raise ValueError(
                    f"Volumes {missing[:5]} (e.g. '{store.record(missing[0]).image}') have no supervoxel file; "
                    "masks for the autoencoder come from supervoxels (compute them with "
                    "monai_sdfsmis.data.supervoxels.write_supervoxels) or set include_masks=False."
                )
            for vid in self.ids:
                sv_ids, counts = supervoxel_slice_counts(store.supervoxels(vid))
                keep = (counts >= self.min_mask_pixels).any(axis=1)
                slices = [np.flatnonzero(row >= self.min_mask_pixels) for row in counts[keep]]
                if keep.any():
                    self._mask_tables.append((vid, sv_ids[keep], slices))
            if not self._mask_tables:
                where = store.record(self.ids[0]).image.parent
                raise ValueError(
                    f"No supervoxel of the volumes {self.ids[:10]} in '{where}' covers {self.min_mask_pixels} pixels "
                    "of any slice; lower min_mask_pixels or check the supervoxel maps."
                )

    def __len__(self) -> int:
        return self.length

    @property
    def num_slices(self) -> int:
        """Image slices available (all slices of the ``ids`` volumes)."""
        return len(self._slices)

    def draw_image(self, rng: np.random.Generator) -> tuple[torch.Tensor, str, int]:
        """A uniformly drawn image slice ``[1, H, W]`` in [-1, 1], its volume id and slice index."""
        v, z = self._slices[int(rng.integers(len(self._slices)))]
        vid = self.ids[int(v)]
        image = torch.tensor(self.store.image(vid)[:, :, int(z)], dtype=torch.float32)[None]
        return image, vid, int(z)

    def draw_mask(self, rng: np.random.Generator) -> tuple[torch.Tensor, str, int]:
        """A supervoxel mask ``[1, H, W]`` in {0, 1} (volume, supervoxel, slice drawn in that order)."""
        if not self._mask_tables:
            raise ValueError("This SliceDataset was built with include_masks=False.")
        vid, sv_ids, slices = self._mask_tables[int(rng.integers(len(self._mask_tables)))]
        k = int(rng.integers(len(sv_ids)))
        z = int(rng.choice(slices[k]))
        mask = torch.tensor(self.store.supervoxels(vid)[:, :, z] == sv_ids[k], dtype=torch.float32)[None]
        return mask, vid, z

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"Slice index {index} is outside 0..{self.length - 1}.")
        rng = self._rng(index)
        is_mask = bool(rng.random() < self.mask_fraction)
        if is_mask:
            mask, vid, z = self.draw_mask(rng)
            image = mask * 2 - 1
        else:
            image, vid, z = self.draw_image(rng)
        if self.augment is not None:
            if hasattr(self.augment, "set_random_state"):
                self.augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
            image = self.augment({"image": image})["image"]
        image = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
        # Interpolating augmentations blur mask edges; the VAE must see the binary masks SD-FSMIS encodes.
        image = torch.where(image > 0, 1.0, -1.0) if is_mask else image.clamp(-1.0, 1.0)
        if image.shape[0] == 1:
            image = image.repeat(3, 1, 1)
        return {"image": image, "is_mask": torch.tensor(is_mask), "volume_id": vid, "slice": z}


def split_holdout(
    ids: Sequence[str], fraction: float = 0.1, min_holdout: int = 1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split volume ids into training and held-out volumes (for reconstruction metrics).

    Parameters
    ----------
    ids
        Volume ids.
    fraction
        Share of the volumes held out (rounded, at least ``min_holdout``, at most ``len(ids) - 1``).
    min_holdout
        Smallest number of held-out volumes.
    seed
        Seed of the random choice.

    Returns
    -------
    (train_ids, holdout_ids)
        Both in the order of ``ids``.
    """
    ids = [str(i) for i in ids]
    if len(ids) < 2:
        raise ValueError(f"split_holdout needs at least 2 volume ids to keep one for training, got {ids}.")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
    if min_holdout < 0:
        raise ValueError(f"min_holdout must be non-negative, got {min_holdout}.")
    n_holdout = min(max(int(round(fraction * len(ids))), min_holdout), len(ids) - 1)
    chosen = set(np.random.default_rng(seed).choice(len(ids), size=n_holdout, replace=False).tolist())
    return [v for i, v in enumerate(ids) if i not in chosen], [v for i, v in enumerate(ids) if i in chosen]


def holdout_slices(
    store: VolumeStore,
    ids: Sequence[str],
    num_slices: int = 64,
    num_masks: int | None = None,
    min_mask_pixels: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A fixed sample of image slices and supervoxel masks of held-out volumes, for reconstruction metrics.

    Parameters
    ----------
    store, ids
        Volumes never seen in training (e.g. a fold's test volumes); only images and supervoxels are read.
    num_slices
        Image slices drawn (uniformly, without repetition when there are enough).
    num_masks
        Supervoxel masks drawn (default: ``num_slices``).
    min_mask_pixels
        Smallest supervoxel cross-section used.
    seed
        Seed of the draw.

    Returns
    -------
    dict
        ``images``: float32 ``[N, 3, H, W]`` in [-1, 1]; ``masks``: float32 ``[M, 1, H, W]`` in {0, 1}
        (the input format of :func:`monai_sdfsmis.networks.autoencoder.reconstruction_metrics`).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}.")
    num_masks = num_slices if num_masks is None else int(num_masks)
    dataset = SliceDataset(store, ids, include_masks=num_masks > 0, min_mask_pixels=min_mask_pixels, seed=seed)
    rng = np.random.default_rng(seed)
    picks = rng.permutation(dataset.num_slices)[:num_slices] if num_slices <= dataset.num_slices else None
    images = []
    for i in range(num_slices):
        if picks is not None:
            v, z = dataset._slices[int(picks[i])]
            images.append(torch.tensor(store.image(dataset.ids[int(v)])[:, :, int(z)], dtype=torch.float32)[None])
        else:
            images.append(dataset.draw_image(rng)[0])
    masks = [dataset.draw_mask(rng)[0] for _ in range(num_masks)]
    out = {"images": torch.stack(images).repeat(1, 3, 1, 1)}
    out["masks"] = torch.stack(masks) if masks else torch.zeros(0, 1, *images[0].shape[-2:])
    return out


def organ_mask_slices(store: VolumeStore, ids: Sequence[str], organ_ids: Sequence[int], count: int, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` ground-truth organ masks ``[N, 1, H, W]`` (float32, {0, 1}) from organ slices of ``ids``.

    An evaluation-only diagnostic: decoding them through the frozen autoencoder bounds the Dice stage 2 can reach.
    """
    candidates = []
    for vid in ids:
        label = store.label(vid)
        for organ in organ_ids:
            candidates.extend((vid, organ, int(z)) for z in np.flatnonzero((label == organ).any(axis=(0, 1))))
    if not candidates:
        raise ValueError(f"The volumes {list(ids)} contain none of the organs {list(organ_ids)}.")
    picks = np.random.default_rng(seed).permutation(len(candidates))[:count]
    masks = [store.label(candidates[i][0])[:, :, candidates[i][2]] == candidates[i][1] for i in picks]
    return torch.tensor(np.stack(masks), dtype=torch.float32)[:, None]
