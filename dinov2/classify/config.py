"""Options of classifier training, loaded like training's (:mod:`dinov2.utils.config`).

Defaults in ``configs/classify/default.yaml``, then an optional YAML file (``--config-file``),
then ``key=value`` overrides from the command line. Unknown keys (with the nearest valid one),
values of the wrong type or outside :data:`SCHEMA`'s rules, options that do not fit together and
retired keys (:data:`RETIRED_KEYS`, naming their replacement) raise
:class:`dinov2.utils.config.ConfigError`, once, at load; the config is read-only afterwards and
written to ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from omegaconf import DictConfig
from torchvision.transforms import InterpolationMode

from dinov2.utils.config import ConfigError, ConfigSchema, Length, OneOf, Range, load_task_config
from dinov2.utils.tracking import WANDB_MODES

from .heads import POOLINGS

MODES = ("probe", "partial", "full", "lpft")
AMP_MODES = ("none", "bf16", "fp16")
INTERPOLATIONS = tuple(mode.value for mode in InterpolationMode)

# The type of each option whose default is null (tests/test_classify_config.py keeps it complete).
NULL_DEFAULT_TYPES = {
    "output_dir": "str",
    "device": "str",
    "backbone.weights": "str",
    "backbone.img_size": "int",
    "backbone.embed_dim": "int",
    "backbone.depth": "int",
    "backbone.num_heads": "int",
    "heads.tasks": "list",
    "data.train": "str",
    "data.val": "str",
    "data.max_train_samples": "int",
    "data.max_val_samples": "int",
    "data.resize_size": "int",
    "data.mean": "list",
    "data.std": "list",
    "data.eval_batch_size": "int",
    "optim.max_steps_per_epoch": "int",
    "lpft.head_lr": "float",
}

# Keys renamed to match training's sections (checkpointing.*, logging.*).
RETIRED_KEYS = {
    "log_every": ("logging.log_period_iterations", "training's name for the steps between log lines"),
    "checkpoint.every_epochs": ("checkpointing.period_epochs", "the section is named as training's"),
    "checkpoint.keep": ("checkpointing.keep_last", "training's name for the resume states kept"),
    "checkpoint.resume": ("checkpointing.resume", "the section is named as training's"),
}

_NON_NEGATIVE = Range(0)
_POSITIVE = Range(0, low_open=True)
_SHARE = Range(0, 1, high_open=True)
RULES = {
    "backbone.patch_size": Range(1),
    "backbone.img_size": Range(1),
    "backbone.embed_dim": Range(1),
    "backbone.depth": Range(1),
    "backbone.num_heads": Range(1),
    "backbone.num_register_tokens": _NON_NEGATIVE,
    "backbone.drop_path_rate": _SHARE,
    "heads.pooling": OneOf(POOLINGS),
    "heads.dropout": _SHARE,
    "heads.loss_weights": _NON_NEGATIVE,
    "data.val_fraction": _SHARE,
    "data.max_train_samples": Range(1),
    "data.max_val_samples": Range(1),
    "data.crop_size": Range(1),
    "data.resize_size": Range(1),
    "data.mean": (Length(3), Range()),
    "data.std": (Length(3), _POSITIVE),
    "data.interpolation": OneOf(INTERPOLATIONS),
    "data.min_scale": Range(0, 1, low_open=True),
    "data.batch_size": Range(1),
    "data.eval_batch_size": Range(1),
    "data.num_workers": _NON_NEGATIVE,
    "optim.mode": OneOf(MODES),
    "optim.epochs": Range(1),
    "optim.head_lr": _NON_NEGATIVE,
    "optim.backbone_lr": _NON_NEGATIVE,
    "optim.layer_decay": Range(0, 1, low_open=True),
    "optim.unfreeze_last_k": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.warmup_epochs": _NON_NEGATIVE,
    "optim.min_lr_ratio": Range(0, 1),
    "optim.grad_clip": _POSITIVE,
    "optim.label_smoothing": _SHARE,
    "optim.amp": OneOf(AMP_MODES),
    "optim.max_steps_per_epoch": Range(1),
    "lpft.probe_epochs": _NON_NEGATIVE,
    "lpft.r": Range(1),
    "lpft.alpha": _POSITIVE,
    "lpft.dropout": _SHARE,
    "lpft.lr": _NON_NEGATIVE,
    "lpft.head_lr": _NON_NEGATIVE,
    "data.val_period_epochs": Range(1),
    "checkpointing.period_epochs": Range(1),
    "logging.log_period_iterations": _NON_NEGATIVE,
    "logging.wandb.mode": OneOf(WANDB_MODES),
}


def _check_together(cfg: DictConfig) -> None:
    """Options that are each valid but do not fit together."""
    if cfg.optim.mode == "lpft" and not cfg.lpft.probe_epochs < cfg.optim.epochs:
        raise ConfigError(
            f"'lpft.probe_epochs' ({cfg.lpft.probe_epochs}) must be in [0, optim.epochs={cfg.optim.epochs})"
        )
    if cfg.optim.cache_features and cfg.optim.mode != "probe":
        raise ConfigError(f"'optim.cache_features' needs optim.mode=probe (a frozen backbone), got {cfg.optim.mode!r}")
    if cfg.data.val is not None and cfg.data.val_fraction > 0:
        raise ConfigError("set either 'data.val' or 'data.val_fraction', not both")
    if cfg.data.resize_size is not None and cfg.data.resize_size < cfg.data.crop_size:
        raise ConfigError(f"'data.resize_size' {cfg.data.resize_size} must be >= 'data.crop_size' {cfg.data.crop_size}")


SCHEMA = ConfigSchema(
    name="classifier training",
    defaults=("classify/default.yaml",),
    null_types=NULL_DEFAULT_TYPES,
    retired=RETIRED_KEYS,
    rules=RULES,
    required=("output_dir", "data.train"),
    checks=(_check_together,),
    open_sections=("heads.loss_weights",),
)


def load_classify_config(config_file: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then ``config_file``, then ``key=value`` overrides; validated and read-only."""
    return load_task_config(SCHEMA, config_file, overrides)
