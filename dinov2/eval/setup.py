"""Backbone loading and image transforms for evaluation on frozen features.

``--pretrained-weights`` may name
- a training output directory: its ``exports/teacher_backbone_latest.pth`` is used, and its
  ``config.yaml`` when no ``--config-file`` is given;
- a ``.pth`` / ``.safetensors`` file: a plain backbone state dict in the official DINOv2 key
  format, or a checkpoint dict nesting one under ``teacher_backbone``, ``teacher`` (``backbone.``
  prefix) or ``model`` (see :func:`dinov2.hub.weights.read_state_dict`).
The architecture comes from ``--config-file`` (a training config, e.g. a run's ``config.yaml``)
or, for the official releases, from ``--arch dinov2_vits14`` style names. Weights always load
strictly: a missing or extra key is an error listing the keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2

from dinov2.hub.backbones import ENTRY_POINTS
from dinov2.hub.weights import load_backbone_weights
from dinov2.models import build_model_from_cfg
from dinov2.utils.config import CONFIG_FILE_NAME, load_saved_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPORT_NAME = "teacher_backbone_latest.pth"
PathLike = os.PathLike | str


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


def resolve_weights_path(pretrained_weights: PathLike) -> Path:
    """The backbone file behind ``--pretrained-weights`` (see the module docstring)."""
    path = Path(pretrained_weights)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"--pretrained-weights: {path} does not exist")
    if (path / ".metadata").is_file():
        raise ValueError(
            f"--pretrained-weights: {path} is a sharded training checkpoint (torch.distributed.checkpoint). "
            f"Turn it into one backbone file with `python scripts/consolidate_checkpoint.py {path} --output teacher.pth` "
            f"and pass that file, or pass the training output directory once it has an export."
        )
    for candidate in (path / "exports" / EXPORT_NAME, path / EXPORT_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"--pretrained-weights: {path} is a directory without a teacher export ({path / 'exports' / EXPORT_NAME} "
        f"does not exist yet). Training writes one every evaluation.eval_period_iterations iterations; to make "
        f"one now from the newest checkpoint, run `python scripts/consolidate_checkpoint.py {path} "
        f"--output {path / 'exports' / EXPORT_NAME}` (see its --help)."
    )


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
    weights_path = resolve_weights_path(pretrained_weights)
    config_path = _config_for(config_file, pretrained_weights)
    if arch is not None:
        if config_file:
            raise ValueError("give either --config-file or --arch, not both")
        if arch not in ENTRY_POINTS:
            raise ValueError(f"--arch {arch!r} is not an official architecture; valid: {sorted(ENTRY_POINTS)}")
        model = ENTRY_POINTS[arch](pretrained=True, pretrained_weights=weights_path)
        size, mean, std, description, config_path = 224, IMAGENET_MEAN, IMAGENET_STD, arch, None
    else:
        if config_path is None:
            raise ValueError(
                "no model description: give --config-file (a training output's config.yaml, or a training "
                f"config) or --arch (one of {sorted(ENTRY_POINTS)}) for official-format weights"
            )
        cfg = load_saved_config(config_path, overrides)
        model, _ = build_model_from_cfg(cfg, only_teacher=True)
        load_backbone_weights(model, weights_path)
        size = int(cfg.crops.global_crops_size)
        mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
        description = f"{cfg.student.arch}/{cfg.student.patch_size} from {config_path}"
    size = int(image_size or size)
    if size % model.patch_size:
        raise ValueError(f"evaluation image size {size} is not a multiple of the patch size {model.patch_size}")
    model.requires_grad_(False)
    model.eval().to(device)
    return EvalBackbone(model, size, mean, std, weights_path, config_path, description)


def make_eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, resize_size: Optional[int] = None
) -> v2.Compose:
    """Resize the short side to ``image_size * 256 / 224`` (or ``resize_size``), centre-crop, normalise."""
    resize_size = resize_size or int(round(image_size * 256 / 224))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def make_train_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Random-resized crop and horizontal flip: the augmentation of the on-the-fly linear probe."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
