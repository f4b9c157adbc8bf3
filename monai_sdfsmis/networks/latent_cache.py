"""Encode each training slice and supervoxel mask once: a cache of frozen-VAE posteriors.

Stage 2 of SD-FSMIS (and of the no-prior mode) encodes four images per episode (support image and
mask, query image and mask) with a **frozen** VAE. Episodes are drawn from a finite set of slices and
supervoxel masks, so most encodings repeat: with the no-prior mode's small autoencoder at 128x128 they
are about a third of a CPU training step. :class:`LatentCache` keeps the encoder's output (the
posterior parameters, so that ``vae_sample_in_training`` still draws a fresh sample every time) under
a key naming what was encoded (:class:`~monai_sdfsmis.data.episodes.EpisodeDataset` gives
``volume/slice`` for an image and ``volume/slice/supervoxel`` for a mask, and an empty key for a side
that augmentation changed, which is then encoded afresh and not stored).

One cache belongs to one frozen encoder and one dataset (its intensity preset and in-plane size):
the keys do not encode those.
"""

from __future__ import annotations

__all__ = ["LatentCache"]

from collections.abc import Sequence

import torch
from torch import nn


class LatentCache:
    """Posterior parameters of frozen-encoder calls, keyed by what was encoded.

    Parameters
    ----------
    max_items
        Stop storing new entries once this many are held (``None``: no limit). At 256x256 an entry is
        ``[8, 32, 32]`` float32, 32 KiB; the CHAOS training volumes give some 10^4 distinct entries.
    device
        Where entries are kept (default: where the encoder puts them, e.g. the GPU).
    dtype
        Storage dtype (default float32; ``torch.bfloat16`` halves the memory at bf16 rounding).

    Attributes
    ----------
    hits, misses
        Items served from the cache and items encoded (keyed or not) since construction.

    Examples
    --------
    >>> cache = LatentCache()                                        # doctest: +SKIP
    >>> params = cache.posteriors(net, images, ["7/12", "", "7/13"])  # doctest: +SKIP
    """

    def __init__(
        self, max_items: int | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        if max_items is not None and int(max_items) < 1:
            raise ValueError(f"max_items must be a positive integer or None, got {max_items}.")
        self.max_items = None if max_items is None else int(max_items)
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self._entries: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def clear(self) -> None:
        """Drop every entry (e.g. after the encoder changed) and reset the counters."""
        self._entries.clear()
        self.hits = self.misses = 0

    @property
    def hit_rate(self) -> float:
        """Share of items served from the cache (0 before the first call)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @torch.no_grad()
    def posteriors(self, network: nn.Module, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """Posterior parameters ``[N, 2C, h, w]`` of ``images``, encoding only the items not cached.

        Parameters
        ----------
        network
            Has ``encode_posterior(images [M, 3, H, W]) -> [M, 2C, h, w]`` (:class:`~monai_sdfsmis.networks.sdfsmis.SDFSMIS`),
            called once for all the misses.
        images
            ``[N, 3, H, W]`` in ``[-1, 1]`` (masks already mapped to ``{-1, 1}``).
        keys
            ``N`` keys; ``""`` (or ``None``) marks an item that must be encoded and not stored.

        Returns
        -------
        torch.Tensor
            ``[N, 2C, h, w]`` on ``images``' device, in the encoder's dtype (float32 when every item was cached).
        """
        keys = ["" if k is None else str(k) for k in keys]
        if images.ndim != 4 or len(keys) != images.shape[0]:
            raise ValueError(f"need one key per image: {len(keys)} keys for images of shape {tuple(images.shape)}.")
        # A key repeated inside the batch is encoded once.
        missing: dict[str, int] = {}
        fresh: list[int] = []
        for i, key in enumerate(keys):
            if not key:
                fresh.append(i)
            elif key not in self._entries and key not in missing:
                missing[key] = i
        rows = fresh + list(missing.values())
        encoded: dict[int, torch.Tensor] = {}
        if rows:
            out = network.encode_posterior(images[rows])
            encoded = {row: out[j] for j, row in enumerate(rows)}
            for key, row in missing.items():
                if self.max_items is None or len(self._entries) < self.max_items:
                    self._entries[key] = self._stored(out[rows.index(row)])
        self.misses += len(rows)
        self.hits += len(keys) - len(rows)
        reference = next(iter(encoded.values())) if encoded else None
        items = []
        for i, key in enumerate(keys):
            if i in encoded:
                items.append(encoded[i])
            elif key in self._entries:
                items.append(self._entries[key])
            else:  # stored under the same key earlier in this batch, but the cache was full
                items.append(encoded[missing[key]])
        device = images.device
        dtype = reference.dtype if reference is not None else torch.float32
        return torch.stack([t.to(device=device, dtype=dtype) for t in items])

    def _stored(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach()
        if self.device is not None or self.dtype is not None:
            value = value.to(device=self.device or value.device, dtype=self.dtype or value.dtype)
        return value.clone()
