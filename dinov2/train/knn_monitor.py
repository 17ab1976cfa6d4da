"""Online k-NN monitor: k-NN top-1 of the teacher's CLS features on a small labelled subset.

Run every ``evaluation.knn_period_iterations``. The bank comes from
``evaluation.knn_train_dataset_path`` and the queries from ``evaluation.knn_dataset_path``; when a
path is empty the training dataset (``train.dataset_path``) is used instead, and if both come from
it the bank and the queries are disjoint. Each set holds at most ``evaluation.knn_max_samples``
labelled images, drawn once with a fixed seed. Images are resized and centre-cropped to
``crops.global_crops_size`` and normalised with ``crops.mean`` / ``crops.std``.

Classification: :func:`dinov2.eval.knn.knn_classify` (cosine similarity to the bank, the
``knn_k`` nearest neighbours vote with weight ``exp(similarity / knn_temperature)``).

Every rank extracts features of the whole (small) subsets, so sharded (FSDP) teachers see the
same forward calls on every rank; rank 0's result is the one logged.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dinov2 import distributed
from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.knn import knn_classify

logger = logging.getLogger("dinov2")

__all__ = ["KnnMonitor", "weighted_knn_top1"]


def weighted_knn_top1(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    group=None,
) -> float:
    """Top-1 accuracy (in [0, 1]) of temperature-weighted k-NN voting with cosine similarity.

    Uses :func:`dinov2.eval.knn.knn_classify`. Every rank passes the full (identical) bank and
    queries; under torchrun each rank searches its slice of the bank and the slices are merged.
    ``group``: the ranks that evaluate these features together (None: all; a distillation
    student on a subset of ranks passes its own, the other ranks score other students).
    """
    if bank_features.shape[0] == 0 or query_features.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty bank and query set")
    num_classes = int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    k = min(k, bank_features.shape[0])
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if group is not None:
        rank, world_size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    indices = torch.arange(bank_features.shape[0], device=bank_features.device)
    scores = knn_classify(
        query_features.float(),
        bank_features.float()[rank::world_size],
        bank_labels[rank::world_size],
        bank_indices=indices[rank::world_size],
        ks=[k],
        temperature=temperature,
        num_classes=num_classes,
        group=group,
    )[k]
    return float((scores.argmax(dim=1) == query_labels.to(scores.device)).float().mean())


def _labelled_indices(dataset: Dataset, source: str) -> np.ndarray:
    get_targets = getattr(dataset, "get_targets", None)
    if get_targets is None:
        raise ValueError(f"k-NN monitor: dataset {source} has no labels (no get_targets())")
    targets = np.asarray(get_targets())
    if targets.ndim != 1:
        raise ValueError(f"k-NN monitor: dataset {source} has multi-task labels; use a single-label dataset")
    return np.flatnonzero(targets >= 0)


class KnnMonitor:
    def __init__(self, cfg: DictConfig, device: torch.device, dataset_override: Optional[Dataset] = None):
        self.cfg = cfg
        self.device = device
        self.period = int(cfg.evaluation.knn_period_iterations)
        self.k = int(cfg.evaluation.knn_k)
        self.temperature = float(cfg.evaluation.knn_temperature)
        self.batch_size = max(int(cfg.train.batch_size_per_gpu), 16)
        self._dataset_override = dataset_override
        self._sets: Optional[Tuple] = None
        self.enabled = self.period > 0

    def due(self, iteration: int) -> bool:
        return self.enabled and iteration % self.period == 0

    def _build_sets(self):
        cfg = self.cfg
        size = int(cfg.crops.global_crops_size)
        transform = make_classification_eval_transform(
            resize_size=size, crop_size=size, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std)
        )
        cap = int(cfg.evaluation.knn_max_samples)
        if cap <= 0:
            raise ValueError(f"evaluation.knn_max_samples must be positive, got {cap}")
        rng = np.random.default_rng(int(cfg.train.seed) + 12345)
        bank_spec = cfg.evaluation.knn_train_dataset_path or None
        query_spec = cfg.evaluation.knn_dataset_path or None

        def build(spec):
            if spec is None:
                if self._dataset_override is not None:
                    return self._dataset_override, "the training dataset"
                spec = cfg.train.dataset_path
            return make_dataset(spec), spec  # the eval transform is applied in _Transformed

        bank_dataset, bank_source = build(bank_spec)
        bank_indices = rng.permutation(_labelled_indices(bank_dataset, bank_source))
        if query_spec is None and bank_spec is None:
            # Both from the training data: split it so no query is its own neighbour.
            half = min(cap, len(bank_indices) // 2)
            query_dataset, query_source = bank_dataset, bank_source
            query_indices, bank_indices = bank_indices[:half], bank_indices[half : half + cap]
        else:
            query_dataset, query_source = build(query_spec)
            query_indices = rng.permutation(_labelled_indices(query_dataset, query_source))[:cap]
            bank_indices = bank_indices[:cap]
        if len(bank_indices) == 0 or len(query_indices) == 0:
            raise ValueError(
                f"k-NN monitor: no labelled images (bank: {bank_source}, queries: {query_source}); "
                "set evaluation.knn_period_iterations=0 or give labelled datasets"
            )
        bank_targets = np.asarray(bank_dataset.get_targets())[bank_indices]
        query_targets = np.asarray(query_dataset.get_targets())[query_indices]
        logger.info(
            "k-NN monitor: %d bank images (%s), %d queries (%s)",
            len(bank_indices),
            bank_source,
            len(query_indices),
            query_source,
        )
        self._sets = (
            (bank_dataset, bank_indices, torch.as_tensor(bank_targets, dtype=torch.long)),
            (query_dataset, query_indices, torch.as_tensor(query_targets, dtype=torch.long)),
            transform,
        )

    @torch.no_grad()
    def _extract(self, backbone: nn.Module, dataset: Dataset, indices: np.ndarray, transform, dtype) -> torch.Tensor:
        loader = DataLoader(
            _Transformed(Subset(dataset, indices.tolist()), transform),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
        )
        features = []
        for images in loader:
            images = images.to(self.device, non_blocking=True)
            if dtype != torch.float32:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    features.append(backbone(images).float())
            else:
                features.append(backbone(images).float())
        return torch.cat(features)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, dtype: torch.dtype = torch.float32, group=None) -> float:
        """k-NN top-1 (in [0, 1]) of ``backbone``'s CLS features; ``group``: the ranks that hold
        ``backbone`` when not all do (they call together)."""
        if self._sets is None:
            self._build_sets()
        (bank_ds, bank_idx, bank_labels), (query_ds, query_idx, query_labels), transform = self._sets
        was_training = backbone.training
        backbone.eval()
        try:
            bank = self._extract(backbone, bank_ds, bank_idx, transform, dtype)
            queries = self._extract(backbone, query_ds, query_idx, transform, dtype)
        finally:
            backbone.train(was_training)
        return weighted_knn_top1(
            bank,
            bank_labels.to(bank.device),
            queries,
            query_labels.to(queries.device),
            self.k,
            self.temperature,
            group=group,
        )


class _Transformed(Dataset):
    """Images of ``(image, target)`` samples with ``transform`` applied (targets come from
    ``get_targets()``, so the raw dataset's transform must be unset)."""

    def __init__(self, subset: Subset, transform):
        self.subset = subset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int):
        dataset, real_index = self.subset.dataset, self.subset.indices[index]
        image = _raw_image(dataset, real_index)
        if image is None:
            raise ValueError(f"k-NN monitor: image {real_index} of the monitor set could not be read")
        return self.transform(image)


def _raw_image(dataset, index: int):
    """The untransformed image of ``dataset[index]``, bypassing the dataset's own transform."""
    load_image = getattr(dataset, "load_image", None)
    if load_image is not None:
        return load_image(index)
    sample = dataset[index]
    return None if sample is None else sample[0]
