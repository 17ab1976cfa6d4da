"""AdamW parameter groups: layer-wise lr decay, patch-embed lr multiplier, no weight decay on
biases, norms and LayerScale, and (SSL student) a flag on the prototypes (``last_layer``) so the
loop can freeze them.

Every parameter gets three attributes: ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``.
Parameters sharing all three are fused into one optimizer group; the loop multiplies the scheduled
lr / weight decay by the group's multipliers at each iteration (:func:`apply_optim_scheduler`).

Layer ids (as in DINOv2 / BEiT): the embeddings (``patch_embed``, ``pos_embed``, ``cls_token``,
``register_tokens`` or DINOv3's ``storage_tokens``, ``mask_token``) are layer 0, ``blocks.<i>``
is layer ``i + 1``, everything else (the final ``norm`` and the heads) is layer ``depth + 1``. The lr multiplier is
``layerwise_decay ** (depth + 1 - layer_id)``, so the heads train at the full lr and each block
below at ``layerwise_decay`` times the one above.

Names are those of ``SSLMetaArch.student`` (``backbone.blocks.3.attn.qkv.weight``,
``dino_head.mlp.0.bias``...). FSDP2 keeps parameter names, so this works on a sharded model too.
The prototypes (``last_layer.weight_v``) and their trained magnitudes (``last_layer.weight_g``,
unless ``head_norm_last_layer``) share the prototype group, both weight-decayed, as upstream.

Classifier training (:mod:`dinov2.classify`) uses the same layer ids and no-decay rules for its
backbone, but fixed peak rates per group: :func:`peak_lr_groups` fuses parameters by their
(peak lr, weight decay) and :func:`scale_learning_rates` applies the scheduled factor.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Tuple

import torch
from torch import nn

__all__ = [
    "param_multipliers",
    "get_params_groups",
    "fuse_params_groups",
    "apply_optim_scheduler",
    "peak_lr_groups",
    "scale_learning_rates",
]

_EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "register_tokens", "storage_tokens", "mask_token")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _layer_id(name: str, depth: int) -> int:
    """Layer id of a student parameter name (see module docstring)."""
    if name.startswith("backbone."):
        local = name[len("backbone.") :]
        if local.split(".")[0] in _EMBEDDING_NAMES:
            return 0
        match = _BLOCK_RE.search("." + local)
        if match:
            return int(match.group(1)) + 1
    return depth + 1


def param_multipliers(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> Dict[str, float]:
    """``{"lr_multiplier", "wd_multiplier", "is_last_layer"}`` of one student parameter name."""
    lr_multiplier = layerwise_decay ** (depth + 1 - _layer_id(name, depth))
    if ".patch_embed." in f".{name}":
        lr_multiplier *= patch_embed_lr_mult
    # Biases, norm weights and LayerScale gammas are not decayed: shrinking them towards 0 only
    # hurts (a LayerNorm weight at 0 kills the channel).
    leaf = name.rsplit(".", 1)[-1]
    no_decay = leaf == "bias" or "norm" in name or leaf == "gamma"
    return {
        "lr_multiplier": float(lr_multiplier),
        "wd_multiplier": 0.0 if no_decay else 1.0,
        "is_last_layer": "last_layer" in name,
    }


def get_params_groups(
    named_parameters: Iterable[Tuple[str, nn.Parameter]],
    depth: int,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
) -> List[dict]:
    """One group per trainable parameter, with its multipliers (names kept for inspection)."""
    groups = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        group = {"params": [param], "names": [name]}
        group.update(param_multipliers(name, depth, layerwise_decay, patch_embed_lr_mult))
        groups.append(group)
    return groups


def fuse_params_groups(groups: List[dict]) -> List[dict]:
    """Merge groups with the same multipliers (fewer optimizer groups, faster foreach steps)."""
    fused: "OrderedDict[tuple, dict]" = OrderedDict()
    for group in groups:
        key = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
        if key not in fused:
            fused[key] = {
                "params": [],
                "names": [],
                "lr_multiplier": key[0],
                "wd_multiplier": key[1],
                "is_last_layer": key[2],
            }
        fused[key]["params"].extend(group["params"])
        fused[key]["names"].extend(group["names"])
    return list(fused.values())


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay from the scheduled values and its multipliers."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]


def peak_lr_groups(
    named_parameters: Iterable[Tuple[str, nn.Parameter]],
    lr_and_weight_decay: Callable[[str, nn.Parameter], Tuple[float, float]],
) -> List[dict]:
    """Trainable parameters fused into groups of equal ``(peak lr, weight decay)``.

    ``lr_and_weight_decay(name, param)`` gives each parameter's pair. Every group holds
    ``lr`` and ``base_lr`` (both the peak) and ``weight_decay``; :func:`scale_learning_rates`
    sets ``lr`` from ``base_lr`` at each step.
    """
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        lr, weight_decay = (float(v) for v in lr_and_weight_decay(name, param))
        group = groups.setdefault(
            (lr, weight_decay), {"params": [], "lr": lr, "base_lr": lr, "weight_decay": weight_decay}
        )
        group["params"].append(param)
    return list(groups.values())


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``factor`` times its peak (``base_lr``, see :func:`peak_lr_groups`)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
