"""The seeding shared by the training datasets: item ``i`` a pure function of ``(seed, epoch, i)``."""

from __future__ import annotations

__all__ = ["SeededDataset"]

import numpy as np
from torch.utils.data import Dataset


class SeededDataset(Dataset):
    """Map-style dataset whose items draw from a generator seeded by ``(seed, epoch, index)``.

    So DataLoader workers and a ``DistributedSampler`` give the same items on every run, in any order of access;
    ``seed=None`` draws fresh randomness. Subclasses call ``super().__init__(seed)`` and draw through :meth:`_rng`.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}.")
        self.seed = None if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the items of a seeded dataset between epochs (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, self.epoch, index])
