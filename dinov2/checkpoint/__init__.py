"""Sharded training checkpoints (torch.distributed.checkpoint): save, resume, reshard, consolidate."""

from .errors import CheckpointError
from .manager import (
    MARKER,
    CheckpointManager,
    checkpoint_keys,
    checkpoint_name,
    file_sha256,
    read_checkpoint_info,
    validate_checkpoint,
    verify_checksums,
)
from .metadata import SafeFileSystemReader, read_metadata
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
    "SafeFileSystemReader",
    "WeightsOnlyLoadPlanner",
    "capture_rng_state",
    "checkpoint_keys",
    "checkpoint_name",
    "derive_seed",
    "file_sha256",
    "read_checkpoint_info",
    "read_metadata",
    "restore_rng_state",
    "seed_all",
    "validate_checkpoint",
    "verify_checksums",
]
