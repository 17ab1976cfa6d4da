"""Options of classifier training, as typed dataclasses merged with OmegaConf.

Defaults here, then an optional YAML file, then ``key=value`` overrides from the command line.
Unknown keys and values of the wrong type raise :class:`dinov2.utils.config.ConfigError` naming
the key. The merged config is written to ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.utils.config import ConfigError, parse_overrides

MODES = ("probe", "partial", "full", "lpft")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class BackboneOptions:
    # random | hub:<entry> | training output dir | weights file | timm:<name>  (dinov2.hub.sources)
    source: str = "random"
    weights: Optional[str] = None  # weights for hub:/timm:, or another export of a training dir
    arch: str = "vit_small"  # shape of a random backbone ...
    patch_size: int = 16
    img_size: Optional[int] = None  # ... (default: data.crop_size)
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None  # also overrides the embed_dim // 64 guess for weights files
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0  # stochastic depth while fine-tuning


@dataclass
class HeadOptions:
    pooling: str = "cls"  # cls | mean | cls+mean
    tasks: Optional[List[str]] = None  # default: every task (label column) of the training set
    single_task_name: str = "label"  # task name for single-label datasets
    dropout: float = 0.0
    loss_weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class DataOptions:
    train: str = MISSING  # dataset spec, e.g. CSV:path=/data/labels.csv
    val: Optional[str] = None  # dataset spec; or carve val_fraction out of train
    val_fraction: float = 0.0
    max_train_samples: Optional[int] = None  # random subset (benchmarks, smoke runs)
    max_val_samples: Optional[int] = None
    crop_size: int = 224
    resize_size: Optional[int] = None  # default crop_size * 8/7
    # Normalisation; default: the training run's crops.mean/std for a training-output backbone,
    # ImageNet statistics otherwise.
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    interpolation: str = "bicubic"
    min_scale: float = 0.35  # RandomResizedCrop scale range (min_scale, 1)
    hflip: bool = True
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    num_workers: int = 2


@dataclass
class OptimOptions:
    mode: str = "probe"  # probe | partial | full | lpft
    epochs: int = 10  # all epochs; with lpft, lpft.probe_epochs of them are stage 1
    head_lr: float = 1e-3
    backbone_lr: float = 5e-5  # top block; lower blocks get layer_decay ** distance
    layer_decay: float = 0.75
    unfreeze_last_k: int = 2  # mode=partial
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine ends at this fraction of the peak
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    amp: str = "none"  # none | bf16 | fp16 (CUDA)
    max_steps_per_epoch: Optional[int] = None
    # mode=probe only: run the frozen backbone once over un-augmented train / val images and
    # train the heads on the stored pooled features (much faster; no training augmentation).
    cache_features: bool = False


@dataclass
class LPFTOptions:
    probe_epochs: int = 5  # stage 1: heads on the frozen backbone
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    mlp: bool = False  # adapters on the MLP projections too
    lr: float = 1e-3  # adapter lr (stage 2), layer_decay applies
    head_lr: Optional[float] = None  # stage 2 head lr (default optim.head_lr / 10)
    merge_on_export: bool = True  # model_*.pth hold merged weights


@dataclass
class CheckpointOptions:
    every_epochs: int = 1
    keep: int = 2  # newest resume states kept in checkpoints/ (<= 0: all; the SSL checkpoints' retention)
    resume: bool = True


@dataclass
class ClassifyConfig:
    output_dir: str = MISSING
    seed: int = 0
    device: Optional[str] = None  # default: cuda, then mps, then cpu
    log_every: int = 50
    backbone: BackboneOptions = field(default_factory=BackboneOptions)
    heads: HeadOptions = field(default_factory=HeadOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    lpft: LPFTOptions = field(default_factory=LPFTOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)


def _check_values(cfg: DictConfig) -> None:
    def bad(key, value, allowed):
        raise ConfigError(f"'{key}' must be one of {allowed}, got {value!r}")

    if cfg.optim.mode not in MODES:
        bad("optim.mode", cfg.optim.mode, MODES)
    if cfg.optim.amp not in AMP_MODES:
        bad("optim.amp", cfg.optim.amp, AMP_MODES)
    from .heads import POOLINGS

    if cfg.heads.pooling not in POOLINGS:
        bad("heads.pooling", cfg.heads.pooling, POOLINGS)
    if cfg.optim.epochs < 1:
        raise ConfigError(f"'optim.epochs' must be >= 1, got {cfg.optim.epochs}")
    if cfg.optim.mode == "lpft" and not 0 <= cfg.lpft.probe_epochs < cfg.optim.epochs:
        raise ConfigError(
            f"'lpft.probe_epochs' ({cfg.lpft.probe_epochs}) must be in [0, optim.epochs={cfg.optim.epochs})"
        )
    if cfg.optim.cache_features and cfg.optim.mode != "probe":
        raise ConfigError(f"'optim.cache_features' needs optim.mode=probe (a frozen backbone), got {cfg.optim.mode!r}")
    if cfg.data.val is not None and cfg.data.val_fraction > 0:
        raise ConfigError("set either 'data.val' or 'data.val_fraction', not both")


def load_classify_config(config_file: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then ``config_file``, then ``key=value`` overrides; checked."""
    cfg = OmegaConf.structured(ClassifyConfig)
    layers = []
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        try:
            layers.append((OmegaConf.load(path), str(path)))
        except Exception as error:
            raise ConfigError(f"cannot parse config file {path}: {error}") from None
    if overrides:
        layers.append((parse_overrides(overrides), "command-line override"))
    for layer, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{source}: {error}".splitlines()[0]) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required options not set: {missing}")
    _check_values(cfg)
    return cfg
