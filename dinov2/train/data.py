"""The training data pipeline: dataset spec -> multi-crop samples -> masked batches, with
randomness that depends only on the position of a sample in the global sample stream.

Why: a resumed run must see exactly the crops and masks an uninterrupted run would have seen.
DataLoader workers seed themselves from the loader's generator when an iterator starts, so after a
resume they would replay the randomness of the run's start. Instead, every sample is transformed
under a torch / numpy / random state seeded from ``(train.seed, global position)``, and every
batch's masks come from a ``random.Random`` seeded from its first sample's position. Positions
come from the infinite sampler (rank ``r`` of ``W`` takes positions ``start + r + k * W``), so the
data stream is also the same for any number of workers and any world size.

Streamed datasets (WebDataset shards) number their samples per reader instead (rank ``r`` and
loader worker ``w`` of ``K``: the ``n``-th sample of reader ``r * K + w`` is at position
``n * W * K + r * K + w``) and are seeded the same way; their stream resumes after the batches the
rank consumed (:class:`~dinov2.data.datasets.webdataset_shards.WebDatasetStream`), so a resumed run
sees the same samples, crops and masks, for the same world size and ``train.num_workers``.
Other iterable datasets are streamed with per-worker randomness and restart on resume.

High-resolution adaptation (``crops.global_local_crop_pairs_ratios``): each batch uses one
``(global, local)`` crop size pair, drawn with the given probabilities by
:class:`CropSizeSchedule` from ``(train.seed, batch index)``; the batch index is computed from a
sample's position, so every rank and every loader worker crops the samples of one training
iteration at the same sizes, and a resumed run draws the sizes the interrupted one would have.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, IterableDataset

from dinov2.checkpoint import derive_seed
from dinov2.data.augmentations import FastDataAugmentationDINO, crop_size_pairs
from dinov2.data.collate import build_collate_fn_from_config
from dinov2.data.datasets.webdataset_shards import WebDatasetStream
from dinov2.data.image_io import SkipBadSamples
from dinov2.data.loaders import ResumableDataLoader, dataset_kind, make_data_loader, make_dataset
from dinov2.data.samplers import InfiniteSampler
from dinov2.data.spec import parse_dataset_spec

logger = logging.getLogger("dinov2")

__all__ = [
    "CropSizeSchedule",
    "PositionedInfiniteSampler",
    "SeededSampleDataset",
    "SeededSampleStream",
    "SeededCollate",
    "build_train_data_loader",
    "loader_options",
    "train_dataset_spec",
]

# Streams of derive_seed(seed, position, stream): kept apart so crops and masks are independent.
_AUGMENTATION_STREAM = 1
_MASK_STREAM = 2
_CROP_SIZE_STREAM = 3


@contextlib.contextmanager
def _callers_rng_kept():
    """Restore the torch (CPU), numpy and ``random`` states of the caller on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class CropSizeSchedule:
    """The ``(global, local)`` crop size pair of every batch, drawn with probabilities ``ratios``
    from ``(seed, batch index)`` alone (the same on every rank, reproducible on resume).

    ``batch_of_position`` maps a sample position to its batch index: for a map-style dataset
    with the infinite sampler, positions ``[b * B * W, (b + 1) * B * W)`` make up iteration ``b``
    of all ``W`` ranks; for a WebDataset stream read by ``K`` workers per rank, the ``n``-th sample
    of reader ``r * K + w`` is in that reader's batch ``n // B``, which its rank takes as batch
    ``(n // B) * K + w`` (the loader takes batches from its workers in turn).
    """

    def __init__(
        self, pairs, ratios, seed: int, batch_size: int, world_size: int, stream_workers: Optional[int] = None
    ):
        self.pairs = [(int(g), int(lo)) for g, lo in pairs]
        self.ratios = [float(r) for r in ratios]
        if len(self.ratios) != len(self.pairs):
            raise ValueError(
                f"crops.global_local_crop_pairs_ratios has {len(self.ratios)} entries for {len(self.pairs)} "
                "(crops.global_crops_sizes, crops.local_crops_sizes) pairs; give one probability per pair"
            )
        if any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(
                f"crops.global_local_crop_pairs_ratios must be non-negative and sum to 1, got {self.ratios}"
            )
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.stream_workers = None if stream_workers is None else max(int(stream_workers), 1)
        self._cumulative = np.cumsum(self.ratios).tolist()

    @classmethod
    def from_config(cls, cfg: DictConfig, world_size: int, stream_workers: Optional[int] = None):
        """The schedule of ``crops.global_local_crop_pairs_ratios`` (None when it is empty)."""
        ratios = list(cfg.crops.get("global_local_crop_pairs_ratios", None) or [])
        if not ratios:
            if cfg.crops.get("global_crops_sizes", None):
                raise ValueError("crops.global_crops_sizes is set: give crops.global_local_crop_pairs_ratios too")
            return None
        return cls(
            crop_size_pairs(cfg.crops),
            ratios,
            int(cfg.train.seed),
            int(cfg.train.batch_size_per_gpu),
            world_size,
            stream_workers=stream_workers,
        )

    def pair_index(self, batch_index: int) -> int:
        """Index into :attr:`pairs` of batch ``batch_index``."""
        draw = random.Random(derive_seed(self.seed, int(batch_index), _CROP_SIZE_STREAM)).random()
        for index, edge in enumerate(self._cumulative):
            if draw < edge:
                return index
        return len(self.pairs) - 1  # draw above a sum rounded below 1

    def batch_of_position(self, position: int) -> int:
        if self.stream_workers is None:
            return int(position) // (self.batch_size * self.world_size)
        workers = self.stream_workers
        n = int(position) // (self.world_size * workers)
        return (n // self.batch_size) * workers + int(position) % workers

    def pair_of_position(self, position: int) -> int:
        return self.pair_index(self.batch_of_position(position))


class _SizedTransform:
    """Before each sample: point the augmentation at its batch's crop size pair."""

    def __init__(self, augmentation, schedule: CropSizeSchedule):
        self.augmentation = augmentation
        self.schedule = schedule

    def __call__(self, position: int) -> None:
        self.augmentation.select_size_pair(self.schedule.pair_of_position(position))


def _seeded_sample(seed: int, position: int, load, key, before=None):
    """``load(key)`` -> ``(image, target)`` (or ``None``) under RNG states seeded by ``(seed, position)``;
    returns ``(image, target, position)`` (or ``None``). ``before(position)`` runs first (the
    crop size of the sample's batch)."""
    if before is not None:
        before(position)
    value = derive_seed(seed, position, _AUGMENTATION_STREAM)
    # The CPU generator only: torch.manual_seed would also queue lazy CUDA seeding, which
    # records a formatted stack on every call in a CUDA build without a GPU (half of the
    # main-process loading time of the Quick, Draw! recipe).
    torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)
    sample = load(key)
    if sample is None:
        return None
    image, target = sample
    return image, target, position


class PositionedInfiniteSampler(InfiniteSampler):
    """:class:`InfiniteSampler` that yields ``(global_position, index)`` pairs."""

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        first = self.start + self.rank
        for k, index in enumerate(super().__iter__()):
            yield first + k * self.world_size, index


class SeededSampleDataset(Dataset):
    """Wraps a map-style dataset whose transform is random: ``dataset[(position, index)]`` returns
    ``(crops, target, position)`` computed under RNG states seeded by ``(seed, position)``.

    The RNG states of the calling process are saved and restored around each sample (around each
    batch when the DataLoader fetches through :meth:`__getitems__`), so loading data in the main
    process (``num_workers=0``) does not disturb the model's randomness either.
    ``None`` samples (images skipped by the bad-image policy) stay ``None``.
    """

    def __init__(self, dataset: Dataset, seed: int, before=None):
        self.dataset = dataset
        self.seed = int(seed)
        self.before = before

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: List[Tuple[int, int]]) -> list:
        """The samples of a batch (the DataLoader fetches through this when it exists).

        The caller's RNG states are saved and restored once per batch, not once per sample:
        saving and restoring numpy's global state alone costs about 0.16 ms, and the per-sample
        save / restore was about a fifth of the loading time of a Quick, Draw! sample (730 us)."""
        with _callers_rng_kept():
            return [
                _seeded_sample(self.seed, position, self.dataset.__getitem__, index, self.before)
                for position, index in keys
            ]


class SeededSampleStream(IterableDataset):
    """The streamed counterpart of :class:`SeededSampleDataset`: iterating yields
    ``(crops, target, position)`` for each sample of a :class:`WebDatasetStream` (``None`` for a
    skipped image), transformed under RNG states seeded by ``(seed, position)``; the caller's RNG
    states are restored around every sample. Saving and restoring the stream position goes to the
    wrapped stream (``stream_state`` / ``start_at_batch``)."""

    def __init__(self, stream: WebDatasetStream, seed: int, before=None):
        self.stream = stream
        self.seed = int(seed)
        self.before = before

    def __iter__(self):
        for position, raw in self.stream.positioned_samples():
            with _callers_rng_kept():
                sample = _seeded_sample(self.seed, position, self.stream.decode_sample, raw, self.before)
            yield sample

    def stream_state(self) -> dict:
        return self.stream.stream_state()

    def start_at_batch(self, batches: int, batch_size: int) -> None:
        self.stream.start_at_batch(batches, batch_size)


class SeededCollate:
    """``collate_data_and_cast`` with masks drawn from a generator seeded by the batch's first
    sample position (picklable, so it works in DataLoader workers)."""

    def __init__(self, collate_fn, seed: int):
        self.collate_fn = collate_fn
        self.seed = int(seed)

    def __call__(self, samples):
        position = min(sample[2] for sample in samples)
        generator = random.Random(derive_seed(self.seed, position, _MASK_STREAM))
        batch = self.collate_fn([(sample[0], sample[1]) for sample in samples], generator=generator)
        batch["first_position"] = position
        return batch


def train_dataset_spec(cfg: DictConfig) -> str:
    """``train.dataset_path``, with ``bad_images=<train.bad_image_policy>`` appended when the policy
    is not ``raise`` and the dataset kind has that option (and the spec does not set it)."""
    spec = cfg.train.dataset_path
    policy = cfg.train.bad_image_policy
    if policy not in ("raise", "skip"):
        raise ValueError(f"train.bad_image_policy must be 'raise' or 'skip', got {policy!r}")
    kind, options = parse_dataset_spec(spec)
    if policy != "raise" and "bad_images" not in options:
        if "bad_images" in getattr(dataset_kind(kind), "SPEC_KEYS", {}):
            spec = f"{spec}:bad_images={policy}"
        else:
            logger.info("train.bad_image_policy=%s: dataset kind %s has no bad_images option", policy, kind)
    return spec


def build_train_data_loader(
    cfg: DictConfig,
    patch_size: int,
    rank: int,
    world_size: int,
    dtype: torch.dtype = torch.float32,
    dataset: Optional[Dataset] = None,
    pin_memory: bool = False,
) -> Tuple[ResumableDataLoader, Any]:
    """The training loader of this rank and the underlying dataset.

    ``dataset`` replaces ``train.dataset_path`` (tests, programmatic use); its transform must be
    unset: the multi-crop augmentation from ``crops.*`` is installed here. With
    ``crops.global_local_crop_pairs_ratios`` each batch's crop sizes follow :class:`CropSizeSchedule`.
    ``pin_memory``: batches in page-locked memory (training on CUDA: the trainer's copies to the
    GPU are then asynchronous); see :func:`loader_options` for the worker options.
    """
    augmentation = FastDataAugmentationDINO.from_config(cfg.crops)  # the v2 reference's crops, faster
    if dataset is None:
        dataset = make_dataset(train_dataset_spec(cfg), transform=augmentation)
    else:
        if getattr(dataset, "transform", None) is not None:
            raise ValueError(
                "build_train_data_loader: pass a dataset without transform; the augmentation is added here"
            )
        dataset.transform = augmentation
    collate = build_collate_fn_from_config(cfg, patch_size, dtype=dtype)
    batch_size = int(cfg.train.batch_size_per_gpu)
    num_workers = int(cfg.train.num_workers)
    seed = int(cfg.train.seed)
    options = loader_options(cfg, pin_memory)

    if isinstance(dataset, WebDatasetStream):
        readers = world_size * max(num_workers, 1)
        if len(dataset.shards) < readers:
            raise ValueError(
                f"the training WebDataset has {len(dataset.shards)} shard(s) for {world_size} rank(s) x "
                f"{max(num_workers, 1)} loader worker(s): every reader needs at least one shard (the loader takes "
                "batches from its workers in turn); write more shards or lower train.num_workers"
            )
        dataset.rank, dataset.world_size = rank, world_size  # this rank's shards
        if not dataset.repeat:
            logger.warning(
                "the training WebDataset has repeat=false: it ends after one pass over its shards, and a run "
                "longer than that stops with an error (add :repeat=true to train.dataset_path)"
            )
        sizes = CropSizeSchedule.from_config(cfg, world_size, stream_workers=num_workers)
        before = _SizedTransform(augmentation, sizes) if sizes is not None else None
        loader = _seeded_loader(
            SeededSampleStream(dataset, seed, before), None, collate, batch_size, seed, world_size, options
        )
        return loader, dataset

    if isinstance(dataset, IterableDataset):
        if CropSizeSchedule.from_config(cfg, world_size) is not None:
            raise ValueError(
                "crops.global_local_crop_pairs_ratios needs a map-style dataset or a WebDataset stream (the crop "
                f"size of a batch is drawn from its sample positions); {type(dataset).__name__} has none"
            )
        logger.warning(
            "training on an iterable dataset: augmentation randomness is per worker and a resumed run "
            "restarts the stream (no exact resume)"
        )
        loader = make_data_loader(
            dataset,
            batch_size,
            seed=seed,
            sampler_type=None,
            collate_fn=collate,
            rank=rank,
            world_size=world_size,
            **options,
        )
        return loader, dataset

    if len(dataset) < batch_size:
        raise ValueError(
            f"the training dataset has {len(dataset)} images, fewer than train.batch_size_per_gpu={batch_size}"
        )
    sampler = PositionedInfiniteSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    sizes = CropSizeSchedule.from_config(cfg, world_size)
    before = _SizedTransform(augmentation, sizes) if sizes is not None else None
    loader = _seeded_loader(
        SeededSampleDataset(dataset, seed, before), sampler, collate, batch_size, seed, world_size, options
    )
    return loader, dataset


def loader_options(cfg: DictConfig, pin_memory: bool = False) -> dict:
    """DataLoader options of the training loader: ``num_workers`` (``train.num_workers``), workers
    kept alive between iterators, ``prefetch_factor`` (``train.prefetch_factor``, batches each
    worker prepares ahead; only with workers, DataLoader refuses it otherwise) and ``pin_memory``.

    Why each: a worker that is kept does not pay its start-up (imports, dataset opening) again at
    the next iterator; prefetching lets workers absorb the uneven cost of batches; pinned batches
    are copied to a GPU asynchronously (``non_blocking``), so the copy overlaps the previous step.
    """
    num_workers = int(cfg.train.num_workers)
    prefetch_factor = int(cfg.train.prefetch_factor)
    if num_workers < 0:
        raise ValueError(f"train.num_workers must be >= 0, got {num_workers}")
    if prefetch_factor < 1:
        raise ValueError(f"train.prefetch_factor must be >= 1, got {prefetch_factor}")
    options = {"num_workers": num_workers, "persistent_workers": num_workers > 0, "pin_memory": bool(pin_memory)}
    if num_workers > 0:
        options["prefetch_factor"] = prefetch_factor
    return options


def _seeded_loader(samples, sampler, collate, batch_size: int, seed: int, world_size: int, options: dict):
    """The resumable loader over seeded samples (map-style with its sampler, or a stream), with the
    DataLoader ``options`` of :func:`loader_options`."""
    generator = torch.Generator()
    # Worker base seeds come from this, not from the global RNG (a resumed run must draw the same).
    generator.manual_seed(seed)
    return ResumableDataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=SkipBadSamples(SeededCollate(collate, seed)),
        drop_last=True,
        generator=generator,
        world_size=world_size,
        **options,
    )
