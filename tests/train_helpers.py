"""Shared tiny set-up for the tests/test_train_*.py files."""

import os

import numpy as np
from PIL import Image

TINY_OVERRIDES = [
    "student.arch=vit_small",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "student.drop_path_rate=0.1",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=5",
    "optim.epochs=4",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "logging.log_period_iterations=1",
    "checkpointing.period_iterations=5",
    "evaluation.export_period_iterations=10",
]


def make_image_folder(root, n_classes: int = 3, per_class: int = 8, size: int = 20, seed: int = 0) -> str:
    """``root/c<k>/<i>.png``: colour-coded classes with noise (k-NN can separate them)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = os.path.join(root, f"c{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += 180
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def tiny_overrides(data_root, *extra):
    return [f"train.dataset_path=ImageFolder:root={data_root}:cache=false", *TINY_OVERRIDES, *extra]


# The smallest backbone evaluation, classifiers and tools are tested with (no heads needed).
TINY_BACKBONE = [
    "student.arch=vit_small",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "crops.global_crops_size=16",
]


def make_training_output(directory, overrides=TINY_BACKBONE, seed: int = 0):
    """A training output directory as evaluation reads it: ``config.yaml`` and a teacher export
    (``exports/teacher_backbone_latest.pth``) of a randomly initialised backbone."""
    from pathlib import Path

    import torch

    from dinov2.hub.weights import save_state_dict
    from dinov2.models import build_model_from_cfg
    from dinov2.utils.config import load_config, save_config

    directory = Path(directory)
    cfg = load_config(None, list(overrides))
    save_config(cfg, directory)
    torch.manual_seed(seed)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    save_state_dict(teacher.state_dict(), directory / "exports" / "teacher_backbone_latest.pth")
    return directory


def count_forwards(module) -> list:
    """Make ``module.forward`` append to the returned list at each call (e.g. a distillation run's
    frozen teacher backbone: one forward per batch, whatever the number of students)."""
    forward, calls = module.forward, []

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls
