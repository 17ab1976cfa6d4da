"""The Quick, Draw! recipe (configs/train/quickdraw_vit_tiny.yaml): its schedules mean what
docs/quickdraw_recipe.md says, its model trains one step, and the raw-pixel baseline's features
are ink intensities."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.layers import ConvStemPatchEmbed
from dinov2.optim.schedules import build_schedules, scaled_learning_rate
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs/train/quickdraw_vit_tiny.yaml")


def _recipe(*overrides):
    return load_config(RECIPE, list(overrides))


def test_recipe_schedules_in_iterations():
    cfg = _recipe()
    lr = scaled_learning_rate(cfg.optim.base_lr, cfg.train.batch_size_per_gpu, cfg.optim.scaling_rule)
    schedules = build_schedules(cfg, lr)
    assert schedules.total_iters == 3300
    assert lr == pytest.approx(0.001)
    assert schedules.lr(99) == pytest.approx(0.001)  # 100 warm-up iterations end at the peak
    assert schedules.lr(50) < 0.001 and schedules.lr(3299) < 1e-5
    assert schedules.teacher_temp(0) == schedules.teacher_temp(3000) == pytest.approx(0.05)
    assert schedules.last_layer_frozen(24) and not schedules.last_layer_frozen(25)
    assert schedules.momentum(0) == schedules.momentum(3300) == pytest.approx(0.9)  # a fast teacher


def test_recipe_model_has_a_conv_stem_linear_batch_norm_heads_and_trains_one_step():
    torch.manual_seed(0)
    cfg = _recipe("train.batch_size_per_gpu=4")
    model = SSLMetaArch(cfg)
    model.train()
    names = [name for name, _ in model.student.named_parameters()]
    assert not any(".ls1." in name or ".ls2." in name for name in names)
    assert model.student["backbone"].patch_size == 4 and model.student["backbone"].n_blocks == 4
    assert model.student["backbone"].blocks[0].mlp.fc1.out_features == 2 * 192  # mlp_ratio 2
    assert model.student["backbone"].num_heads == 6
    for modules in (model.student, model.teacher):  # overlapping 3x3 convolutions, the same 7 x 7 token grid
        assert isinstance(modules["backbone"].patch_embed, ConvStemPatchEmbed)
        assert modules["backbone"].patch_embed(torch.zeros(1, 3, 28, 28)).shape == (1, 49, 192)
    for modules in (model.student, model.teacher):  # one-layer linear + BatchNorm head, batch statistics on both sides
        layers = list(modules["dino_head"].mlp)
        assert [type(m).__name__ for m in layers] == ["Linear", "GlobalBatchNorm1d"]
        assert layers[0].out_features == cfg.dino.head_bottleneck_dim and layers[1].training
        assert modules["dino_head"].last_layer.fixed_magnitude  # the measured runs' settings, pinned
    assert cfg.optim.clip_grad_scope == "global"
    batch = 4
    assert cfg.crops.local_crops_number == 0
    data = {
        "collated_global_crops": torch.randn(2 * batch, 3, 28, 28),
        "collated_local_crops": torch.zeros(0, 3, 12, 12),
        "collated_masks": torch.zeros(2 * batch, 49, dtype=torch.bool),
        "mask_indices_list": torch.zeros(0, dtype=torch.long),
        "n_masked_patches": torch.tensor([0]),
        "masks_weight": torch.zeros(0),
    }
    losses = model.forward_backward(data, teacher_temp=0.05)
    assert set(losses) == {
        "dino_global_crops_loss",
        "dino_loss",
        "koleo_loss",
        "infonce_loss",
        "total_loss",
    }  # iBOT off
    expected_total = (
        losses["dino_loss"]
        + cfg.dino.koleo_loss_weight * losses["koleo_loss"]
        + cfg.infonce.loss_weight * losses["infonce_loss"]
    )
    assert cfg.dino.koleo_loss_weight == pytest.approx(0.02) and cfg.infonce.loss_weight == pytest.approx(1.0)
    torch.testing.assert_close(losses["total_loss"], expected_total)
    assert all(math.isfinite(float(v)) for v in losses.values())
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_pixel_baseline_features_are_ink_intensities():
    spec = importlib.util.spec_from_file_location("quickdraw_pixel_knn", REPO / "scripts/quickdraw_pixel_knn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    image = np.full((28, 28), 255, dtype=np.uint8)
    image[3, 5] = 0  # one black stroke pixel on white paper
    features = module.pixel_features([(Image.fromarray(image).convert("RGB"), 0)])
    assert features.shape == (1, 784)
    assert features[0, 3 * 28 + 5] == pytest.approx(1.0) and float(features.sum()) == pytest.approx(1.0)
