"""Spec string -> dataset, and dataset -> DataLoader with the right sampler.

``make_dataset("ImageNet:root=/data/imagenet:split=TRAIN")`` is how training, evaluation and
fine-tuning all name their data. ``make_data_loader`` picks a sampler, always installs the
:class:`~dinov2.data.image_io.SkipBadSamples` collate wrapper, and returns a
:class:`ResumableDataLoader` whose ``state_dict()`` records how far the training loop got.
"""

from __future__ import annotations

import enum
import logging
import random
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from dinov2.data.datasets.csv_labels import CSVDataset
from dinov2.data.datasets.idx import IDXDataset
from dinov2.data.datasets.image_folder import ImageFolderDataset
from dinov2.data.datasets.imagenet import ImageNetDataset
from dinov2.data.datasets.industrial import IndustrialDataset
from dinov2.data.datasets.quickdraw import QuickDrawDataset
from dinov2.data.datasets.webdataset_shards import WebDatasetStream
from dinov2.data.image_io import SkipBadSamples
from dinov2.data.samplers import EpochSampler, InfiniteSampler, default_rank_and_world_size
from dinov2.data.spec import DatasetSpecError, parse_dataset_spec, resolve_options

logger = logging.getLogger("dinov2")

DATASET_KINDS: dict[str, type] = {
    "Industrial": IndustrialDataset,
    "QuickDraw": QuickDrawDataset,
    "ImageNet": ImageNetDataset,
    "ImageFolder": ImageFolderDataset,
    "CSV": CSVDataset,
    "MNIST": IDXDataset,
    "WebDataset": WebDatasetStream,
}


def dataset_kind(kind: str) -> type:
    """The dataset class of a kind name (case-insensitive)."""
    for name, cls in DATASET_KINDS.items():
        if name.lower() == kind.lower():
            return cls
    raise DatasetSpecError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")


def dataset_spec_help() -> str:
    """A readable list of every kind with its keys (for --help texts and error messages)."""
    lines = []
    for name, cls in DATASET_KINDS.items():
        lines.append(f"{name}:")
        for key, spec_key in cls.SPEC_KEYS.items():
            if spec_key.required:
                default = "required"
            elif spec_key.default in ("", None):
                default = "optional"
            else:
                default = f"default {spec_key.default!r}"
            lines.append(f"  {key:16s} {spec_key.help} ({default})")
    return "\n".join(lines)


def make_dataset(spec: str, transform: Callable | None = None, target_transform: Callable | None = None):
    """Build the dataset a spec string names, e.g. ``QuickDraw:root=/data/qd:split=train:size=224``."""
    kind, options = parse_dataset_spec(spec)
    cls = dataset_kind(kind)
    kwargs = resolve_options(kind, options, cls.SPEC_KEYS, spec)
    logger.info("building dataset %s from spec %r", cls.__name__, spec)
    return cls(**kwargs, transform=transform, target_transform=target_transform)


class SamplerType(enum.Enum):
    INFINITE = "infinite"  # endless, sharded over ranks, resumable: iteration-based training
    EPOCH = "epoch"  # one pass split over ranks without duplicates: evaluation
    DISTRIBUTED = "distributed"  # torch DistributedSampler: epoch-based training (pads to equal lengths)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the base seed; give numpy and random the same per-worker seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def is_resumable_stream(dataset: Any) -> bool:
    """An iterable dataset whose position :class:`ResumableDataLoader` can save and restore: it has
    ``stream_state()`` and ``start_at_batch(batches, batch_size)`` (see :class:`WebDatasetStream`)."""
    return (
        isinstance(dataset, IterableDataset) and hasattr(dataset, "start_at_batch") and hasattr(dataset, "stream_state")
    )


class ResumableDataLoader(DataLoader):
    """A DataLoader that counts the batches the training loop received, so ``state_dict()`` is the
    exact position (global samples consumed) even though workers prefetch ahead.

    Resumable: an :class:`InfiniteSampler` (map-style datasets), or a resumable stream
    (:func:`is_resumable_stream`; the WebDataset kind). A stream is split over ranks and loader
    workers, so it continues exactly only with the world size, ``num_workers`` and batch size it was
    saved with; with others, each reader skips its share of the global samples consumed (an
    approximate continuation, logged as a warning).
    """

    def __init__(self, *args, world_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._world_size = world_size
        self._batches_received = 0
        self._start_batches = 0  # a stream's batches delivered before a resume

    def __iter__(self):
        self._batches_received = 0
        for batch in super().__iter__():
            self._batches_received += 1
            yield batch

    @property
    def resumable(self) -> bool:
        """Whether ``state_dict()`` / ``load_state_dict()`` can save and restore the position."""
        return isinstance(self.sampler, InfiniteSampler) or is_resumable_stream(self.dataset)

    def _stream_layout(self) -> dict[str, int]:
        return {
            "batch_size": int(self.batch_size),
            "world_size": int(self._world_size),
            "workers_per_rank": max(int(self.num_workers), 1),
        }

    def state_dict(self) -> dict[str, int]:
        if isinstance(self.sampler, InfiniteSampler):
            state = self.sampler.state_dict()
            state["consumed_samples"] = self.sampler.start + self._batches_received * self.batch_size * self._world_size
            return state
        if is_resumable_stream(self.dataset):
            batches = self._start_batches + self._batches_received
            state = {"consumed_samples": batches * self.batch_size * self._world_size, **self._stream_layout()}
            state.update({f"stream_{name}": int(value) for name, value in self.dataset.stream_state().items()})
            return state
        raise TypeError(
            "only loaders built with sampler_type='infinite' or over a resumable stream can save their position"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Call before iterating: the next batch is the one after the saved position."""
        if isinstance(self.sampler, InfiniteSampler):
            self.sampler.load_state_dict(state)
        elif is_resumable_stream(self.dataset):
            self._load_stream_state(state)
        else:
            raise TypeError(
                "only loaders built with sampler_type='infinite' or over a resumable stream can restore their position"
            )
        self._batches_received = 0

    def _load_stream_state(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:  # persistent workers hold their own copy of the dataset
            raise RuntimeError("load_state_dict() must come before the loader's workers start")
        for name, mine in self.dataset.stream_state().items():
            saved = state.get(f"stream_{name}")
            if saved is None or int(saved) != int(mine):
                raise ValueError(
                    f"stream state has {name}={saved} but this dataset has {name}={mine}; "
                    "resuming would not continue the same sample stream"
                )
        layout = self._stream_layout()
        changed = [f"{name} {int(state[name])} -> {mine}" for name, mine in layout.items() if int(state[name]) != mine]
        global_batch = layout["batch_size"] * layout["world_size"]
        batches = int(state["consumed_samples"]) // global_batch
        if changed:
            # Readers (rank, worker) own other shards now: no exact continuation exists. Each
            # reader skips its share of what was consumed, so the run goes on about as far into
            # the data as it was, but some samples of the current pass are seen twice or not at all.
            logger.warning(
                "resuming a WebDataset stream with a different %s: the stream is not continued exactly; "
                "each reader skips its share of the %d samples consumed",
                ", ".join(changed),
                int(state["consumed_samples"]),
            )
        self.dataset.start_at_batch(batches, layout["batch_size"])
        self._start_batches = batches


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    sampler_type: SamplerType | str | None = SamplerType.INFINITE,
    drop_last: bool = True,
    collate_fn: Callable | None = None,
    persistent_workers: bool = False,
    start: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> ResumableDataLoader:
    """A DataLoader over ``dataset`` for this rank.

    ``sampler_type``: ``infinite`` (``start`` = global samples already consumed), ``epoch`` or
    ``distributed``; ``None`` for plain (optionally shuffled) single-process order. Iterable
    datasets (WebDataset) split their shards by rank and worker themselves and take no sampler;
    a WebDataset stream's position is saved and restored by the loader like a sampler's.
    ``collate_fn`` (default ``default_collate``) is wrapped in ``SkipBadSamples``.
    ``prefetch_factor``: batches each worker prepares ahead (None: DataLoader's default; only
    with ``num_workers`` > 0).
    """
    rank, world_size = default_rank_and_world_size(rank, world_size)
    sampler = None
    loader_shuffle = False
    if isinstance(dataset, IterableDataset):
        if sampler_type is not None:
            logger.info("iterable dataset: shards are split by rank and worker, sampler_type %s not used", sampler_type)
    else:
        kind = SamplerType(sampler_type) if sampler_type is not None else None
        if kind is SamplerType.INFINITE:
            sampler = InfiniteSampler(
                len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, start=start
            )
        elif kind is SamplerType.EPOCH:
            sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        elif kind is SamplerType.DISTRIBUTED:
            sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
            )
        else:
            loader_shuffle = shuffle
    generator = torch.Generator()
    generator.manual_seed(seed * 1000 + rank)  # distinct, reproducible worker seeds per rank
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=loader_shuffle if sampler is None and not isinstance(dataset, IterableDataset) else None,
        num_workers=num_workers,
        collate_fn=SkipBadSamples(collate_fn),
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_seed_worker,
        generator=generator,
        world_size=world_size,
    )
