"""The collectives evaluation needs, on top of :mod:`dinov2.distributed`.

Evaluation runs as one process, under ``torchrun`` or as an ``srun`` step; the process group is
set up by :func:`dinov2.distributed.enable` (NCCL with CUDA, gloo otherwise). Everything here
degrades to the single-process answer when no process group exists.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

# Rank queries are dinov2.distributed's own, re-exported so evaluation code imports one module.
from dinov2.distributed import barrier, get_rank, get_world_size, is_main_process
from dinov2.distributed import get_device as default_device
from dinov2.distributed import is_enabled as is_initialized

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "default_device",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_initialized",
    "is_main_process",
    "run_then_destroy",
]


def init_from_env(device: Optional[torch.device] = None) -> bool:
    """Join the process group of a torchrun or srun launch (no-op for a single process).

    Uses :func:`dinov2.distributed.enable`; ``device`` of type cpu forces gloo. Returns True when
    a process group is (now) initialised.
    """
    from dinov2.distributed import enable

    enable(backend="gloo" if device is not None and torch.device(device).type == "cpu" else "auto")
    return is_initialized()


def _comm_device() -> torch.device:
    """Where tensors must live for collectives: the current CUDA device for NCCL, CPU for gloo."""
    if is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor on the input's device)."""
    if not is_initialized():
        return tensor.clone()
    buffer = tensor.detach().to(_comm_device()).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def group_size(group=None) -> int:
    """Ranks in ``group`` (None: all ranks; 1 without a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def all_gather_rows(tensor: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Gather tensors whose first dimension differs between ranks; one tensor per rank of
    ``group`` (None: all ranks), rank order."""
    if not is_initialized():
        return [tensor]
    comm = _comm_device()
    local = tensor.detach().to(comm).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=comm), group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return [g[:n].to(tensor.device) for g, n in zip(gathered, sizes)]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every rank concatenated in rank order."""
    return torch.cat(all_gather_rows(tensor), dim=0)


def run_then_destroy(run, args) -> int:
    """Run an evaluation, then tear the process group down (at a barrier only after success)."""
    try:
        run(args)
    except BaseException:
        destroy(synchronize=False)  # the other ranks may never reach a barrier
        raise
    destroy()
    return 0


def destroy(synchronize: bool = True) -> None:
    """Tear the process group down; ``synchronize=False`` after an error (see ``disable``)."""
    from dinov2.distributed import disable

    disable(synchronize=synchronize)
