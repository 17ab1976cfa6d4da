"""Tiny classifiers and datasets shared by the tests/test_classify_*.py files."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinov2.classify.checkpoint import ClassifierConfig, save_classifier
from dinov2.classify.heads import HeadSpec, MultiHeadClassifier
from dinov2.classify.transforms import preprocessing_settings
from dinov2.hub.sources import load_backbone

TINY_VIT = dict(arch="vit_small", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2)
HEADS = [
    HeadSpec("presence", ("clear", "none", "resembles"), "cls"),
    HeadSpec("closure", ("closed", "open"), "mean"),
    HeadSpec("circularity", ("elongated", "round"), "cls+mean"),
]


def tiny_classifier(heads=HEADS, seed=0):
    torch.manual_seed(seed)
    backbone, spec = load_backbone("random", **TINY_VIT)
    # Strong position embeddings: with the default tiny ones a random ViT is almost blind to
    # where patches are, so mirrored images would give the same outputs.
    torch.nn.init.normal_(backbone.pos_embed, std=1.0)
    model = MultiHeadClassifier(backbone, heads)
    # Non-trivial head weights so that probabilities differ between images.
    for head in model.heads.values():
        torch.nn.init.normal_(head.weight, std=1.0)
    config = ClassifierConfig(
        backbone=spec, heads=list(heads), preprocessing=preprocessing_settings(crop_size=16, resize_size=20)
    )
    return model.eval(), config


def save_tiny_classifier(path: Path, seed=0) -> Path:
    model, config = tiny_classifier(seed=seed)
    return save_classifier(path, model, config)


def random_image(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def symmetric_image(seed: int, width=20, height=20) -> Image.Image:
    """Left-right mirror-symmetric image (even width so the centre crop stays symmetric)."""
    rng = np.random.default_rng(seed)
    half = rng.integers(0, 256, size=(height, width // 2, 3), dtype=np.uint8)
    return Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
