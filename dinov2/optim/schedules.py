"""Per-iteration schedules of the SSL training loop (:class:`TrainingSchedules`) and of classifier
training stages (a :class:`CosineSchedule` of the lr factor, :mod:`dinov2.classify.optimization`).

Every schedule is a function of the iteration number (no precomputed arrays), so it costs nothing
for long runs and gives the same value whether a run was resumed or not.

A :class:`CosineSchedule` is, in order: ``freeze_iters`` iterations at 0, ``warmup_iters``
iterations rising linearly from ``start_warmup_value`` to ``base_value``, then a half cosine from
``base_value`` down to ``final_value`` that ends at ``total_iters``; after that it stays at
``final_value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

__all__ = [
    "CosineSchedule",
    "FrozenPrefixSchedule",
    "TrainingSchedules",
    "scaled_learning_rate",
    "build_schedules",
    "SCALING_RULES",
]

SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


@dataclass(frozen=True)
class CosineSchedule:
    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self):
        for name in ("total_iters", "warmup_iters", "freeze_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"CosineSchedule: {name} must be >= 0, got {getattr(self, name)}")
        if self.freeze_iters + self.warmup_iters > self.total_iters:
            raise ValueError(
                f"CosineSchedule: freeze ({self.freeze_iters}) + warm-up ({self.warmup_iters}) iterations "
                f"exceed the schedule length ({self.total_iters})"
            )

    def __call__(self, iteration: int) -> float:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if iteration < self.freeze_iters:
            return 0.0
        step = iteration - self.freeze_iters
        if step < self.warmup_iters:
            # Linear ramp whose last warm-up iteration reaches base_value exactly.
            if self.warmup_iters == 1:
                return float(self.base_value)
            fraction = step / (self.warmup_iters - 1)
            return self.start_warmup_value + fraction * (self.base_value - self.start_warmup_value)
        step -= self.warmup_iters
        cosine_iters = self.total_iters - self.freeze_iters - self.warmup_iters
        if step >= cosine_iters:
            return float(self.final_value)
        progress = step / cosine_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + math.cos(math.pi * progress))


def scaled_learning_rate(base_lr: float, global_batch_size: int, rule: str) -> float:
    """``optim.base_lr`` scaled to the global batch size by ``optim.scaling_rule``."""
    if global_batch_size <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch_size}")
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.scaling_rule must be one of {SCALING_RULES}, got {rule!r}")


class FrozenPrefixSchedule:
    """A schedule that is 0 for the first ``freeze_iters`` iterations and ``inner`` afterwards."""

    def __init__(self, inner: CosineSchedule, freeze_iters: int):
        if freeze_iters < 0:
            raise ValueError(f"freeze iterations must be >= 0, got {freeze_iters}")
        self.inner = inner
        self.freeze_iters = freeze_iters

    def __call__(self, iteration: int) -> float:
        return 0.0 if iteration < self.freeze_iters else self.inner(iteration)


@dataclass(frozen=True)
class TrainingSchedules:
    """All the values the loop sets at each iteration."""

    lr: CosineSchedule
    last_layer_lr: "FrozenPrefixSchedule"  # lr with the first epoch(s) at 0: the prototypes stay frozen
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    total_iters: int

    def at(self, iteration: int) -> dict:
        return {
            "lr": self.lr(iteration),
            "last_layer_lr": self.last_layer_lr(iteration),
            "wd": self.weight_decay(iteration),
            "momentum": self.momentum(iteration),
            "teacher_temp": self.teacher_temp(iteration),
        }

    def last_layer_frozen(self, iteration: int) -> bool:
        return iteration < self.last_layer_lr.freeze_iters


def _iterations(cfg: DictConfig, epochs_key: str, iterations_key: str, epoch_length: int) -> int:
    """A schedule length: ``iterations_key`` when set, else ``epochs_key`` x the epoch length."""
    section, name = iterations_key.split(".")
    iterations = cfg[section][name]
    if iterations is not None:
        if int(iterations) < 0:
            raise ValueError(f"{iterations_key} must be >= 0, got {iterations}")
        return int(iterations)
    section, name = epochs_key.split(".")
    return int(round(cfg[section][name] * epoch_length))


def build_schedules(cfg: DictConfig, lr: float) -> TrainingSchedules:
    """Schedules over ``optim.total_iterations`` (or ``optim.epochs * train.OFFICIAL_EPOCH_LENGTH``)
    iterations, each warm-up and freeze given by its ``*_iterations`` key or else its ``*_epochs``
    key; ``lr`` is the peak (scaled) learning rate (see :func:`scaled_learning_rate`)."""
    epoch_length = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    if epoch_length <= 0:
        raise ValueError(f"train.OFFICIAL_EPOCH_LENGTH must be positive, got {epoch_length}")
    total = _iterations(cfg, "optim.epochs", "optim.total_iterations", epoch_length)
    if total <= 0:
        raise ValueError(f"the schedule length (optim.epochs or optim.total_iterations) must be positive, got {total}")
    warmup = _iterations(cfg, "optim.warmup_epochs", "optim.warmup_iterations", epoch_length)
    freeze = _iterations(cfg, "optim.freeze_last_layer_epochs", "optim.freeze_last_layer_iterations", epoch_length)
    lr_schedule = CosineSchedule(float(lr), cfg.optim.min_lr, total, warmup_iters=warmup, start_warmup_value=0.0)
    # The frozen span replaces the first iterations: the last layer then follows the same curve.
    last_layer_lr = FrozenPrefixSchedule(lr_schedule, freeze)
    weight_decay = CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    momentum = CosineSchedule(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total)
    temp_warmup = _iterations(
        cfg, "teacher.warmup_teacher_temp_epochs", "teacher.warmup_teacher_temp_iterations", epoch_length
    )
    if temp_warmup > total:
        raise ValueError(
            f"the teacher temperature warm-up ({temp_warmup} iterations) is longer than the schedule ({total})"
        )
    teacher_temp = CosineSchedule(
        cfg.teacher.teacher_temp,
        cfg.teacher.teacher_temp,
        total,
        warmup_iters=temp_warmup,
        start_warmup_value=cfg.teacher.warmup_teacher_temp,
    )
    return TrainingSchedules(lr_schedule, last_layer_lr, weight_decay, momentum, teacher_temp, total)
