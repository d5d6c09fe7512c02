"""Samplers: an infinite, deterministic training stream and an exactly-once inference split.

The training stream is a pure function of ``(seed, position)``: global position ``p`` is in epoch
``e = p // size`` and maps to ``perm_e[p % size]``, where ``perm_e`` is drawn from a ``torch.Generator`` seeded
with :func:`derive_seed` ``(seed, e)``. Nothing carries over from one epoch to the next, so a resumed run needs only
the position to continue the exact same order, whatever happened before.
"""
import itertools
import logging
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Sampler

from ..utils import comm

__all__ = ["TrainingSampler", "TrainingBatchSampler", "InferenceSampler", "derive_seed"]

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed that is a pure function of ``seed`` and ``keys``.

    Used to seed one ``torch.Generator`` per epoch (sampler) and per sample position (augmentation), so that
    neighbouring epochs or positions get unrelated random streams. The same inputs give the same output on
    every machine and Python version (SplitMix64, no hashing of Python objects).

    Args:
        seed: the base seed (any non-negative integer).
        keys: further integers, e.g. a purpose tag and an epoch or a position.
    """
    x = _splitmix64(int(seed) & _MASK64)
    for key in keys:
        x = _splitmix64(x ^ (int(key) & _MASK64))
    return x >> 1


# Purpose tags so that the sampler and the augmentation never draw from the same stream.
SAMPLER_TAG = 0
AUGMENT_TAG = 1
WORKER_TAG = 2


class TrainingSampler(Sampler[int]):
    """Infinite stream of dataset indices, sharded by rank.

    The global stream is a pure function of ``(seed, position)`` (see the module docstring). Rank ``r`` of
    ``W`` processes yields global positions ``start + r``, ``start + r + W``, ``start + r + 2W``, ..., so the
    ranks together walk the global stream exactly once, in order.

    Iterating costs one ``torch.randperm`` per epoch (cached), not per item.

    Args:
        size: number of samples in the dataset (> 0).
        shuffle: permute each epoch; if False, epoch order is ``0..size-1``.
        seed: base seed, the same on all ranks. None draws one with ``comm.shared_random_seed()``.
        start: global position where the next ``__iter__`` begins (see :meth:`set_start`).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None, start: int = 0) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"TrainingSampler(size={size!r}): size must be a positive int (the dataset's length).")
        self._size = size
        self._shuffle = shuffle
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()
        self._cached_epoch = -1
        self._cached_perm: List[int] = []
        self.set_start(start)

    @property
    def seed(self) -> int:
        """The base seed in use (the drawn one when ``seed=None`` was given)."""
        return self._seed

    @property
    def world_size(self) -> int:
        """Number of processes the stream is sharded over (fixed at construction)."""
        return self._world_size

    @property
    def start(self) -> int:
        """The global position where the next ``__iter__`` begins."""
        return self._start

    def set_start(self, position: int) -> None:
        """Makes the next ``__iter__`` begin at global ``position`` (iterators already created are unaffected).

        Args:
            position: a non-negative global position; e.g. ``iteration * total_batch_size`` on resume.
        """
        if position < 0:
            raise ValueError(f"TrainingSampler.set_start({position}): position must be >= 0.")
        self._start = int(position)

    def _epoch_perm(self, epoch: int) -> List[int]:
        if epoch != self._cached_epoch:
            if self._shuffle:
                g = torch.Generator()
                g.manual_seed(derive_seed(self._seed, SAMPLER_TAG, epoch))
                self._cached_perm = torch.randperm(self._size, generator=g).tolist()
            else:
                self._cached_perm = list(range(self._size))
            self._cached_epoch = epoch
        return self._cached_perm

    def iter_with_positions(self) -> Iterator[Tuple[int, int]]:
        """Like ``__iter__`` but yields ``(global_position, dataset_index)`` pairs."""
        size, stride = self._size, self._world_size
        position = self._start + self._rank
        while True:
            epoch = position // size
            chunk = self._epoch_perm(epoch)[position - epoch * size :: stride]
            yield from zip(range(position, position + len(chunk) * stride, stride), chunk)
            position += len(chunk) * stride

    def __iter__(self) -> Iterator[int]:
        for _, index in self.iter_with_positions():
            yield index


class InferenceSampler(Sampler[int]):
    """Every index of ``range(size)`` exactly once across all ranks, in contiguous shards.

    Rank ``r`` gets the ``r``-th of ``W`` contiguous shards; the first ``size % W`` shards hold one extra
    sample. Order within a shard is increasing, so concatenating the shards in rank order gives ``0..size-1``.
    """

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"InferenceSampler(size={size!r}): size must be a positive int (the dataset's length).")
        self._size = size
        self._local_indices = self._get_local_indices(size, comm.get_world_size(), comm.get_rank())

    @staticmethod
    def _get_local_indices(total_size: int, world_size: int, rank: int) -> range:
        shard_size = total_size // world_size
        left = total_size % world_size
        shard_sizes: Sequence[int] = [shard_size + int(r < left) for r in range(world_size)]
        begin = sum(shard_sizes[:rank])
        return range(begin, begin + shard_sizes[rank])

    def __iter__(self) -> Iterator[int]:
        return iter(self._local_indices)

    def __len__(self) -> int:
        return len(self._local_indices)


class TrainingBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Groups a :class:`TrainingSampler`'s stream into batches of ``(global_position, dataset_index)`` pairs.

    With per-process batch size ``b`` and ``W`` processes, rank ``r``'s batch ``j`` holds global positions
    ``j*b*W + r + W*m`` for ``m < b``: the union over ranks of batch ``j`` is exactly batch ``j`` of a single
    process with batch size ``b*W``. The positions travel with the indices so that the dataset wrapper can seed
    each sample's augmentation from ``(seed, position)``.

    Args:
        sampler: the per-rank training stream.
        batch_size: per-process batch size.
    """

    def __init__(self, sampler: TrainingSampler, batch_size: int) -> None:
        if batch_size <= 0:
            raise ValueError(f"TrainingBatchSampler(batch_size={batch_size}): batch_size must be positive.")
        self.sampler = sampler
        self.batch_size = batch_size
        self.total_batch_size = batch_size * sampler.world_size

    def set_start_iter(self, start_iter: int) -> None:
        """Makes the next ``__iter__`` begin with batch ``start_iter`` (global position
        ``start_iter * total_batch_size``)."""
        if start_iter < 0:
            raise ValueError(f"set_start_iter({start_iter}): the iteration must be >= 0.")
        self.sampler.set_start(start_iter * self.total_batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        stream = self.sampler.iter_with_positions()
        while True:
            yield list(itertools.islice(stream, self.batch_size))
