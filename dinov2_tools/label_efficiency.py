"""Where labels are few: does pretraining beat pixels, and beat training on the labels alone?

For ``n`` labelled images per class (a seeded choice from the training split; the rest of the
split stays unlabelled and unused) this compares, on the whole test split:

- logistic regression on the frozen backbone's features (``cls``: the CLS token; ``cls+avgpool``:
  the CLS token and the average patch token, upstream's linear-evaluation input);
- the same logistic regression on fixed pixel features (:mod:`dinov2_tools.trivial_baselines`);
- classifiers trained with ``dinov2.classify`` on the same labelled images: the same ViT shape from
  a random initialisation (training on the labels alone) and fine-tuned from the pretrained
  backbone, each the best of a small learning-rate x augmentation sweep.

Model selection: with one label per class nothing can be held out, so every row reports the best
test top-1 over its own small grid (``C`` for the probes, the sweep for the classifiers). The same
rule for every row; it flatters the rows with the larger grids, which are the label-only baselines.

``scripts/label_efficiency.py`` is the command line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dinov2.eval.features import BlockFeatures, as_numpy, extract_features
from dinov2.eval.knn import sample_few_shot
from dinov2.eval.linear import linear_input
from dinov2.eval.log_regression import class_probabilities, make_classifier

DEFAULT_C_VALUES = (0.001, 0.01, 0.1, 1.0, 10.0)  # pixels pick the low end
FEATURE_KINDS = ("cls", "cls+avgpool")


@dataclass(frozen=True)
class ClassifierRecipe:
    """One point of the classifier sweep."""

    lr: float
    min_scale: float  # random-resized-crop area; 1.0 = whole image, flips only

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}_scale{self.min_scale:g}"


def sweep(lrs: Sequence[float], min_scales: Sequence[float]) -> List[ClassifierRecipe]:
    """Every (learning rate, crop scale) pair: the classifier sweep of one row."""
    return [ClassifierRecipe(float(lr), float(scale)) for lr in lrs for scale in min_scales]


def labelled_indices(labels: Sequence[int], n_per_class: int, seed: int) -> np.ndarray:
    """Sorted dataset indices of ``n_per_class`` seeded images per class (all of a smaller class)."""
    labels = np.asarray(labels)
    return sample_few_shot(labels, np.arange(len(labels)), n_per_class, seed)


def backbone_features(model: torch.nn.Module, dataset, batch_size: int = 256, num_workers: int = 0):
    """``{kind: features}`` for every :data:`FEATURE_KINDS` from one pass, and the labels (numpy)."""
    features = extract_features(
        model, dataset, feature_fn=BlockFeatures(1), batch_size=batch_size, num_workers=num_workers, desc="features"
    )
    order = torch.argsort(features.indices)
    block = features.features[order]
    kinds = {kind: as_numpy(linear_input(block, 1, avgpool=kind == "cls+avgpool")) for kind in FEATURE_KINDS}
    return kinds, as_numpy(features.labels[order])


def probe_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    seed: int = 0,
) -> Dict[str, float]:
    """Standardised-feature logistic regression: the best test top-1 over ``c_values``."""
    best: Optional[Dict[str, float]] = None
    for c in c_values:
        classifier = make_classifier(float(c), standardize=True, seed=seed)
        classifier.fit(train_x, train_y)
        top1 = float(np.mean(np.argmax(class_probabilities(classifier, test_x, num_classes), axis=1) == test_y))
        if best is None or top1 > best["top1"]:
            best = {"top1": top1, "C": float(c)}
    return best


def write_labelled_subset(dataset, indices: Sequence[int], class_names: Sequence[str], root: Path) -> Path:
    """The chosen labelled images for dinov2.classify: ``root/images/<index>.png`` and
    ``root/labels.csv`` (columns ``path``, ``category``: the class name). Returns the CSV.

    A CSV rather than one folder per class: class names need not be folder names (Fashion-MNIST
    has ``T-shirt/top``), and dinov2.classify matches the test split's labels to these by name.
    ``root`` must not exist yet: images left by another choice would be trained on as well."""
    if root.exists():
        raise FileExistsError(f"{root} exists: it may hold another labelled choice; use a new --output-dir")
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for index in indices:
        image, target = dataset[int(index)]
        name = f"images/{int(index):07d}.png"
        image.convert("RGB").save(root / name)
        rows.append((name, class_names[int(target)]))
    csv_path = root / "labels.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "category"])  # the task name of classifier_overrides
        writer.writerows(rows)
    return csv_path


def classifier_epochs(steps: int, batch_size: int, num_images: int) -> int:
    """Epochs that give about ``steps`` optimiser steps whatever the number of labelled images."""
    return max(1, math.ceil(steps * batch_size / max(num_images, 1)))


def classifier_overrides(recipe: ClassifierRecipe, image_size: int, epochs: int, batch_size: int) -> List[str]:
    """dinov2.classify options of one sweep point: everything trains, heads on [CLS, mean patch].

    The test split is evaluated once, after the last epoch (the figure the table reports), and
    one resume state is written then: with one label per class a run has dozens of short epochs.
    """
    return [
        "optim.mode=full",
        f"optim.epochs={epochs}",
        f"data.val_period_epochs={epochs}",
        f"checkpointing.period_epochs={epochs}",
        f"optim.head_lr={recipe.lr}",
        f"optim.backbone_lr={recipe.lr / 2}",
        "optim.layer_decay=0.75",
        "optim.warmup_epochs=1",
        f"data.batch_size={batch_size}",
        f"data.min_scale={recipe.min_scale}",
        f"data.crop_size={image_size}",
        f"data.resize_size={image_size}",
        "data.num_workers=0",
        "heads.pooling=cls+mean",
        "heads.single_task_name=category",
        "logging.log_period_iterations=0",
        "checkpointing.resume=false",  # a sweep point is one fresh run, never an earlier one continued
    ]
