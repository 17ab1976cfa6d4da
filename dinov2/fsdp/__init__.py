"""FSDP2 sharding of SSLMetaArch, mixed precision, and full (gathered) state dicts.

Sharding plan (``torch.distributed.fsdp.fully_shard``), the same for student and teacher so that
their local shards line up element by element (the EMA update works shard by shard):

* every transformer block of each backbone is its own FSDP unit (all-gathered just before use);
* then the backbone root (patch embedding, tokens, position embedding, final norm);
* every head (DINO head, iBOT head) as one unit.

Parameters keep their fully-qualified names (FSDP2 adds no prefix), so state dicts from
``torch.distributed.checkpoint.state_dict`` look the same sharded and unsharded.
"""

from __future__ import annotations

import logging
import warnings
from typing import Dict

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dinov2 import distributed

logger = logging.getLogger("dinov2")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "DTYPES",
    "clip_grad_norm_",
    "full_state_dict",
    "is_sharded",
    "mixed_precision_policy",
    "shard_backbone",
    "shard_ssl_meta_arch",
    "should_shard",
    "subset_mesh",
]


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"compute_precision.{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def mixed_precision_policy(param_dtype: str = "fp32", reduce_dtype: str = "fp32") -> MixedPrecisionPolicy:
    """Parameters are stored in fp32 (sharded); they are cast to ``param_dtype`` for forward and
    backward, and gradients are reduced across ranks in ``reduce_dtype``."""
    return MixedPrecisionPolicy(
        param_dtype=_dtype(param_dtype, "param_dtype"),
        reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"),
        cast_forward_inputs=True,
    )


def should_shard(cfg: DictConfig) -> bool:
    """FSDP2 only with a process group of more than one rank and ``distributed.fsdp`` on."""
    return bool(cfg.distributed.fsdp) and distributed.get_world_size() > 1


def shard_backbone(
    backbone: nn.Module, policy: MixedPrecisionPolicy, reshard_after_forward: bool = True, mesh=None
) -> nn.Module:
    """``mesh``: the DeviceMesh to shard over (None: all ranks)."""
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return backbone


def subset_mesh(ranks, device: torch.device):
    """A 1-D DeviceMesh over ``ranks`` (global ranks) of the default process group.

    Every rank must call it, members or not, in the same order: ``DeviceMesh`` creates the mesh's
    process group with ``torch.distributed.new_group``, which is collective over all ranks. A
    non-member gets a mesh whose ``get_coordinate()`` is None; it must not shard onto it.
    """
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh(device.type, sorted(int(rank) for rank in ranks), mesh_dim_names=("dp",))


def shard_ssl_meta_arch(model: nn.Module, cfg: DictConfig, mesh=None) -> nn.Module:
    """Shard ``model.student`` and ``model.teacher`` (ModuleDicts of backbone + heads) in place.

    The student uses ``compute_precision.param_dtype`` / ``reduce_dtype``; the teacher, which has
    no gradients, runs in ``compute_precision.teacher_dtype``. Loss modules (centre buffers)
    stay replicated. Call after the model is on its device and before building the optimizer.
    ``mesh``: the DeviceMesh of the ranks that train this model (None: all ranks).
    """
    # The backbone returns views of one token tensor (CLS, registers, patches); FSDP2 warns that
    # an in-place op on such a view would skip its hook. SSLMetaArch never modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    precision = cfg.compute_precision
    student_policy = mixed_precision_policy(precision.param_dtype, precision.reduce_dtype)
    teacher_policy = mixed_precision_policy(precision.teacher_dtype, precision.reduce_dtype)
    # Only modules that run a backward may keep their gathered parameters after the forward (FSDP2
    # reshards those in the backward): the teacher has none, so it always reshards, or its
    # parameters would stay full-size and the EMA update would not find its shards.
    student_reshard = bool(cfg.distributed.reshard_after_forward)
    for modules, policy, reshard in (
        (model.student, student_policy, student_reshard),
        (model.teacher, teacher_policy, True),
    ):
        for module in modules.values():
            if hasattr(module, "blocks"):
                shard_backbone(module, policy, reshard, mesh=mesh)
            else:
                fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    logger.info(
        "FSDP2: student %s/%s, teacher %s, over %d ranks",
        precision.param_dtype,
        precision.reduce_dtype,
        precision.teacher_dtype,
        distributed.get_world_size() if mesh is None else mesh.size(),
    )
    return model


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules())


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip by the global norm over all ranks' shards; returns the total norm (a plain tensor).

    ``torch.nn.utils.clip_grad_norm_`` on DTensor gradients computes a DTensor norm whose
    ``full_tensor()`` already includes every shard; it is materialised here so that callers
    can log it and compare it with a threshold on every rank alike.
    """
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def full_state_dict(module: nn.Module, cpu_offload: bool = True, group=None) -> Dict[str, torch.Tensor]:
    """Unsharded state dict of ``module``; every rank must call it (every rank of ``group``).

    With ``cpu_offload`` (the default) only rank 0 receives the tensors (on the CPU); the other
    ranks get an empty dict. Works for plain and FSDP2 modules; keys are the module's own
    parameter names (FSDP2 adds no prefix), i.e. the official format for a backbone.

    ``group``: the ranks ``module`` is sharded over when that is not all of them (a distillation
    student on a subset of ranks); its first rank then receives the tensors on the CPU.
    ``get_model_state_dict`` offloads to global rank 0 only, which may not hold the module.
    """
    if group is None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
        return get_model_state_dict(module, options=options)
    import torch.distributed as dist

    receiver = min(dist.get_process_group_ranks(group))
    state: Dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value  # one tensor at a time
        if not cpu_offload:
            state[name] = full
        elif dist.get_rank() == receiver:
            state[name] = full.detach().cpu()
    return state
