"""The backbone of an evaluation, as the evaluation command lines name it.

``--pretrained-weights`` may name
- a training output directory: its ``exports/teacher_backbone_latest.pth`` is used, and its
  ``config.yaml`` when no ``--config-file`` is given;
- a ``.pth`` / ``.safetensors`` file: a plain backbone state dict in the official DINOv2 key
  format, or a checkpoint dict nesting one under ``teacher_backbone``, ``teacher`` (``backbone.``
  prefix) or ``model`` (see :func:`dinov2.hub.weights.read_state_dict`); a DINOv3 file (official
  or exported) needs neither ``--config-file`` nor ``--arch``: its keys describe it.
The architecture comes from ``--config-file`` (a training config, e.g. a run's ``config.yaml``)
or, for the official releases, from ``--arch dinov2_vits14`` style names. Weights always load
strictly: a missing or extra key is an error listing the keys.

Loading itself is :mod:`dinov2.hub.sources` (shared with classifiers, warm start, consolidation
and the hub); what is evaluation's own is the choice between those options, the evaluation
resolution and a frozen model. The image transforms are in :mod:`dinov2.data.transforms`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinov2.hub.backbones import ENTRY_POINTS
from dinov2.hub.interop import is_transformers_folder, transformers_normalization
from dinov2.hub.sources import (
    backbone_from_state_dict,
    is_dinov3_state_dict,
    load_backbone,
    load_backbone_from_config,
    resolve_weights_path,
)
from dinov2.hub.weights import PathLike, read_state_dict
from dinov2.utils.config import CONFIG_FILE_NAME, load_saved_config

# The official releases were trained and evaluated at 224 px.
OFFICIAL_IMAGE_SIZE = 224


@dataclass
class EvalBackbone:
    """A frozen backbone and the image settings it is evaluated with."""

    model: torch.nn.Module
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    weights_path: Path
    config_path: Optional[Path]
    description: str

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim


def _config_for(config_file: Optional[PathLike], pretrained_weights: PathLike) -> Optional[Path]:
    if config_file:
        return Path(config_file)
    weights = Path(pretrained_weights)
    if weights.is_dir() and (weights / CONFIG_FILE_NAME).is_file():
        return weights / CONFIG_FILE_NAME
    return None


def build_model_for_eval(
    config_file: Optional[PathLike],
    pretrained_weights: PathLike,
    device: torch.device | str = "cpu",
    arch: Optional[str] = None,
    overrides: Sequence[str] = (),
    image_size: Optional[int] = None,
) -> EvalBackbone:
    """The teacher backbone of a training config (or an official ``arch``), weights loaded strictly.

    ``image_size`` sets the evaluation resolution (default: the config's
    ``crops.global_crops_size``, or 224 for ``arch``); it must be a multiple of the patch size.
    """
    config_path = None
    if arch is None and not config_file and is_transformers_folder(pretrained_weights):
        # A transformers DINOv2 / DINOv3 folder describes its own architecture and preprocessing.
        weights_path = Path(pretrained_weights)
        model, _ = load_backbone(str(weights_path))
        mean, std = transformers_normalization(weights_path)
        size, description = OFFICIAL_IMAGE_SIZE, f"transformers folder {weights_path}"
    elif arch is not None:
        if config_file:
            raise ValueError("give either --config-file or --arch, not both")
        if arch not in ENTRY_POINTS:
            raise ValueError(f"--arch {arch!r} is not an official architecture; valid: {sorted(ENTRY_POINTS)}")
        weights_path = resolve_weights_path(pretrained_weights, "--pretrained-weights")
        model, _ = load_backbone(f"hub:{arch}", weights=weights_path)
        size, mean, std, description = OFFICIAL_IMAGE_SIZE, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, arch
    else:
        weights_path = resolve_weights_path(pretrained_weights, "--pretrained-weights")
        config_path = _config_for(config_file, pretrained_weights)
        state = read_state_dict(weights_path) if config_path is None else None
        if state is not None and is_dinov3_state_dict(state):
            # A DINOv3 file describes its own architecture (its RoPE periods give the head width).
            model, _ = backbone_from_state_dict(state, str(weights_path))
            size, mean, std = OFFICIAL_IMAGE_SIZE, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
            description = f"DINOv3 file {weights_path}"
        elif config_path is None:
            raise ValueError(
                "no model description: give --config-file (a training output's config.yaml, or a training "
                f"config) or --arch (one of {sorted(ENTRY_POINTS)}) for official-format weights"
            )
        else:
            cfg = load_saved_config(config_path, overrides)
            model, spec = load_backbone_from_config(cfg, weights_path)
            size = int(cfg.crops.global_crops_size)
            mean, std = tuple(spec["normalization"]["mean"]), tuple(spec["normalization"]["std"])
            description = f"{cfg.student.arch}/{cfg.student.patch_size} from {config_path}"
    size = int(image_size or size)
    if size % model.patch_size:
        raise ValueError(f"evaluation image size {size} is not a multiple of the patch size {model.patch_size}")
    model.requires_grad_(False)
    model.eval().to(device)
    return EvalBackbone(model, size, mean, std, weights_path, config_path, description)
