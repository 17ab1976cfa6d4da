"""Process-group set-up from torchrun or SLURM variables, and rank helpers.

``enable()`` looks at the environment once:

* torchrun / torch.distributed.run (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``) — used first when present, so ``srun torchrun ...`` also works;
* a SLURM job step started by ``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` or
  ``SLURM_NTASKS``, ``SLURM_LOCALID``); the master address is the first host of
  ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``; loopback on a single node) and the port
  is derived from the job id, unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set;
* otherwise one process.

With more than one process it initialises the default process group: NCCL for CUDA tensors
(plus gloo for CPU tensors) when CUDA is available, gloo otherwise. **A single process gets no
process group at all**: every helper below then answers as rank 0 of 1, collectives are
no-ops, FSDP is not applied and checkpoints are written with ``no_dist=True``. That keeps
``python train/train.py`` free of any rendezvous.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger("dinov2")

DEFAULT_TIMEOUT = timedelta(minutes=30)
_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class DistributedEnvironment:
    """Where this process sits in the job, read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


_environment: Optional[DistributedEnvironment] = None


def _int_env(name: str, env) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_master_addr(nodelist: str, num_nodes: int) -> str:
    """First host of a SLURM node list; loopback when the whole job is on one node."""
    if num_nodes <= 1:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {error}") from error
    hosts = out.split()
    if not hosts:
        raise RuntimeError(f"scontrol returned no host for SLURM_JOB_NODELIST={nodelist!r}")
    return hosts[0]


def slurm_master_port(job_id: str) -> int:
    """A port in [20000, 40000) that all tasks of a job agree on without talking to each other."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def read_environment(env=None) -> DistributedEnvironment:
    """Rank layout from torchrun variables, else a SLURM ``srun`` step, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int_env("WORLD_SIZE", env)
        return DistributedEnvironment(
            rank=_int_env("RANK", env),
            world_size=world_size,
            local_rank=_int_env("LOCAL_RANK", env) if "LOCAL_RANK" in env else 0,
            local_world_size=_int_env("LOCAL_WORLD_SIZE", env) if "LOCAL_WORLD_SIZE" in env else world_size,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT", env) if "MASTER_PORT" in env else 29500,
            source="torchrun",
        )
    # SLURM_STEP_NUM_TASKS is only set inside an srun step: a plain `python train.py` typed in an
    # salloc/sbatch shell with --ntasks=4 must not wait for three ranks that will never come.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world_size = _int_env("SLURM_STEP_NUM_TASKS", env)
        num_nodes = (
            _int_env("SLURM_STEP_NUM_NODES", env)
            if "SLURM_STEP_NUM_NODES" in env
            else (_int_env("SLURM_NNODES", env) if "SLURM_NNODES" in env else 1)
        )
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        else:
            master_addr = slurm_master_addr(
                env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")), num_nodes
            )
        if "MASTER_PORT" in env:
            master_port = _int_env("MASTER_PORT", env)
        else:
            master_port = slurm_master_port(env.get("SLURM_JOB_ID", "0"))
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(world_size)))
        local_world_size = int(tasks_per_node.split("(")[0].split(",")[0])
        return DistributedEnvironment(
            rank=_int_env("SLURM_PROCID", env),
            world_size=world_size,
            local_rank=_int_env("SLURM_LOCALID", env) if "SLURM_LOCALID" in env else 0,
            local_world_size=local_world_size,
            master_addr=master_addr,
            master_port=master_port,
            source="slurm",
        )
    return DistributedEnvironment(0, 1, 0, 1, "127.0.0.1", 0, "single")


def _resolve_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"distributed.backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        # NCCL for CUDA tensors, gloo for the CPU tensors DCP and object collectives use.
        return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("distributed.backend=nccl needs CUDA, which is not available; use auto or gloo")
    return backend


def enable(backend: str = "auto", timeout: timedelta = DEFAULT_TIMEOUT, env=None) -> DistributedEnvironment:
    """Read the environment and, with more than one process, initialise the process group.

    Idempotent: a second call returns the environment found by the first one. With CUDA the
    current device is set to ``cuda:<local_rank>``.
    """
    global _environment
    if _environment is not None:
        return _environment
    environment = read_environment(env)
    if environment.world_size < 1 or not 0 <= environment.rank < environment.world_size:
        raise ValueError(
            f"invalid rank {environment.rank} for world size {environment.world_size} ({environment.source})"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(environment.local_rank % max(torch.cuda.device_count(), 1))
    if environment.world_size > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = environment.master_addr
        os.environ["MASTER_PORT"] = str(environment.master_port)
        os.environ["RANK"] = str(environment.rank)
        os.environ["WORLD_SIZE"] = str(environment.world_size)
        os.environ["LOCAL_RANK"] = str(environment.local_rank)
        resolved = _resolve_backend(backend)
        dist.init_process_group(backend=resolved, timeout=timeout, init_method="env://")
        logger.info(
            "process group %s: rank %d/%d (local %d) via %s, master %s:%d",
            resolved,
            environment.rank,
            environment.world_size,
            environment.local_rank,
            environment.source,
            environment.master_addr,
            environment.master_port,
        )
    else:
        _resolve_backend(backend)  # still reject a bad value in single-process runs
    _environment = environment
    return environment


def disable(synchronize: bool = True) -> None:
    """Destroy the process group (if any) and forget the environment (tests, clean exits).

    With ``synchronize`` every rank first meets at a barrier, so none tears down gloo while
    another still has a collective in flight (which can abort the process at exit). After an
    error on this rank use ``synchronize=False``: the others may never arrive.
    """
    global _environment
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    _environment = None


def is_enabled() -> bool:
    """True when a process group is initialised (more than one process)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def get_local_rank() -> int:
    if _environment is not None:
        return _environment.local_rank
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def get_device() -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (None: all), in place; returns the tensor (unchanged in a
    single process)."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def differentiable_all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (None: all) as a new tensor through which gradients flow
    back to every rank (the gradient of each rank's input is the sum of all ranks' output
    gradients); the tensor itself in a single process. For statistics of the global batch, such
    as GlobalBatchNorm1d's."""
    if not is_enabled():
        return tensor
    from torch.distributed.nn.functional import all_reduce  # the autograd-aware collective

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=dist.group.WORLD if group is None else group)


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum over the ranks of ``group`` (None: all), in place; returns the tensor
    (unchanged in a single process)."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over the ranks of ``group`` (None: all), in place; returns the tensor (unchanged in
    a single process)."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor /= dist.get_world_size(group)
    return tensor


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process):
    for small picklable values whose layout differs between ranks."""
    if not is_enabled():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop signal)."""
    return any_rank_each([flag], device)[0]


def any_rank_each(flags: Sequence[bool], device: Optional[torch.device] = None) -> List[bool]:
    """:func:`any_rank` of several flags in one collective (every rank passes as many)."""
    if not is_enabled():
        return [bool(flag) for flag in flags]
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device or get_device())
    return [value > 0 for value in all_reduce_max(values).tolist()]


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` from rank ``src`` (a global rank) on every rank of ``group`` (None: all)."""
    if not is_enabled():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def free_port() -> int:
    """An unused TCP port on loopback (tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = [
    "DistributedEnvironment",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "any_rank_each",
    "barrier",
    "broadcast_object",
    "differentiable_all_reduce_sum",
    "disable",
    "enable",
    "free_port",
    "get_device",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "is_enabled",
    "is_main_process",
    "read_environment",
]
