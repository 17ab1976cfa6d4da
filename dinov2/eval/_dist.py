"""The few torch.distributed helpers evaluation needs.

Evaluation runs as one process or under ``torchrun`` (several processes, one per device). The
process group is set up from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``LOCAL_RANK``): NCCL when CUDA is available, gloo otherwise.

Kept private to ``dinov2.eval`` so evaluation does not depend on the training launcher's module.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_env(device: Optional[torch.device] = None, timeout_minutes: float = 30.0) -> bool:
    """Join the process group described by torchrun's variables; no-op for a single process.

    Returns True when a process group is (now) initialised.
    """
    if is_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} not set: launch with torchrun")
    device = device or default_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def _comm_device() -> torch.device:
    """Where tensors must live for collectives: the current CUDA device for NCCL, CPU for gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor on the input's device)."""
    if not is_initialized():
        return tensor.clone()
    buffer = tensor.detach().to(_comm_device()).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Gather tensors whose first dimension differs between ranks; one tensor per rank, rank order."""
    if not is_initialized():
        return [tensor]
    comm = _comm_device()
    local = tensor.detach().to(comm).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=comm))
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [g[:n].to(tensor.device) for g, n in zip(gathered, sizes)]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every rank concatenated in rank order."""
    return torch.cat(all_gather_rows(tensor), dim=0)


def broadcast_object(obj):
    """``obj`` from rank 0 on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
