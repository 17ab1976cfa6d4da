"""Self-supervised training: SSLMetaArch (student, EMA teacher, losses), schedules, parameter
groups, the seeded data pipeline and the training loop. See docs/training.md."""

from dinov2.optim import (
    CosineSchedule,
    TrainingSchedules,
    apply_optim_scheduler,
    build_optimizer,
    build_schedules,
    get_params_groups,
    scaled_learning_rate,
)
from dinov2.train.ssl_meta_arch import SSLMetaArch

__all__ = [
    "CosineSchedule",
    "SSLMetaArch",
    "TrainingSchedules",
    "apply_optim_scheduler",
    "build_optimizer",
    "build_schedules",
    "get_params_groups",
    "scaled_learning_rate",
]
