"""Image preprocessing for classifiers: stored with the model, so inference matches training."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing_settings(
    crop_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> Dict[str, Any]:
    """Plain-value preprocessing description; ``resize_size`` defaults to ``crop_size * 8/7``."""
    if resize_size is None:
        resize_size = int(round(crop_size * 8 / 7))
    if resize_size < crop_size:
        raise ValueError(f"resize_size {resize_size} must be >= crop_size {crop_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
    InterpolationMode(interpolation)  # raises ValueError naming the bad mode
    return {
        "crop_size": int(crop_size),
        "resize_size": int(resize_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
    }


def _to_normalised_tensor(settings: Mapping[str, Any]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=settings["mean"], std=settings["std"])]


def resize_transform(settings: Mapping[str, Any]) -> v2.Compose:
    """PIL image -> uint8 tensor resized so its short side is ``resize_size`` (before any crop)."""
    mode = InterpolationMode(settings["interpolation"])
    return v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize(settings["resize_size"], interpolation=mode, antialias=True)])


def normalise_transform(settings: Mapping[str, Any]) -> v2.Compose:
    return v2.Compose(_to_normalised_tensor(settings))


def eval_transform(settings: Mapping[str, Any]) -> v2.Compose:
    """Resize, centre crop, normalise: what inference without test-time augmentation sees."""
    return v2.Compose(
        [resize_transform(settings), v2.CenterCrop(settings["crop_size"]), *_to_normalised_tensor(settings)]
    )


def train_transform(
    settings: Mapping[str, Any], min_scale: float = 0.35, hflip: bool = True
) -> v2.Compose:
    """Random resized crop (+ horizontal flip), normalised like :func:`eval_transform`."""
    mode = InterpolationMode(settings["interpolation"])
    steps = [
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(settings["crop_size"], scale=(min_scale, 1.0), interpolation=mode, antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalised_tensor(settings))
