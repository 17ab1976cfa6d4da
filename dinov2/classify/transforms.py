"""Image preprocessing for classifiers: stored with the model, so inference matches training.

The settings are plain values saved in the classifier file; the transforms they describe are
the shared family of :mod:`dinov2.data.transforms` (the same pipelines as the evaluations).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from torchvision.transforms import InterpolationMode, v2

from dinov2.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    default_resize_size,
    make_classification_eval_transform,
    make_classification_train_transform,
    make_normalize_transform,
    make_resize_transform,
)


def preprocessing_settings(
    crop_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
) -> Dict[str, Any]:
    """Plain-value preprocessing description; ``resize_size`` defaults to ``crop_size * 8/7``."""
    if resize_size is None:
        resize_size = default_resize_size(crop_size)
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


def resize_transform(settings: Mapping[str, Any]) -> v2.Compose:
    """Image -> uint8 tensor resized so its short side is ``resize_size`` (before any crop)."""
    return make_resize_transform(settings["resize_size"], settings["interpolation"])


def normalise_transform(settings: Mapping[str, Any]) -> v2.Compose:
    """Crop(s) -> float tensor normalised with the stored ``mean`` / ``std``."""
    return make_normalize_transform(settings["mean"], settings["std"])


def eval_transform(settings: Mapping[str, Any]) -> v2.Compose:
    """Resize, centre crop, normalise: what inference without test-time augmentation sees."""
    return make_classification_eval_transform(
        settings["resize_size"], settings["crop_size"], settings["interpolation"], settings["mean"], settings["std"]
    )


def train_transform(settings: Mapping[str, Any], min_scale: float = 0.35, hflip: bool = True) -> v2.Compose:
    """Random resized crop (+ horizontal flip), normalised like :func:`eval_transform`."""
    return make_classification_train_transform(
        settings["crop_size"],
        settings["interpolation"],
        hflip_prob=0.5 if hflip else 0.0,
        mean=settings["mean"],
        std=settings["std"],
        scale=(min_scale, 1.0),
    )
