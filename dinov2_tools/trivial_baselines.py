"""Features that need no pretraining: the bars a pretrained backbone has to clear.

A user who pretrains on small grayscale drawings should get features that beat what a fixed
transform of the pixels gives with the same classifier. This module makes those features for any
dataset of ``(PIL image, target)`` pairs:

- ``raw``: the pixels as ink intensities (white paper = 0, black ink = 1), flattened;
- ``blur:<sigma>``: the same after a Gaussian blur (kernel ``2 * ceil(3 sigma) + 1``), which turns a
  stroke into a band that overlaps nearby strokes of other drawings;
- ``pool:<size>``: adaptive average pooling to ``size x size`` cells (a coarse ink layout);
- a randomly initialised backbone's CLS token (:func:`random_backbone_features`).

Used by ``scripts/quickdraw_pixel_knn.py`` (the k-NN table) and ``scripts/label_efficiency.py``
(the few-label probes).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

DEFAULT_BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_POOL_SIZES = (14, 10, 7, 5, 4)


def default_pixel_baselines() -> List[str]:
    """Every fixed-transform baseline of the k-NN table, in print order."""
    return ["raw"] + [f"blur:{s:g}" for s in DEFAULT_BLUR_SIGMAS] + [f"pool:{p}" for p in DEFAULT_POOL_SIZES]


def ink_images(dataset) -> torch.Tensor:
    """(N, 1, H, W) float32 ink intensities in [0, 1] of a dataset of (PIL image, target) pairs."""
    rows = []
    for i in range(len(dataset)):
        image, _ = dataset[i]
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        rows.append(1.0 - gray)
    if not rows:
        raise ValueError("the dataset is empty: no images to make baseline features from")
    return torch.from_numpy(np.stack(rows))[:, None]


def pixel_baseline(ink: torch.Tensor, name: str) -> torch.Tensor:
    """(N, D) features of the baseline ``name`` (``raw``, ``blur:<sigma>``, ``pool:<size>``)."""
    kind, _, value = name.partition(":")
    if kind == "raw" and not value:
        out = ink
    elif kind == "blur" and value:
        sigma = float(value)
        if sigma <= 0:
            raise ValueError(f"baseline {name!r}: the blur sigma must be positive")
        kernel = 2 * math.ceil(3 * sigma) + 1
        out = TF.gaussian_blur(ink, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    elif kind == "pool" and value:
        size = int(value)
        if not 0 < size <= min(ink.shape[-2:]):
            raise ValueError(f"baseline {name!r}: the pooled size must be in 1..{min(ink.shape[-2:])}")
        out = F.adaptive_avg_pool2d(ink, size)
    else:
        raise ValueError(f"unknown baseline {name!r}: use raw, blur:<sigma> or pool:<size>")
    return out.flatten(1).contiguous()


def random_backbone_features(
    config_file: str, ink: torch.Tensor, seed: int, overrides: Sequence[str] = (), batch_size: int = 512
) -> torch.Tensor:
    """CLS tokens of a randomly initialised teacher backbone of a training config's shape.

    The images are normalised with the config's ``crops.mean`` / ``crops.std`` (the recipe's
    evaluation sees exactly these pixels) at their own size.
    """
    from dinov2.models import build_model_from_cfg
    from dinov2.utils.config import load_config

    cfg = load_config(config_file, overrides)
    torch.manual_seed(seed)
    model, _ = build_model_from_cfg(cfg, only_teacher=True)  # initialised from the seed
    model.eval()
    mean = torch.tensor(list(cfg.crops.mean), dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(list(cfg.crops.std), dtype=torch.float32)[None, :, None, None]
    features = []
    with torch.inference_mode():
        for start in range(0, len(ink), batch_size):
            paper = 1.0 - ink[start : start + batch_size].expand(-1, 3, -1, -1)  # back to RGB in [0, 1]
            features.append(model((paper - mean) / std))
    return torch.cat(features).float()
