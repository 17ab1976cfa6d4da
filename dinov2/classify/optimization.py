"""Optimisation of one classifier training stage, on the shared :mod:`dinov2.optim`.

Heads train at ``optim.head_lr``; backbone parameters at ``optim.backbone_lr`` times
``layer_decay ** (depth + 1 - layer)`` (the LoRA stage: adapters at ``lpft.lr``, heads at
``lpft.head_lr``, default ``optim.head_lr / 10``). Every stage has its own linear warm-up then
cosine decay of a factor on those peaks, stepped per iteration.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from omegaconf import DictConfig

from dinov2.optim import CosineSchedule, build_head_backbone_optimizer

from .heads import MultiHeadClassifier
from .stages import Stage

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(
    model: MultiHeadClassifier, head_lr: float, backbone_lr: float, layer_decay: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; each group remembers its peak lr as ``base_lr``."""
    return build_head_backbone_optimizer(model, head_lr, backbone_lr, layer_decay, weight_decay)


def stage_optimizer(model: MultiHeadClassifier, stage: Stage, cfg: DictConfig) -> torch.optim.AdamW:
    """The optimizer of ``stage`` over the parameters it trains (see :func:`set_trainable`)."""
    o = cfg.optim
    if stage.name == "lora":
        head_lr = cfg.lpft.head_lr if cfg.lpft.head_lr is not None else o.head_lr / 10
        return build_optimizer(model, head_lr, cfg.lpft.lr, o.layer_decay, o.weight_decay)
    return build_optimizer(model, o.head_lr, o.backbone_lr, o.layer_decay, o.weight_decay)


def stage_schedule(stage: Stage, steps_per_epoch: int, warmup_epochs: float, min_lr_ratio: float) -> CosineSchedule:
    """The lr factor of ``stage`` by step within the stage: 0 -> 1 over the warm-up, then cosine."""
    total = stage.epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    return CosineSchedule(base_value=1.0, final_value=min_lr_ratio, total_iters=total, warmup_iters=warmup)


def amp_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``optim.amp`` (None: full precision); fp16 only on CUDA."""
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"optim.amp=fp16 needs a CUDA device (got {device.type}); use bf16")
    return AMP_DTYPES[amp]


def autocast_context(device: torch.device, amp: str):
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
