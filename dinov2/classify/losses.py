"""Multi-task cross entropy where a label of -1 means "no label for this task".

Each task's loss is the mean over the samples that have a label for it. A task with no labelled
sample in the batch contributes exactly 0 and no gradient (a plain ``mean`` with ``ignore_index``
would divide by zero and produce NaN).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

MISSING_LABEL = -1


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross entropy over the entries of ``targets`` that are not -1 (0 if there are none)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    valid = targets != MISSING_LABEL
    bad = targets[valid & ((targets < 0) | (targets >= logits.shape[1]))]
    if bad.numel():
        raise ValueError(f"labels {sorted(set(bad.tolist()))} out of range for {logits.shape[1]} classes")
    count = valid.sum()
    total = F.cross_entropy(
        logits.float(), targets.long(), ignore_index=MISSING_LABEL, reduction="sum", label_smoothing=label_smoothing
    )
    return total / count.clamp(min=1)


def multitask_loss(
    logits: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    weights: Optional[Mapping[str, float]] = None,
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(weighted sum over tasks, per-task losses); tasks missing from ``targets`` are an error."""
    missing = sorted(set(logits) - set(targets))
    if missing:
        raise KeyError(f"no targets for tasks {missing}; targets have {sorted(targets)}")
    per_task = {
        task: masked_cross_entropy(task_logits, targets[task], label_smoothing) for task, task_logits in logits.items()
    }
    weights = weights or {}
    total = sum(float(weights.get(task, 1.0)) * loss for task, loss in per_task.items())
    return total, per_task
