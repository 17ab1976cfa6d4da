"""One training epoch of a classifier: scheduled lr, masked multi-task loss, clipped AdamW steps."""

from __future__ import annotations

import logging
import time
from typing import Dict, Iterable

import torch
from omegaconf import DictConfig

from dinov2.data.image_io import SKIPPED_KEY
from dinov2.eval.features import is_skipped_batch
from dinov2.optim import CosineSchedule, clip_gradients, scale_learning_rates

from .evaluation import forward_logits
from .heads import MultiHeadClassifier
from .losses import multitask_loss
from .optimization import autocast_context
from .stages import Stage

logger = logging.getLogger("dinov2")


def train_one_epoch(
    model: MultiHeadClassifier,
    batches: Iterable,
    epoch: int,
    steps: int,
    stage: Stage,
    optimizer: torch.optim.Optimizer,
    schedule: CosineSchedule,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    cfg: DictConfig,
) -> Dict[str, object]:
    """Train ``steps`` batches of epoch ``epoch`` (0-based); returns the epoch's metrics record.

    The lr factor is ``schedule`` at the step counted from the start of ``stage``. A non-finite
    loss stops training with :class:`FloatingPointError` naming the epoch and step.
    """
    model.train()
    if model.backbone_is_frozen():
        model.backbone.eval()  # no dropout / stochastic depth in a frozen feature extractor
    weights = dict(cfg.heads.loss_weights)
    totals: Dict[str, float] = {}
    count, skipped, started = 0, 0, time.time()
    for i, batch in enumerate(batches):
        if i >= steps:
            break
        if is_skipped_batch(batch):  # all images of this batch were unreadable and skipped
            skipped += batch[SKIPPED_KEY]
            continue
        images, targets = batch
        scale_learning_rates(optimizer, schedule((epoch - stage.first_epoch) * steps + i))
        with autocast_context(device, cfg.optim.amp):
            logits = forward_logits(model, images, device)
        targets = {task: t.to(device, non_blocking=True) for task, t in targets.items()}
        loss, per_task = multitask_loss(logits, targets, weights, label_smoothing=cfg.optim.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            clip_gradients([p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        count += 1
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for task, value in per_task.items():
            totals[f"loss_{task}"] = totals.get(f"loss_{task}", 0.0) + value.item()
        period = cfg.logging.log_period_iterations
        if period and (i + 1) % period == 0:
            logger.info("classify: epoch %d step %d/%d loss %.4f", epoch + 1, i + 1, steps, loss.item())
    report: Dict[str, object] = {
        "epoch": epoch + 1,
        "stage": stage.name,
        "steps": count,
        "lr_factor": schedule(max(0, (epoch - stage.first_epoch + 1) * steps - 1)),
        "seconds": round(time.time() - started, 2),
        "train": {k: v / max(count, 1) for k, v in totals.items()},
    }
    if skipped:
        report["skipped_images"] = skipped
    return report
