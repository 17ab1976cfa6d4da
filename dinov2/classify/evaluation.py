"""Validation of a classifier: per task top-1 and balanced accuracy over the labelled samples."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch.utils.data import DataLoader

from dinov2.eval.features import is_skipped_batch
from dinov2.eval.metrics import classification_metrics

from .heads import MultiHeadClassifier
from .losses import MISSING_LABEL
from .optimization import autocast_context


def forward_logits(model: MultiHeadClassifier, inputs, device: torch.device) -> Dict[str, torch.Tensor]:
    """Logits from images, or from stored pooled features (a dict) when probing on cached features."""
    if isinstance(inputs, dict):
        return model.forward_from_features({k: v.to(device, non_blocking=True) for k, v in inputs.items()})
    return model(inputs.to(device, non_blocking=True))


@torch.no_grad()
def collect_probabilities(
    model: MultiHeadClassifier, loader: DataLoader, device: torch.device, amp: str = "none"
) -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """({task: (N, C) probabilities}, {task: (N,) labels, -1 = missing}) over a loader."""
    model.eval()
    probs: Dict[str, list] = {t: [] for t in model.task_names}
    labels: Dict[str, list] = {t: [] for t in model.task_names}
    for batch in loader:
        if is_skipped_batch(batch):  # every sample of the batch was an unreadable image (skip policy)
            continue
        images, targets = batch
        with autocast_context(device, amp):
            logits = forward_logits(model, images, device)
        for task in model.task_names:
            probs[task].append(logits[task].float().softmax(dim=-1).cpu().numpy())
            labels[task].append(targets[task].numpy())
    return (
        {t: np.concatenate(p) if p else np.zeros((0, 0)) for t, p in probs.items()},
        {t: np.concatenate(y) if y else np.zeros((0,), dtype=np.int64) for t, y in labels.items()},
    )


def evaluate(
    model: MultiHeadClassifier, loader: DataLoader, device: torch.device, amp: str = "none"
) -> Dict[str, object]:
    """Per task: top-1 and balanced accuracy over the labelled samples; ``mean_top1`` over tasks."""
    probs, labels = collect_probabilities(model, loader, device, amp)
    report: Dict[str, object] = {"tasks": {}}
    top1s = []
    for spec in model.head_specs:
        valid = labels[spec.name] != MISSING_LABEL
        if not valid.any():
            report["tasks"][spec.name] = {"num_labelled": 0, "top1": None, "balanced_accuracy": None}
            continue
        metrics = classification_metrics(labels[spec.name][valid], probs[spec.name][valid], list(spec.classes))
        report["tasks"][spec.name] = {
            "num_labelled": int(valid.sum()),
            "top1": metrics["top1"],
            "balanced_accuracy": metrics["balanced_accuracy"],
        }
        top1s.append(metrics["top1"])
    report["mean_top1"] = float(np.mean(top1s)) if top1s else None
    return report


def describe_validation(val: Dict[str, object]) -> str:
    tasks = {t: (round(m["top1"], 4) if m["top1"] is not None else None) for t, m in val["tasks"].items()}
    return f"mean top-1 {val['mean_top1']}, per task {tasks}"
