"""Samplers: sharded infinite (training, resumable), epoch (evaluation) and the rank helpers they use.

The infinite sampler defines one *global* stream of indices — epoch ``e`` is a permutation of the
dataset seeded by ``(seed, e)`` (or the identity without shuffling), epochs concatenated — and rank
``r`` of ``W`` takes global positions ``start + r, start + r + W, ...``. Its state is the number of
global samples consumed, so a run resumed with a different world size continues at the same place
of the same stream.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def default_rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Fill missing rank / world size from torch.distributed (0 / 1 when it is not initialised)."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def epoch_permutation(sample_count: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order of the dataset in one epoch; the same on every rank and in every process."""
    if not shuffle:
        return np.arange(sample_count, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(sample_count)


class InfiniteSampler(Sampler[int]):
    """Endless, rank-sharded index stream whose position can be saved and restored.

    ``start`` is the number of *global* samples already consumed (all ranks together).
    ``state_dict()`` holds plain ints; the position it reports counts indices handed to the
    DataLoader, which prefetches, so save the state of the loader
    (:class:`dinov2.data.loaders.ResumableDataLoader`), which counts batches the loop received.
    """

    def __init__(
        self,
        sample_count: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ):
        if sample_count <= 0:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got {sample_count} samples")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.sample_count = int(sample_count)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = default_rank_and_world_size(rank, world_size)
        self.start = int(start)
        self._yielded = 0

    def __iter__(self) -> Iterator[int]:
        self._yielded = 0
        position = self.start + self.rank  # next global position this rank takes
        while True:
            epoch, offset = divmod(position, self.sample_count)
            chunk = epoch_permutation(self.sample_count, self.seed, epoch, self.shuffle)[offset :: self.world_size]
            for index in chunk.tolist():
                self._yielded += 1
                yield index
            position += len(chunk) * self.world_size

    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_samples": self.start + self._yielded * self.world_size,
            "sample_count": self.sample_count,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mine in (("sample_count", self.sample_count), ("seed", self.seed), ("shuffle", int(self.shuffle))):
            if name in state and int(state[name]) != mine:
                raise ValueError(
                    f"sampler state has {name}={int(state[name])} but this sampler has {name}={mine}; "
                    "resuming would not continue the same sample stream"
                )
        self.start = int(state["consumed_samples"])
        self._yielded = 0


class EpochSampler(Sampler[int]):
    """One pass over the dataset per epoch, rank ``r`` taking every ``W``-th index (no padding,
    no duplicates: ranks may differ by one sample). Call ``set_epoch`` to reshuffle."""

    def __init__(
        self,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.sample_count = int(sample_count)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = default_rank_and_world_size(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.sample_count, self.seed, self.epoch, self.shuffle)
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.sample_count, self.world_size))
