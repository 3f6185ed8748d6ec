"""Deterministic, resumable, shardable batch order.

The permutation of an epoch is a pure function of ``(seed, epoch)`` (a private
``torch.Generator``, independent of the global RNGs), so a checkpoint only needs the seed,
the epoch and the number of batches already taken to reproduce the rest of the epoch
exactly. Sharding follows ``torch.utils.data.DistributedSampler``: every rank draws the same
permutation, it is padded by wrapping around to a multiple of ``world_size``, and rank ``r``
takes positions ``r, r + world, ...`` — so all ranks run the same number of batches (which
DDP's collectives need) and the union of the ranks' i-th batches is the i-th batch of a
single process with ``world_size`` times the batch size.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch


class BatchOrder:
    """Batches of window positions ``0..num_windows-1``.

    ``shuffle``: a fresh permutation each epoch (training); else in order (evaluation).
    ``pad``: pad the shard to an equal length on every rank (training). Evaluation uses
    ``pad=False`` so no window counts twice in the metrics.
    """

    def __init__(self, num_windows: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True, limit_batches: Optional[int] = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if limit_batches is not None and limit_batches <= 0:
            raise ValueError(f"limit_batches must be positive or None, got {limit_batches}")
        self.num_windows = num_windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.limit_batches = limit_batches

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's window positions for ``epoch`` (int64)."""
        n = self.num_windows
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        if self.world_size > 1:
            if self.pad and n % self.world_size:
                extra = self.world_size - n % self.world_size
                order = np.concatenate([order, np.resize(order, extra)])
            order = order[self.rank::self.world_size]
        return order.astype(np.int64)

    def __len__(self) -> int:
        n = self.num_windows
        if self.world_size > 1:
            n = -(-n // self.world_size) if self.pad else len(range(self.rank, n, self.world_size))
        full = -(-n // self.batch_size)
        return full if self.limit_batches is None else min(full, self.limit_batches)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[np.ndarray]:
        """Positions of each batch of ``epoch``, starting after the first ``skip`` batches."""
        order = self.indices(epoch)
        for b in range(skip, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]
