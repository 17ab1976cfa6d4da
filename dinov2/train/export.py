"""Teacher-backbone exports: plain state dicts in the official DINOv2 key format.

``exports/teacher_backbone_<iter:08d>.pth`` loads with ``strict=True`` into the factory of the same
architecture (``dinov2.hub.weights.load_backbone_weights``) and is what the evaluation scripts take
as ``--pretrained-weights``; ``exports/teacher_backbone_latest.pth`` is a copy of the newest one.
Both are written atomically: a failed write (a full disk is reported as ``OSError(ENOSPC)`` naming
the file) leaves the previous files as they were and no temporary file behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed
from torch import nn

from dinov2 import distributed
from dinov2.fsdp import full_state_dict
from dinov2.hub.weights import save_state_dict
from dinov2.utils.io import atomic_path

__all__ = ["export_teacher_backbone", "export_path", "iteration_exports", "LATEST_EXPORT_NAME"]

LATEST_EXPORT_NAME = "teacher_backbone_latest.pth"
_EXPORT_NAME = re.compile(r"teacher_backbone_(\d{8,})\.pth")


def export_path(output_dir, iteration: int) -> Path:
    return Path(output_dir) / "exports" / f"teacher_backbone_{iteration:08d}.pth"


def iteration_exports(output_dir) -> List[Tuple[int, Path]]:
    """(iteration, path) of every per-iteration export of a training output, oldest first."""
    exports = []
    for path in (Path(output_dir) / "exports").glob("teacher_backbone_*.pth"):
        match = _EXPORT_NAME.fullmatch(path.name)
        if match:
            exports.append((int(match.group(1)), path))
    return sorted(exports)


def export_teacher_backbone(model: nn.Module, path, latest: bool = True, group=None) -> Path:
    """Write the teacher backbone of an ``SSLMetaArch`` to ``path`` (all ranks call, rank 0 writes).

    Under FSDP2 the shards are gathered to rank 0's CPU (``dinov2.fsdp.full_state_dict``).
    ``group``: the ranks that hold the model when not all do (a distillation student on a subset
    of ranks); they call, and the first of them writes.

    With ``latest`` also refreshes ``teacher_backbone_latest.pth`` beside it (atomic copy).
    A write error on the writing rank is raised on every rank (the others would wait for it otherwise).
    """
    path = Path(path)
    state = full_state_dict(model.teacher["backbone"], group=group)
    writer = 0 if group is None else min(torch.distributed.get_process_group_ranks(group))
    failure: Optional[Exception] = None
    if distributed.get_rank() == writer:
        try:
            save_state_dict(state, path)
            if latest:
                with atomic_path(path.with_name(LATEST_EXPORT_NAME)) as tmp:
                    shutil.copyfile(path, tmp)
        except Exception as error:
            failure = error
    message = distributed.broadcast_object(None if failure is None else str(failure), src=writer, group=group)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank {writer} could not write the teacher export {path}: {message}")
    return path
