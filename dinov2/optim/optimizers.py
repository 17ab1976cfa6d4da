"""AdamW construction for the two trainers: the SSL student and a classifier (heads on a backbone).

Both use the layer ids and no-decay rules of :func:`dinov2.optim.param_groups.param_multipliers`.
The SSL loop sets lr and weight decay from its schedules at every iteration
(:func:`~dinov2.optim.param_groups.apply_optim_scheduler`); a classifier's groups keep fixed peak
rates that its schedule scales (:func:`~dinov2.optim.param_groups.scale_learning_rates`).

Both pick one of torch's AdamW implementations (:func:`adamw_implementation`, the SSL trainer's
``optim.adamw_implementation``): ``fused`` (the whole update of a tensor list in one kernel),
``foreach`` (multi-tensor kernels, one per operation) or ``for_loop`` (kernels per tensor). They
compute the same update up to float rounding. torch's own default never picks ``fused``, and picks
``foreach`` only for plain CUDA tensors (so the CPU and FSDP2's DTensor parameters would get the
per-tensor loop): the choice is made here.
"""

from __future__ import annotations

import logging
from typing import Iterable, Tuple

import torch
from torch import nn
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

from .grad_clip import check_clip_grad_scope
from .param_groups import fuse_params_groups, get_params_groups, param_multipliers, peak_lr_groups

logger = logging.getLogger("dinov2")

__all__ = ["ADAMW_IMPLEMENTATIONS", "adamw", "adamw_implementation", "build_optimizer", "build_head_backbone_optimizer"]

# What optim.adamw_implementation accepts; "auto" resolves to one of the others.
ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


def adamw_implementation(params: Iterable[torch.Tensor], requested: str = "auto") -> str:
    """The AdamW implementation for ``params``: ``requested`` itself, checked, or for ``"auto"``
    ``fused`` where torch has the fused kernel for every parameter's device (CUDA, CPU, MPS, XPU,
    ...; floating-point parameters; FSDP2's DTensors included, DTensor runs ``_fused_adamw_`` on each
    local shard), else ``foreach``, else ``for_loop``.

    ``fused`` is also the choice on the CPU: one AdamW step over the Quick, Draw! recipe's student
    (60 tensors, 1.4 M values) took 16 ms fused, 48 ms foreach and 43 ms for_loop (1 thread, median
    of 20 steps, best of 3 rounds; the reference configuration's 2.4 M values: 21, 69, 69 ms).
    Raises ``ValueError`` naming ``optim.adamw_implementation`` for an unknown name or one that the
    parameters' devices lack.
    """
    if requested not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"optim.adamw_implementation must be one of {list(ADAMW_IMPLEMENTATIONS)}, got {requested!r}")
    params = list(params)
    devices = sorted({p.device.type for p in params})  # a DTensor's is its local shard's
    floating = all(torch.is_floating_point(p) for p in params)
    fused_ok = floating and all(d in _get_fused_kernels_supported_devices() for d in devices)
    # torch's foreach ops run on the CPU too (a C++ loop over the tensors), as torch.optim allows.
    foreach_ok = all(d in _get_foreach_kernels_supported_devices() + ["cpu"] for d in devices)
    if requested == "auto":
        return "fused" if fused_ok else "foreach" if foreach_ok else "for_loop"
    if requested == "fused" and not fused_ok:
        raise ValueError(
            f"optim.adamw_implementation=fused: torch has no fused AdamW for parameters on {devices} "
            f"(all floating point: {floating}); use auto, foreach or for_loop"
        )
    if requested == "foreach" and not foreach_ok:
        raise ValueError(
            f"optim.adamw_implementation=foreach: torch has no multi-tensor kernels for parameters on {devices}; "
            "use auto or for_loop"
        )
    return requested


def adamw(groups, betas: Tuple[float, float], implementation: str = "auto") -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over parameter ``groups`` with the implementation
    :func:`adamw_implementation` picks (logged)."""
    params = [p for group in groups for p in group["params"]]
    chosen = adamw_implementation(params, implementation)
    logger.info("AdamW: %s implementation (optim.adamw_implementation=%s)", chosen, implementation)
    fused, foreach = chosen == "fused", chosen == "foreach"
    optimizer = torch.optim.AdamW(groups, betas=betas, fused=fused, foreach=foreach)

    def keep_implementation(opt: torch.optim.Optimizer) -> None:
        # load_state_dict takes every group option from the saved state, "fused" and "foreach"
        # included: a checkpoint would otherwise bring back the implementation it was written with.
        for group in opt.param_groups:
            group["fused"], group["foreach"] = fused, foreach
            for param in group["params"] if fused else ():
                state = opt.state.get(param)
                if state and "step" in state:  # the fused kernel reads its step count on the device
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)

    optimizer.register_load_state_dict_post_hook(keep_implementation)
    return optimizer


def build_optimizer(student: nn.Module, depth: int, optim_cfg) -> torch.optim.AdamW:
    """AdamW over the student's parameters with fused multiplier groups.

    ``optim_cfg`` is the ``optim`` config section (``layerwise_decay``, ``patch_embed_lr_mult``,
    ``adamw_beta1``, ``adamw_beta2``, ``adamw_implementation``). lr and weight decay are set by the
    loop every iteration.
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
    betas = (float(optim_cfg.adamw_beta1), float(optim_cfg.adamw_beta2))
    # .get: configs saved before the key existed (a resumed old run) mean the default.
    return adamw(groups, betas, str(optim_cfg.get("adamw_implementation", "auto")))


def build_head_backbone_optimizer(
    model: nn.Module,
    head_lr: float,
    backbone_lr: float,
    layer_decay: float,
    weight_decay: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    implementation: str = "auto",
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of a model with a ``backbone`` and ``heads``.

    Heads train at ``head_lr`` (no weight decay on 1-d parameters); backbone parameters at
    ``backbone_lr * layer_decay ** (depth + 1 - layer)`` with the SSL training's layer ids and
    no-decay rules (their names start with ``backbone.``, as the student's do). Each group holds
    its peak lr as ``base_lr``. ``implementation``: see :func:`adamw_implementation`.
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
    return adamw(groups, betas, implementation)
