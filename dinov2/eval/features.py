"""Frozen-backbone feature extraction over a dataset, one slice per process.

Every row of a :class:`FeatureSet` carries the dataset index it came from, so slices extracted on
different ranks can be merged back into dataset order (:func:`gather_feature_set`) and group ids
can be looked up. Under ``torchrun`` rank ``r`` of ``W`` extracts dataset indices ``r, r+W, ...``:
no sample is padded or duplicated.

Labels come from the dataset's targets: ints, or for multi-task CSV datasets the entry of
``task`` in the target dict; ``-1`` (or a missing task) means "no label".

Images a dataset skips under ``bad_images=skip`` (it returns ``None`` for them) are left out of
the features; each was logged by the dataset and their number is logged once per extraction.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from dinov2.data.image_io import SKIPPED_KEY, SkipBadSamples

from . import _dist

logger = logging.getLogger("dinov2.eval")

FeatureFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def cls_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D): the normalised CLS token of the last block (what ``model(images)`` returns)."""
    return model.forward_features(images)["x_norm_clstoken"]


class BlockFeatures:
    """(B, n + 1, D): CLS tokens of the last ``n`` blocks (oldest first), then the average
    patch token of the last block; all after the final norm. Every linear-probe input
    (1 or 4 blocks, with or without the average patch token) is a slice of this."""

    def __init__(self, n_last_blocks: int):
        self.n_last_blocks = int(n_last_blocks)

    def __call__(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        outputs = model.get_intermediate_layers(images, n=self.n_last_blocks, return_class_token=True, norm=True)
        class_tokens = torch.stack([cls for _, cls in outputs], dim=1)
        mean_patch = outputs[-1][0].mean(dim=1, keepdim=True)
        return torch.cat([class_tokens, mean_patch], dim=1)


@dataclass
class FeatureSet:
    """Features of (a slice of) a dataset: ``features[i]`` is sample ``indices[i]`` with ``labels[i]``."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def select(self, mask_or_index: torch.Tensor) -> "FeatureSet":
        return FeatureSet(self.features[mask_or_index], self.labels[mask_or_index], self.indices[mask_or_index])

    def labelled(self) -> "FeatureSet":
        return self.select(self.labels >= 0)

    def to(self, device) -> "FeatureSet":
        return FeatureSet(self.features.to(device), self.labels.to(device), self.indices.to(device))


def target_to_label(target, task: Optional[str] = None) -> int:
    """An int label (-1 = none) from a dataset target."""
    if isinstance(target, dict):
        if task is None:
            raise ValueError(f"the dataset has several label columns {sorted(target)}: choose one with --task")
        if task not in target:
            raise ValueError(f"--task {task!r} is not a label column of the dataset (columns: {sorted(target)})")
        target = target[task]
    elif task is not None:
        raise ValueError(f"--task {task!r} given but the dataset has a single label per sample")
    if target is None:
        return -1
    if isinstance(target, torch.Tensor):
        target = target.item()
    return int(target)


def class_names_of(dataset, task: Optional[str] = None) -> Optional[list]:
    """Class names of a dataset (or of one task of a multi-task CSV dataset); None if it has none."""
    if task is not None:
        tasks = getattr(dataset, "tasks", None)
        if not tasks or task not in tasks:
            raise ValueError(f"--task {task!r}: the dataset has tasks {sorted(tasks or {})}")
        return list(tasks[task])
    classes = getattr(dataset, "classes", None)
    # None, not []: a WebDataset stream without classes= has integer labels and no names for them
    return list(classes) if classes else None


class _Indexed(Dataset):
    """(image, label, dataset index) for the given dataset indices."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], task: Optional[str]):
        self.dataset, self.indices, self.task = dataset, list(indices), task

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        sample = self.dataset[index]
        if sample is None:  # an unreadable image under bad_images=skip: SkipBadSamples drops it
            return None
        image, target = sample
        return image, target_to_label(target, self.task), index


def is_skipped_batch(batch) -> bool:
    """True for the ``{"skipped_images": n}`` batch SkipBadSamples makes when every sample was skipped."""
    return isinstance(batch, dict) and SKIPPED_KEY in batch


def _progress(total: Optional[int], desc: str):
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,  # batch-system logs: a line every 30 s, not a flood
        disable=not _dist.is_main_process(),
        file=sys.stderr,
    )


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(
    dataset, batch_size: int, num_workers: int, task: Optional[str], rank: int, world_size: int, indices=None
) -> tuple[Iterator, Optional[int]]:
    """Batches of (images, labels, indices) of this rank's slice, and its size if known."""
    if isinstance(dataset, IterableDataset):
        if getattr(dataset, "world_size", 1) != 1:
            # A stream that deals its shards to the ranks (WebDatasetStream built under torchrun)
            # would hand each rank part of the data before the position filter below: read all.
            dataset = copy.copy(dataset)
            dataset.rank, dataset.world_size = 0, 1
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=SkipBadSamples())

        def strided():
            # Stream position is the index; rank r keeps positions r, r + W, ... Every rank
            # reads the whole stream, so for large streams prefer one process.
            position = 0
            for batch in loader:
                if is_skipped_batch(batch):
                    continue
                images, targets = batch
                n = len(images)
                positions = torch.arange(position, position + n)
                position += n
                keep = positions % world_size == rank
                if keep.any():
                    labels = [target_to_label(t, task) for t in _unbatch_targets(targets, n)]
                    yield images[keep], torch.tensor(labels)[keep], positions[keep]

        return strided(), None
    all_indices = range(len(dataset)) if indices is None else indices
    local = [int(i) for i in all_indices][rank::world_size]
    loader = DataLoader(
        _Indexed(dataset, local, task),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        collate_fn=SkipBadSamples(),
    )
    return (batch for batch in loader if not is_skipped_batch(batch)), len(local)


def _unbatch_targets(targets, n: int) -> list:
    if isinstance(targets, dict):  # default_collate turns a list of dicts into a dict of batches
        return [{k: v[i] for k, v in targets.items()} for i in range(n)]
    if isinstance(targets, torch.Tensor):
        return targets.tolist()
    return list(targets)


def extract_features(
    model: torch.nn.Module,
    dataset,
    *,
    feature_fn: FeatureFn = cls_features,
    batch_size: int = 128,
    num_workers: int = 4,
    device: torch.device | str = "cpu",
    task: Optional[str] = None,
    indices: Optional[Sequence[int]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    desc: str = "features",
) -> FeatureSet:
    """Features of this rank's slice of ``dataset`` (of ``indices``, if given), kept on ``device``.

    The dataset yields (transformed image tensor, target). A progress bar on the main process
    shows images/s and the remaining time.
    """
    device = torch.device(device)
    rank, world_size = _dist.get_rank(), _dist.get_world_size()
    batches, total = _batches(dataset, batch_size, num_workers, task, rank, world_size, indices)
    features, labels, positions = [], [], []
    start = time.perf_counter()
    with _progress(total, desc) as bar:
        for images, batch_labels, batch_indices in batches:
            with torch.inference_mode(), _autocast(device, autocast_dtype):
                out = feature_fn(model, images.to(device, non_blocking=True))
            features.append(out.float())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
            positions.append(torch.as_tensor(batch_indices, dtype=torch.long))
            bar.update(len(images))
    count = sum(len(p) for p in positions)
    elapsed = time.perf_counter() - start
    if total is not None and count < total:
        logger.warning(
            "%s: %d of %d images on rank %d were unreadable and skipped (bad_images=skip)",
            desc,
            total - count,
            total,
            rank,
        )
    if _dist.is_main_process():
        logger.info("%s: %d images in %.1f s (%.1f img/s on rank 0)", desc, count, elapsed, count / max(elapsed, 1e-9))
    # Every rank learns whether any got nothing, so that none is left waiting in the gather after.
    empty = _dist.all_gather_cat(torch.tensor([0 if features else 1]))
    if empty.any():
        ranks = torch.nonzero(empty).flatten().tolist()
        raise ValueError(
            f"{desc}: rank(s) {ranks} of {world_size} got no samples (this rank read {count}); "
            "use fewer processes for a dataset this small"
        )
    # Concatenated outside inference mode: the result is an ordinary tensor that heads can train on.
    return FeatureSet(torch.cat(features), torch.cat(labels).to(device), torch.cat(positions).to(device))


def gather_feature_set(local: FeatureSet) -> FeatureSet:
    """Every rank's rows, on every rank, in dataset-index order."""
    if _dist.get_world_size() == 1:
        order = torch.argsort(local.indices)
        return local.select(order)
    features = _dist.all_gather_cat(local.features)
    labels = _dist.all_gather_cat(local.labels)
    indices = _dist.all_gather_cat(local.indices)
    order = torch.argsort(indices)
    return FeatureSet(features[order], labels[order], indices[order])


def group_ids_for(dataset, indices: torch.Tensor) -> Optional[list]:
    """Group id of each row (``dataset.get_group_ids()``), or None when the dataset has none."""
    getter = getattr(dataset, "get_group_ids", None)
    groups = getter() if getter is not None else None
    if groups is None:
        return None
    groups = list(groups)
    return [groups[i] for i in indices.tolist()]


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
