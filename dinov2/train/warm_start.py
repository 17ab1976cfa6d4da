"""Warm start (``student.pretrained_weights``): an official-format backbone file into a training
backbone whose global crop size may differ from the file's image size.

The released DINOv2 backbones store position embeddings for 518 px images (a 37 x 37 patch grid
with patch 14), while training builds the backbone for ``crops.global_crops_size`` (224 px: a
16 x 16 grid). The stored table is resampled once, exactly as the released model resamples it
on the fly for a 224 px input, so the warm-started backbone gives the same features as the
released one at the training resolution. Every other key must match strictly.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.hub.interop import is_transformers_folder, load_transformers_backbone
from dinov2.hub.sources import resolve_weights_path
from dinov2.hub.weights import WeightsError, load_backbone_weights, read_state_dict

logger = logging.getLogger("dinov2")

__all__ = ["load_warm_start_weights", "resample_pos_embed"]


def _square_side(n_positions: int, what: str) -> int:
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise WeightsError(f"{what}: {n_positions} patch positions are not a square grid")
    return side


def resample_pos_embed(pos_embed: torch.Tensor, backbone: nn.Module, source: str = "weights") -> torch.Tensor:
    """``(1, 1 + S*S, D)`` position embeddings resampled to the patch grid of ``backbone.pos_embed``,
    with the backbone's own interpolation settings (``interpolate_offset``, ``interpolate_antialias``)."""
    target = backbone.pos_embed
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != target.shape[2]:
        raise WeightsError(f"{source}: pos_embed {tuple(pos_embed.shape)} cannot be resampled to {tuple(target.shape)}")
    side = _square_side(pos_embed.shape[1] - 1, f"{source} pos_embed")
    grid = _square_side(target.shape[1] - 1, "model pos_embed")
    class_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    offset = getattr(backbone, "interpolate_offset", 0.0)
    antialias = bool(getattr(backbone, "interpolate_antialias", False))
    if offset:
        scale = ((grid + offset) / side, (grid + offset) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=antialias)
    if patch_pos.shape[-2:] != (grid, grid):
        raise WeightsError(f"{source}: pos_embed resampled to {tuple(patch_pos.shape[-2:])}, expected {(grid, grid)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat((class_pos, patch_pos), dim=1).to(pos_embed.dtype)


def load_warm_start_weights(backbone: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load an official-format backbone file strictly into ``backbone``, resampling only the
    position embeddings when the file was made for another image size.

    ``path`` may also be a training output directory (its teacher export is used) or a
    transformers DINOv2 folder; a sharded checkpoint is refused unread, naming the command that
    consolidates it."""
    if is_transformers_folder(path):
        state = dict(load_transformers_backbone(path).state_dict())
    else:
        path = resolve_weights_path(path, "student.pretrained_weights")
        state = dict(read_state_dict(path, what="warm-start weights file (student.pretrained_weights)"))
    # A RoPE backbone (DINOv3) has no position table: nothing to resample.
    stored, target = state.get("pos_embed"), getattr(backbone, "pos_embed", None)
    # Only a different grid is resampled; any other mismatch (width, layout) is left for the
    # strict load, whose error lists every bad key.
    if (
        stored is not None
        and target is not None
        and stored.shape != target.shape
        and stored.ndim == 3
        and (stored.shape[0], stored.shape[2]) == (target.shape[0], target.shape[2])
    ):
        resampled = resample_pos_embed(stored, backbone, source=str(path))
        logger.info(
            "%s: position embeddings resampled from %s to %s for crops of this run",
            path,
            tuple(stored.shape),
            tuple(resampled.shape),
        )
        state["pos_embed"] = resampled
    return load_backbone_weights(backbone, state)
