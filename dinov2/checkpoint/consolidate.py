"""Turn a sharded training checkpoint into one hub-format teacher backbone file.

Works in a single process without a process group, whatever number of ranks wrote the
checkpoint: the tensors are allocated from the checkpoint's own metadata and read with
``torch.distributed.checkpoint.load`` (which reassembles the shards), so no optimizer state
is read and no model has to be built. When the training ``config.yaml`` is found, the result is
also loaded with ``strict=True`` into the backbone that config describes, as a check.
The checkpoint's files are verified against the checksums of its ``COMPLETE`` marker first, and
its ``.metadata`` is read with the restricted unpickler of :mod:`dinov2.checkpoint.metadata`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dinov2.hub.weights import check_state_dict, save_state_dict

from .manager import CheckpointError, CheckpointManager, validate_checkpoint, verify_checksums
from .metadata import METADATA_FILE, SafeFileSystemReader, read_metadata
from .state import WeightsOnlyLoadPlanner

logger = logging.getLogger("dinov2")

PathLike = Union[str, os.PathLike]
TEACHER_BACKBONE_MARK = "teacher.backbone."
_HEAD_NAMES = ("dino_head", "ibot_head")


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory as given, or the newest intact one of a training output directory
    (``<output>/checkpoints/ckpt_*``) or of a checkpoints directory; its checksums are verified
    (a corrupted newest checkpoint is skipped with a warning, a corrupted given one is an error)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or directory: {path}")
    if (path / METADATA_FILE).is_file():
        problem = validate_checkpoint(path) or verify_checksums(path)
        if problem:
            raise CheckpointError(f"{path} is not a complete, intact checkpoint: {problem}")
        return path
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir():
            found = CheckpointManager(candidate).newest_verified()
            if found is not None:
                return found
    raise CheckpointError(f"no complete checkpoint in {path} (looked in {path / 'checkpoints'} and {path})")


def _find_prefix(keys, mark: str, source: Path) -> str:
    """The flattened prefix under which the teacher lives, e.g. ``train.model.``."""
    prefixes = {key[: key.index(mark)] for key in keys if mark in key}
    if not prefixes:
        raise CheckpointError(f"{source}: no '{mark}*' tensors in this checkpoint; is it an SSL training checkpoint?")
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: teacher found under several prefixes {sorted(prefixes)}")
    return prefixes.pop()


def read_teacher_state(
    checkpoint: PathLike, with_heads: bool = False
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(backbone state in official keys, heads state with ``dino_head.`` / ``ibot_head.`` keys)
    of the teacher in a DCP checkpoint; heads empty unless ``with_heads``."""
    checkpoint = Path(checkpoint)
    metadata = read_metadata(checkpoint).state_dict_metadata
    prefix = _find_prefix(metadata, TEACHER_BACKBONE_MARK, checkpoint) + "teacher."
    wanted = {}
    for key, meta in metadata.items():
        if not key.startswith(prefix) or not isinstance(meta, TensorStorageMetadata):
            continue
        local = key[len(prefix) :]
        if local.startswith("backbone.") or (with_heads and local.split(".", 1)[0] in _HEAD_NAMES):
            wanted[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load(
                wanted,
                storage_reader=SafeFileSystemReader(str(checkpoint)),
                planner=WeightsOnlyLoadPlanner(),
                no_dist=True,
            )
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            raise CheckpointError(f"cannot read the teacher from {checkpoint}: {error}") from error
    backbone, heads = {}, {}
    for key, tensor in wanted.items():
        local = key[len(prefix) :]
        if local.startswith("backbone."):
            backbone[local[len("backbone.") :]] = tensor
        else:
            heads[local] = tensor
    return backbone, heads


def _config_for(checkpoint: Path) -> Optional[Path]:
    # <output>/checkpoints/ckpt_x -> <output>/config.yaml
    for directory in (checkpoint.parent.parent, checkpoint.parent):
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    return None


def check_against_config(backbone: Dict[str, torch.Tensor], config_path: PathLike) -> None:
    """Load ``backbone`` with ``strict=True`` into the teacher that ``config_path`` describes."""
    from dinov2.hub.sources import load_backbone_from_config
    from dinov2.utils.config import load_saved_config

    cfg = load_saved_config(config_path)
    model, _ = load_backbone_from_config(cfg)
    check_state_dict(model, backbone, source=f"consolidated backbone vs {config_path}")
    model.load_state_dict(backbone, strict=True)


def heads_path(output: PathLike) -> Path:
    """Where ``--with-heads`` writes the heads: ``teacher.pth`` -> ``teacher_heads.pth``."""
    output = Path(output)
    return output.with_name(f"{output.stem}_heads{output.suffix}")


def consolidate_checkpoint(
    checkpoint: PathLike,
    output: PathLike,
    with_heads: bool = False,
    safetensors: bool = False,
    config: Optional[PathLike] = None,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Path]:
    """Write the teacher backbone of ``checkpoint`` (a ``ckpt_*`` directory or a training output
    directory, whose newest complete checkpoint is used) to ``output`` in the official keys.

    Args:
        with_heads: also write the teacher's DINO (and iBOT) head to ``<stem>_heads<suffix>``,
            keys ``dino_head.*`` / ``ibot_head.*`` (the backbone file stays loadable strictly).
        safetensors: write ``.safetensors`` (the suffix of ``output`` is replaced).
        config: training config to check the result against (default: ``config.yaml`` of the
            output directory, when found; skipped when absent).
        dtype: cast floating-point tensors (e.g. ``torch.float16``) before writing.

    Returns ``{"checkpoint": ..., "backbone": ..., "heads": ... (if written)}``.
    """
    source = resolve_checkpoint(checkpoint)
    output = Path(output)
    if safetensors:
        output = output.with_suffix(".safetensors")
    backbone, heads = read_teacher_state(source, with_heads=with_heads)
    config_path = Path(config) if config else _config_for(source)
    if config_path is not None:
        check_against_config(backbone, config_path)
    else:
        logger.warning("no config.yaml found next to %s: the backbone was not checked against its architecture", source)
    if dtype is not None:
        backbone = {k: v.to(dtype) if v.is_floating_point() else v for k, v in backbone.items()}
        heads = {k: v.to(dtype) if v.is_floating_point() else v for k, v in heads.items()}
    written = {"checkpoint": source, "backbone": save_state_dict(backbone, output)}
    if with_heads:
        if not heads:
            raise CheckpointError(f"{source}: no teacher heads found")
        written["heads"] = save_state_dict(heads, heads_path(output))
    logger.info("consolidated %s -> %s", source, ", ".join(str(p) for k, p in written.items() if k != "checkpoint"))
    return written


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Consolidate a sharded training checkpoint into one teacher-backbone file (official DINOv2 keys)."
    )
    parser.add_argument(
        "checkpoint", help="a ckpt_<iter> directory, or a training output directory (newest checkpoint)"
    )
    parser.add_argument("--output", required=True, help="file to write, e.g. teacher.pth")
    parser.add_argument(
        "--with-heads", action="store_true", help="also write the teacher heads to <stem>_heads<suffix>"
    )
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors instead of a torch file")
    parser.add_argument(
        "--config", default=None, help="training config.yaml to check against (default: found beside the checkpoint)"
    )
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="cast floating-point tensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    dtype = (
        {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype) if args.dtype else None
    )
    try:
        written = consolidate_checkpoint(
            args.checkpoint,
            args.output,
            with_heads=args.with_heads,
            safetensors=args.safetensors,
            config=args.config,
            dtype=dtype,
        )
    except (CheckpointError, OSError) as error:  # the message names the file and the reason; no traceback
        raise SystemExit(f"consolidate_checkpoint: {error}") from None
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
