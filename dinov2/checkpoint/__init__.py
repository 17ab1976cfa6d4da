"""Sharded training checkpoints (torch.distributed.checkpoint): save, resume, reshard, consolidate."""

from .manager import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    checkpoint_keys,
    checkpoint_name,
    read_checkpoint_info,
    validate_checkpoint,
)
from .state import (
    ModelOptimizerState,
    RNGState,
    WeightsOnlyLoadPlanner,
    capture_rng_state,
    derive_seed,
    restore_rng_state,
    seed_all,
)

__all__ = [
    "MARKER",
    "CheckpointError",
    "CheckpointManager",
    "ModelOptimizerState",
    "RNGState",
    "WeightsOnlyLoadPlanner",
    "capture_rng_state",
    "checkpoint_keys",
    "checkpoint_name",
    "derive_seed",
    "read_checkpoint_info",
    "restore_rng_state",
    "seed_all",
    "validate_checkpoint",
]
