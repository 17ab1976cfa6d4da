"""``train.compile``: ``torch.compile`` of every transformer block, before FSDP2 sharding.

Each block of each backbone (student, teacher, and any other ``backbone.blocks`` in the model) gets
a compiled ``forward``; everything else (token preparation, heads, losses) stays eager. Per block,
as torchtitan does, because:

* the blocks are where the FLOPs are, and all blocks of a model share one graph per input shape
  (the compiled code is cached per shape and per block setting, so compiling costs a few graphs,
  not one per block);
* under FSDP2 each block is its own unit: the unit's all-gather / reshard hooks run eagerly around
  the compiled ``forward`` (``fully_shard`` registers them on the module, outside ``forward``),
  and inside it the parameters are the gathered plain tensors. Compile first, shard after.

Unlike ``torch.compile(block)``, which wraps the block in an ``OptimizedModule`` and prefixes its
parameter names with ``_orig_mod.``, only ``forward`` is replaced: names, state dicts, checkpoints
and exports are the same compiled or not. The replacement is a ``functools.partial`` of the
compiled class-level ``forward`` with the block, so a deep copy of a compiled model calls its own
blocks, not the original's (a compiled bound method would keep pointing at the original).

Where the compiler cannot work (no C++ compiler for inductor on the CPU, no Triton on CUDA, a
Python or platform torch.compile does not support, an unknown backend), :func:`compile_for_training`
finds out up front by compiling and running a tiny function, forward and backward, and then trains
eager with one warning that says why and how to turn the option off. An error while compiling the
model itself later is raised, not hidden.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

logger = logging.getLogger("dinov2")

__all__ = ["COMPILE_MODES", "compile_blocks", "compile_for_training", "compiler_problem"]

# torch.compile modes offered by train.compile_mode. The CUDA-graph modes ("reduce-overhead",
# "max-autotune") are left out: a CUDA graph replays fixed memory addresses, while FSDP2 gathers
# each block's parameters anew every step and drop-path subsets change per step.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x * 2.0 + 1.0).sum()


def compiler_problem(device: torch.device, backend: str = "inductor", mode: str = "default") -> Optional[str]:
    """None if ``torch.compile`` (``backend``, ``mode``) compiles and runs a tiny function, forward
    and backward, on ``device``; else why not, in one line."""
    try:
        compiled = torch.compile(_probe, backend=backend, mode=None if mode == "default" else mode, fullgraph=True)
        x = torch.ones(8, device=device, requires_grad=True)
        compiled(x).backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return "the probe compiled but gave no finite gradient"
    except Exception as error:  # any failure means "do not compile"; the caller reports it
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
    return None


def _backbones(module: nn.Module) -> list:
    """The modules under ``module`` (itself included) that hold a ``blocks`` ModuleList, the unit
    list FSDP2 sharding uses (:func:`dinov2.fsdp.shard_backbone`)."""
    return [m for m in module.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]


def compile_blocks(module: nn.Module, backend: str = "inductor", mode: str = "default") -> int:
    """Compile the ``forward`` of every block of every backbone under ``module`` (in place); returns
    how many blocks were compiled. Call before ``fully_shard``."""
    blocks = [block for backbone in _backbones(module) for block in backbone.blocks]
    compiled_forwards = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled_forwards:
            compiled_forwards[cls] = torch.compile(
                cls.forward, backend=backend, mode=None if mode == "default" else mode
            )
        block.forward = functools.partial(compiled_forwards[cls], block)
    if blocks:
        # Compiled code is cached per code object (one Block.forward for every block), with one
        # entry per input shape, grad mode and block setting (drop rate, checkpointing). Beyond
        # torch's default of 8 entries it would silently run the remaining blocks eagerly.
        config = torch._dynamo.config
        needed = 8 * len(blocks)
        config.recompile_limit = max(config.recompile_limit, needed)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)
    return len(blocks)


def compile_for_training(cfg: DictConfig, modules: Iterable[Optional[nn.Module]], device: torch.device) -> bool:
    """Apply ``train.compile`` (``train.compile_mode``, ``train.compile_backend``) to the blocks
    of ``modules`` (None entries skipped); returns whether they were compiled. A compiler that
    fails the probe gives a warning and eager training."""
    train = cfg.train
    if not train.compile:
        return False
    mode, backend = str(train.compile_mode), str(train.compile_backend)
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
    problem = compiler_problem(device, backend, mode)
    if problem is not None:
        logger.warning(
            "train.compile=true, but torch.compile (backend %s, mode %s) does not work on %s here: %s. "
            "Training runs eager (same results, no compile speed-up); set train.compile=false to silence "
            "this, or fix the compiler (inductor needs a C++ compiler on the CPU and Triton on CUDA)",
            backend,
            mode,
            device,
            problem,
        )
        return False
    count = sum(compile_blocks(module, backend, mode) for module in modules if module is not None)
    logger.info("train.compile: %d transformer blocks compiled (backend %s, mode %s)", count, backend, mode)
    return True
