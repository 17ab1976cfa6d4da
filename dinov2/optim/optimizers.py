"""AdamW construction for the two trainers: the SSL student and a classifier (heads on a backbone).

Both use the layer ids and no-decay rules of :func:`dinov2.optim.param_groups.param_multipliers`.
The SSL loop sets lr and weight decay from its schedules at every iteration
(:func:`~dinov2.optim.param_groups.apply_optim_scheduler`); a classifier's groups keep fixed peak
rates that its schedule scales (:func:`~dinov2.optim.param_groups.scale_learning_rates`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .grad_clip import check_clip_grad_scope
from .param_groups import fuse_params_groups, get_params_groups, param_multipliers, peak_lr_groups

__all__ = ["build_optimizer", "build_head_backbone_optimizer"]


def build_optimizer(student: nn.Module, depth: int, optim_cfg) -> torch.optim.AdamW:
    """AdamW over the student's parameters with fused multiplier groups.

    ``optim_cfg`` is the ``optim`` config section (``layerwise_decay``, ``patch_embed_lr_mult``,
    ``adamw_beta1``, ``adamw_beta2``). lr and weight decay are set by the loop every iteration.
    ``optim.clip_grad_scope`` is checked here as well, so a wrong value fails at start-up rather
    than at the first step.
    """
    check_clip_grad_scope(optim_cfg.clip_grad_scope)
    groups = fuse_params_groups(
        get_params_groups(
            student.named_parameters(),
            depth,
            layerwise_decay=float(optim_cfg.layerwise_decay),
            patch_embed_lr_mult=float(optim_cfg.patch_embed_lr_mult),
        )
    )
    if not groups:
        raise ValueError("the student has no trainable parameters")
    for group in groups:
        del group["names"]  # inspection only; keep the optimizer state dict small and plain
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
    return torch.optim.AdamW(groups, betas=(float(optim_cfg.adamw_beta1), float(optim_cfg.adamw_beta2)))


def build_head_backbone_optimizer(
    model: nn.Module,
    head_lr: float,
    backbone_lr: float,
    layer_decay: float,
    weight_decay: float,
    betas: Tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of a model with a ``backbone`` and ``heads``.

    Heads train at ``head_lr`` (no weight decay on 1-d parameters); backbone parameters at
    ``backbone_lr * layer_decay ** (depth + 1 - layer)`` with the SSL training's layer ids and
    no-decay rules (their names start with ``backbone.``, as the student's do). Each group holds
    its peak lr as ``base_lr``.
    """
    blocks = getattr(model.backbone, "blocks", None)
    depth = len(blocks) if blocks is not None else 0

    def lr_and_weight_decay(name: str, param: nn.Parameter) -> Tuple[float, float]:
        if name.startswith("heads."):
            # Task names are free text: the name-based no-decay rule could match one ("norm_x").
            return head_lr, (0.0 if param.ndim == 1 else weight_decay)
        mult = param_multipliers(name, depth, layer_decay, patch_embed_lr_mult=1.0)
        return backbone_lr * mult["lr_multiplier"], weight_decay * mult["wd_multiplier"]

    groups = peak_lr_groups(model.named_parameters(), lr_and_weight_decay)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return torch.optim.AdamW(groups, betas=betas)
