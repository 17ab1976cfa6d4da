"""Optimisation shared by the SSL trainer (:mod:`dinov2.train`) and classifier training
(:mod:`dinov2.classify`): per-iteration schedules, AdamW parameter groups (layer-wise lr decay,
no-decay rules), optimizer construction and gradient clipping."""

from .grad_clip import CLIP_GRAD_SCOPES, check_clip_grad_scope, clip_gradients, clip_student_gradients
from .optimizers import build_head_backbone_optimizer, build_optimizer
from .param_groups import (
    apply_optim_scheduler,
    fuse_params_groups,
    get_params_groups,
    param_multipliers,
    peak_lr_groups,
    scale_learning_rates,
)
from .schedules import (
    SCALING_RULES,
    CosineSchedule,
    FrozenPrefixSchedule,
    TrainingSchedules,
    build_schedules,
    scaled_learning_rate,
)

__all__ = [
    "CLIP_GRAD_SCOPES",
    "SCALING_RULES",
    "CosineSchedule",
    "FrozenPrefixSchedule",
    "TrainingSchedules",
    "apply_optim_scheduler",
    "build_head_backbone_optimizer",
    "build_optimizer",
    "build_schedules",
    "check_clip_grad_scope",
    "clip_gradients",
    "clip_student_gradients",
    "fuse_params_groups",
    "get_params_groups",
    "param_multipliers",
    "peak_lr_groups",
    "scale_learning_rates",
    "scaled_learning_rate",
]
