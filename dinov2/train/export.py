"""Teacher-backbone exports: plain state dicts in the official DINOv2 key format.

``exports/teacher_backbone_<iter:08d>.pth`` loads with ``strict=True`` into the factory of the same
architecture (``dinov2.hub.weights.load_backbone_weights``) and is what the evaluation scripts take
as ``--pretrained-weights``; ``exports/teacher_backbone_latest.pth`` is a copy of the newest one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from dinov2 import distributed
from dinov2.hub.weights import save_state_dict

__all__ = ["full_state_dict", "export_teacher_backbone", "export_path", "LATEST_EXPORT_NAME"]

LATEST_EXPORT_NAME = "teacher_backbone_latest.pth"


def export_path(output_dir, iteration: int) -> Path:
    return Path(output_dir) / "exports" / f"teacher_backbone_{iteration:08d}.pth"


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded CPU copy of ``module.state_dict()``.

    FSDP2 parameters are DTensors: ``full_tensor()`` all-gathers them, so under FSDP every rank
    must call this (in the same order).
    """
    state = {}
    for key, value in module.state_dict().items():
        full_tensor = getattr(value, "full_tensor", None)
        if full_tensor is not None:
            value = full_tensor()
        state[key] = value.detach().to("cpu", copy=True)
    return state


def export_teacher_backbone(model: nn.Module, path, latest: bool = True) -> Path:
    """Write the teacher backbone of an ``SSLMetaArch`` to ``path`` (all ranks call, rank 0 writes).

    With ``latest`` also refreshes ``teacher_backbone_latest.pth`` beside it (atomic copy).
    """
    path = Path(path)
    state = full_state_dict(model.teacher["backbone"])
    if distributed.is_main_process():
        save_state_dict(state, path)
        if latest:
            target = path.with_name(LATEST_EXPORT_NAME)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
    distributed.barrier()
    return path
