"""Datasets for classifier training: spec strings -> (image tensor, {task: label}) samples.

Any map-style dataset of :func:`dinov2.data.loaders.make_dataset` works. A CSV with several label
columns gives one task per column (``dataset.tasks``); any other dataset gives a single task
(named ``single_task_name``) over ``dataset.classes``. Targets become ``{task: int}`` with -1 for a
missing label, and class indices always follow the *training* set's class lists, so a validation
file whose columns happen to contain fewer values is mapped by class name.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, IterableDataset, Subset

from dinov2.data.splits import split_train_val
from dinov2.eval.features import group_ids_for

from .losses import MISSING_LABEL
from .transforms import eval_transform, train_transform

logger = logging.getLogger("dinov2")


class ClassifyDataError(ValueError):
    """Training data that cannot be used for the requested tasks."""


def dataset_tasks(dataset, single_task_name: str = "label") -> Dict[str, List[str]]:
    """``{task: [class names]}`` of a dataset from ``make_dataset``."""
    tasks = getattr(dataset, "tasks", None)
    if tasks and len(tasks) > 1:
        return {task: list(names) for task, names in tasks.items()}
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise ClassifyDataError(f"{type(dataset).__name__} exposes no class names (classes / tasks)")
    name = next(iter(tasks)) if tasks else single_task_name
    return {name: list(classes)}


class TaskTargets:
    """Target transform: a dataset's raw target (int or ``{column: int}``) -> ``{task: int}``.

    ``source_tasks`` are the dataset's own class lists, ``tasks`` those the model predicts;
    labels are mapped by class name, and a class the model does not know is an error.
    """

    def __init__(self, source_tasks: Mapping[str, Sequence[str]], tasks: Mapping[str, Sequence[str]], source: str):
        missing = [t for t in tasks if t not in source_tasks]
        if missing:
            raise ClassifyDataError(f"{source}: no label column for tasks {missing}; it has {list(source_tasks)}")
        self.single = next(iter(source_tasks)) if len(source_tasks) == 1 else None
        self.maps: Dict[str, np.ndarray] = {}
        for task, names in tasks.items():
            index = {name: i for i, name in enumerate(names)}
            unknown = [n for n in source_tasks[task] if n not in index]
            if unknown:
                raise ClassifyDataError(
                    f"{source}: task {task!r} has classes {unknown} that the training set does not have {list(names)}"
                )
            self.maps[task] = np.asarray([index[n] for n in source_tasks[task]], dtype=np.int64)

    def __call__(self, target) -> Dict[str, int]:
        if not isinstance(target, Mapping):
            target = {self.single: target}
        out = {}
        for task, mapping in self.maps.items():
            label = int(target[task])
            out[task] = MISSING_LABEL if label < 0 else int(mapping[label])
        return out


def make_task_dataset(
    spec: str,
    transform: Callable,
    tasks: Optional[Mapping[str, Sequence[str]]] = None,
    wanted: Optional[Sequence[str]] = None,
    single_task_name: str = "label",
) -> tuple[Dataset, Dict[str, List[str]]]:
    """(dataset yielding ``(tensor, {task: int})``, ``{task: [class names]}``).

    Without ``tasks`` the dataset's own tasks (those named in ``wanted``, or all) are used: the
    training set. With them (validation sets), labels are mapped onto the given class lists.
    """
    from dinov2.data.loaders import make_dataset

    dataset = make_dataset(spec, transform=transform)
    if isinstance(dataset, IterableDataset):
        raise ClassifyDataError(f"{spec}: classifier training needs a map-style dataset, not a stream")
    own = dataset_tasks(dataset, single_task_name)
    tasks = {t: list(c) for t, c in tasks.items()} if tasks else select_tasks(own, wanted)
    dataset.target_transform = TaskTargets(own, tasks, source=spec)
    return dataset, tasks


def select_tasks(tasks: Mapping[str, Sequence[str]], wanted: Optional[Sequence[str]]) -> Dict[str, List[str]]:
    if not wanted:
        return {t: list(c) for t, c in tasks.items()}
    unknown = [t for t in wanted if t not in tasks]
    if unknown:
        raise ClassifyDataError(f"unknown tasks {unknown}; the training set has {list(tasks)}")
    for task in wanted:
        if len(tasks[task]) < 2:
            raise ClassifyDataError(f"task {task!r} has fewer than 2 classes in the training set: {tasks[task]}")
    return {t: list(tasks[t]) for t in wanted}


def subsample(dataset: Dataset, limit: Optional[int], seed: int) -> Dataset:
    """At most ``limit`` samples, chosen at random but reproducibly."""
    if not limit or limit >= len(dataset):
        return dataset
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return Subset(dataset, indices.tolist())


def build_datasets(
    cfg: DictConfig, preprocessing: Mapping[str, Any]
) -> tuple[Dataset, Optional[Dataset], Dict[str, List[str]]]:
    """(training set, validation set or None, ``{task: [class names]}``) of a classifier run.

    ``data.val`` is a separate dataset; ``data.val_fraction`` carves validation images out of
    ``data.train`` (seeded by ``seed``). Training images are augmented unless the features are
    cached (``optim.cache_features``: computed once, so without augmentation).
    """
    d = cfg.data
    eval_tf = eval_transform(preprocessing)
    if cfg.optim.cache_features:
        train_tf = eval_tf
    else:
        train_tf = train_transform(preprocessing, min_scale=d.min_scale, hflip=d.hflip)
    wanted = list(cfg.heads.tasks) if cfg.heads.tasks else None
    single = cfg.heads.single_task_name
    train_set, tasks = make_task_dataset(d.train, train_tf, wanted=wanted, single_task_name=single)
    unknown = sorted(set(cfg.heads.loss_weights) - set(tasks))
    if unknown:
        raise ClassifyDataError(
            f"heads.loss_weights names task(s) {unknown} that {d.train} has not; its tasks: {list(tasks)}"
        )
    val_set = None
    if d.val:
        val_set, _ = make_task_dataset(d.val, eval_tf, tasks=tasks, single_task_name=single)
    elif d.val_fraction > 0:
        # Two views of the same files: augmented for training, plain for validation. Datasets with
        # groups (industrial parts) hold out whole groups, as the evaluations do.
        plain, _ = make_task_dataset(d.train, eval_tf, tasks=tasks, single_task_name=single)
        groups = group_ids_for(train_set, torch.arange(len(train_set)))
        try:
            train_idx, val_idx = split_train_val(len(train_set), d.val_fraction, cfg.seed, groups, "data.val_fraction")
        except ValueError as error:
            raise ClassifyDataError(f"{d.train}: {error}") from error
        train_set, val_set = Subset(train_set, train_idx.tolist()), Subset(plain, val_idx.tolist())
    train_set = subsample(train_set, d.max_train_samples, cfg.seed)
    val_set = subsample(val_set, d.max_val_samples, cfg.seed + 1) if val_set is not None else None
    if len(train_set) == 0:
        raise ValueError(f"training set {d.train} is empty")
    logger.info(
        "classify: %d training and %s validation images; tasks %s",
        len(train_set),
        len(val_set) if val_set is not None else "no",
        {t: len(c) for t, c in tasks.items()},
    )
    return train_set, val_set, tasks


def task_targets(dataset: Dataset, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
    """``{task: (N,) labels}`` of samples ``indices`` of a dataset from :func:`make_task_dataset`
    (or a :class:`Subset` of one), read without loading the images."""
    base, positions = dataset, [int(i) for i in indices]
    while isinstance(base, Subset):
        positions = [int(base.indices[i]) for i in positions]
        base = base.dataset
    get_target = getattr(base, "get_target", None)
    to_tasks = getattr(base, "target_transform", None)
    if get_target is None or not isinstance(to_tasks, TaskTargets):
        raise ClassifyDataError(f"{type(base).__name__} is not a classifier dataset (made by make_task_dataset)")
    rows = [to_tasks(get_target(i)) for i in positions]
    return {task: torch.tensor([row[task] for row in rows], dtype=torch.long) for task in to_tasks.maps}
