import random

import pytest
import torch

from dinov2.data.collate import build_collate_fn_from_config
from dinov2.hub.weights import WeightsError, save_state_dict
from dinov2.models import build_backbone
from dinov2.train.param_groups import apply_optim_scheduler, build_optimizer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config
from train_helpers import TINY_OVERRIDES


def tiny_cfg(*extra):
    return load_config(None, TINY_OVERRIDES + list(extra))


def synthetic_batch(cfg, batch_size=4, seed=0):
    """A collated batch of random crops with real iBOT masks."""
    g = torch.Generator().manual_seed(seed)
    gs, ls = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    samples = [
        (
            {
                "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(cfg.crops.local_crops_number)],
            },
            0,
        )
        for _ in range(batch_size)
    ]
    collate = build_collate_fn_from_config(cfg, cfg.student.patch_size)
    return collate(samples, generator=random.Random(seed))


def test_teacher_is_a_frozen_copy_of_the_student():
    model = SSLMetaArch(tiny_cfg())
    student, teacher = dict(model.student.named_parameters()), dict(model.teacher.named_parameters())
    assert student.keys() == teacher.keys()
    for name in student:
        assert torch.equal(student[name], teacher[name]), name
        assert not teacher[name].requires_grad
    assert "dino_loss.center" in model.state_dict() and "ibot_patch_loss.center" in model.state_dict()
    assert "ibot_head" not in model.student  # shared with the DINO head by default
    assert "ibot_head" in SSLMetaArch(tiny_cfg("ibot.separate_head=true")).student


def test_forward_backward_terms_and_no_teacher_gradients():
    cfg = tiny_cfg()
    model = SSLMetaArch(cfg)
    model.train()
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    assert set(losses) == {"dino_global_crops_loss", "dino_local_crops_loss", "dino_loss", "ibot_loss", "koleo_loss",
                           "total_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["dino_loss"] == pytest.approx(float(losses["dino_global_crops_loss"] + losses["dino_local_crops_loss"]))
    expected_total = losses["dino_loss"] + 0.1 * losses["koleo_loss"] + losses["ibot_loss"]
    assert float(losses["total_loss"]) == pytest.approx(float(expected_total), rel=1e-5)
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.student.parameters()]
    assert all(g is not None for g in grads)
    assert model.student["backbone"].mask_token.grad.abs().sum() > 0  # masked global crops reached the student
    assert model.dino_loss.center.abs().sum() > 0  # the centre moved after one batch


def test_zero_loss_weights_skip_the_terms():
    cfg = tiny_cfg("dino.koleo_loss_weight=0", "ibot.loss_weight=0")
    model = SSLMetaArch(cfg)
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    assert set(losses) == {"dino_global_crops_loss", "dino_local_crops_loss", "dino_loss", "total_loss"}
    assert model.student["backbone"].mask_token.grad is None  # nothing masked without iBOT
    assert torch.count_nonzero(model.ibot_patch_loss.center) == 0
    with pytest.raises(ValueError, match="nothing to train"):
        SSLMetaArch(tiny_cfg("dino.loss_weight=0", "dino.koleo_loss_weight=0", "ibot.loss_weight=0"))


def test_separate_ibot_head_and_sinkhorn_knopp():
    cfg = tiny_cfg("ibot.separate_head=true", "ibot.head_n_prototypes=32", "train.centering=sinkhorn_knopp")
    model = SSLMetaArch(cfg)
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.student["ibot_head"].last_layer.weight.grad is not None
    assert torch.count_nonzero(model.dino_loss.center) == 0  # Sinkhorn-Knopp uses no centre


def test_teacher_follows_the_ema_formula_after_a_step():
    cfg = tiny_cfg()
    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.student, 2, cfg.optim)
    apply_optim_scheduler(optimizer, lr=1e-2, wd=0.04, last_layer_lr=1e-2)
    model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    optimizer.step()
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    student = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    assert any(not torch.equal(before[n], student[n]) for n in student)  # the step moved the student
    momentum = 0.9
    model.update_teacher(momentum)
    for name, param in model.teacher.named_parameters():
        expected = momentum * before[name].double() + (1 - momentum) * student[name].double()
        # Exact up to float32 rounding of the two operations (a wrong momentum is off by ~1e-3).
        torch.testing.assert_close(param.detach().double(), expected, rtol=3e-7, atol=1e-9)
        assert param.grad is None and not param.requires_grad


def test_revert_centers_undoes_the_last_update():
    cfg = tiny_cfg()
    model = SSLMetaArch(cfg)
    model.forward_backward(synthetic_batch(cfg, seed=1), teacher_temp=0.05)
    kept = model.dino_loss.center.clone()
    model.forward_backward(synthetic_batch(cfg, seed=2), teacher_temp=0.05)
    assert not torch.equal(model.dino_loss.center, kept)
    model.revert_centers()
    assert torch.equal(model.dino_loss.center, kept)


def test_warm_start_loads_student_and_teacher_backbones(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(123)
    source = build_backbone(cfg.student, cfg.crops.global_crops_size)
    path = save_state_dict(source.state_dict(), tmp_path / "backbone.pth")
    model = SSLMetaArch(tiny_cfg(f"student.pretrained_weights={path}"))
    for key, value in source.state_dict().items():
        assert torch.equal(model.student["backbone"].state_dict()[key], value), key
        assert torch.equal(model.teacher["backbone"].state_dict()[key], value), key
    # Heads are fresh but still identical between student and teacher.
    for (_, s), (_, t) in zip(model.student["dino_head"].named_parameters(), model.teacher["dino_head"].named_parameters()):
        assert torch.equal(s, t)

    wrong = tiny_cfg("student.embed_dim=48", f"student.pretrained_weights={path}")
    with pytest.raises(WeightsError, match="shape mismatches"):
        SSLMetaArch(wrong)


def test_head_batch_norm_uses_batch_statistics_in_student_and_teacher():
    cfg = tiny_cfg("dino.head_use_bn=true", "train.centering=sinkhorn_knopp")
    model = SSLMetaArch(cfg)
    model.train()
    for modules in (model.student, model.teacher):
        norms = [m for m in modules["dino_head"].modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert len(norms) == cfg.dino.head_nlayers - 1
        assert all(m.training for m in norms)  # batch statistics, also in the teacher
    assert not model.teacher["backbone"].training  # the rest of the teacher stays in eval mode
    batch = synthetic_batch(cfg)
    before = model.teacher["dino_head"].mlp[1].running_mean.clone()
    losses = model.forward_backward(batch, teacher_temp=0.05)
    assert all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(before, model.teacher["dino_head"].mlp[1].running_mean)
    # The teacher's targets are those of its batch-normalised head: the same logits as the
    # student's head (an exact copy at this point) on the teacher's CLS tokens.
    with torch.no_grad():
        cls = model.teacher["backbone"](batch["collated_global_crops"], is_training=True)["x_norm_clstoken"]
        expected = model.student["dino_head"](cls)
        model.teacher["dino_head"].mlp[1].running_mean.fill_(100.0)  # would matter in eval mode
        torch.testing.assert_close(model.teacher["dino_head"](cls), expected)
    model.eval()
    assert not any(m.training for m in model.teacher.modules())
    # A one-layer head keeps its BatchNorm (after the projection to the bottleneck).
    one_layer = SSLMetaArch(tiny_cfg("dino.head_use_bn=true", "dino.head_nlayers=1"))
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in one_layer.teacher["dino_head"].modules()) == 1


def test_batch_norm_head_normalises_global_and_local_crops_apart():
    cfg = tiny_cfg("dino.head_use_bn=true", "train.centering=sinkhorn_knopp", "ibot.separate_head=true")
    assert cfg.crops.local_crops_number > 0
    model = SSLMetaArch(cfg)
    model.train()
    head_batches = []
    model.student["dino_head"].register_forward_hook(lambda module, args, out: head_batches.append(args[0].shape[0]))
    losses = model.forward_backward(synthetic_batch(cfg, batch_size=4), teacher_temp=0.05)
    assert all(torch.isfinite(v) for v in losses.values())
    assert head_batches == [2 * 4, cfg.crops.local_crops_number * 4]  # one BatchNorm batch per crop size
