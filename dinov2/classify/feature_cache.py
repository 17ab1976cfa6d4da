"""Frozen-backbone features computed once, for a probe that trains only the heads
(``optim.cache_features``).

The backbone runs over the un-augmented images through the evaluation feature extractor
(:func:`dinov2.eval.features.extract_features`); each row keeps the pooled ``cls`` and ``mean``
features, so every head pooling can be trained from it. Targets of every task are read from the
dataset by the index each row carries (images skipped as unreadable have no row).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import Dataset

from dinov2.eval.features import extract_features

from .data import task_targets
from .heads import MultiHeadClassifier
from .optimization import amp_dtype

POOLED_KEYS = ("cls", "mean")


class FeatureDataset(Dataset):
    """Pooled backbone features and their targets, stored once for a frozen-backbone probe."""

    def __init__(self, features: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]):
        self.features, self.targets = features, targets
        self.length = len(next(iter(targets.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return (
            {k: v[index] for k, v in self.features.items()},
            {k: v[index] for k, v in self.targets.items()},
        )


def stacked_pooled_features(model: MultiHeadClassifier, images: torch.Tensor) -> torch.Tensor:
    """(B, 2, D): the ``cls`` and ``mean`` pooled features of the classifier's backbone."""
    pooled = model.features(images)
    return torch.stack([pooled[key] for key in POOLED_KEYS], dim=1)


class _ImagesOnly(Dataset):
    """The images of a classifier dataset with a placeholder label: the extractor takes one int
    label per sample, the targets of all tasks are looked up by index afterwards."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return None if sample is None else (sample[0], -1)


def cache_features(
    model: MultiHeadClassifier,
    dataset: Dataset,
    device: torch.device,
    amp: str = "none",
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "classifier features",
) -> FeatureDataset:
    """Run the (frozen) backbone once over ``dataset``; keep pooled features on the CPU."""
    model.eval()
    extracted = extract_features(
        model,
        _ImagesOnly(dataset),
        feature_fn=stacked_pooled_features,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        autocast_dtype=amp_dtype(device, amp),
        desc=desc,
    )
    features = extracted.features.cpu()
    indices = extracted.indices.cpu()
    pooled = {key: features[:, i].contiguous() for i, key in enumerate(POOLED_KEYS)}
    return FeatureDataset(pooled, task_targets(dataset, indices.tolist()))
