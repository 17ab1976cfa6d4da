import random

import pytest
import torch
from train_helpers import TINY_OVERRIDES

from dinov2.data.collate import build_collate_fn_from_config
from dinov2.hub.weights import WeightsError, save_state_dict
from dinov2.models import build_backbone
from dinov2.optim import apply_optim_scheduler, build_optimizer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config


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
    assert set(losses) == {
        "dino_global_crops_loss",
        "dino_local_crops_loss",
        "dino_loss",
        "ibot_loss",
        "koleo_loss",
        "total_loss",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["dino_loss"] == pytest.approx(
        float(losses["dino_global_crops_loss"] + losses["dino_local_crops_loss"])
    )
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


def test_infonce_term_on_the_head_bottleneck_with_and_without_dino():
    from dinov2.loss import InfoNCELoss

    cfg = tiny_cfg("infonce.loss_weight=0.5", "infonce.temperature=0.3", "ibot.loss_weight=0")
    model = SSLMetaArch(cfg)
    model.train()
    batch = synthetic_batch(cfg)
    losses = model.forward_backward(batch, teacher_temp=0.05)
    expected_total = losses["dino_loss"] + 0.1 * losses["koleo_loss"] + 0.5 * losses["infonce_loss"]
    assert float(losses["total_loss"]) == pytest.approx(float(expected_total), rel=1e-5)
    # The term is InfoNCE between the two global crops' bottleneck features of the student's head
    # (one BatchNorm group for both crops, as the DINO logits use).
    with torch.no_grad():
        cls = model.student["backbone"](batch["collated_global_crops"], is_training=True)["x_norm_clstoken"]
        bottleneck = model.student["dino_head"].forward_bottleneck(cls)
    expected = InfoNCELoss(temperature=0.3)(bottleneck.chunk(2))
    assert float(losses["infonce_loss"]) == pytest.approx(float(expected), rel=1e-4)

    # InfoNCE alone: the student's head still runs (for its bottleneck), the teacher's targets do not.
    alone = tiny_cfg("infonce.loss_weight=1", "dino.loss_weight=0", "dino.koleo_loss_weight=0", "ibot.loss_weight=0")
    model = SSLMetaArch(alone)
    model.train()
    losses = model.forward_backward(synthetic_batch(alone), teacher_temp=0.05)
    assert set(losses) == {"infonce_loss", "total_loss"}
    assert model.student["dino_head"].mlp[0].weight.grad.abs().sum() > 0
    assert model.student["backbone"].cls_token.grad.abs().sum() > 0
    assert model.student["dino_head"].last_layer.weight_v.grad is None  # prototypes unused


def test_separate_ibot_head_and_sinkhorn_knopp():
    cfg = tiny_cfg("ibot.separate_head=true", "ibot.head_n_prototypes=32", "train.centering=sinkhorn_knopp")
    model = SSLMetaArch(cfg)
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.student["ibot_head"].last_layer.weight_v.grad is not None
    assert model.student["ibot_head"].last_layer.weight_g.grad is not None  # magnitudes trained, as DINOv2
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
    for (_, s), (_, t) in zip(
        model.student["dino_head"].named_parameters(), model.teacher["dino_head"].named_parameters()
    ):
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
    assert not model.teacher["backbone"].training and not model.student["backbone"].training
    assert all(m.training for m in norms)  # the head's BatchNorm keeps using batch statistics
    # A one-layer head keeps its BatchNorm (after the projection to the bottleneck).
    one_layer = SSLMetaArch(tiny_cfg("dino.head_use_bn=true", "dino.head_nlayers=1"))
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in one_layer.teacher["dino_head"].modules()) == 1


@pytest.mark.parametrize("separate_head", [False, True], ids=["shared_ibot_head", "separate_ibot_head"])
@pytest.mark.parametrize("nlayers", [1, 3])
@pytest.mark.parametrize("use_bn", [False, True], ids=["no_bn", "bn"])
def test_each_head_layout_normalises_every_token_group_on_its_own(separate_head, nlayers, use_bn):
    """One call per head module and step; with BatchNorm every BatchNorm layer sees each token
    group (global-crop CLS, local-crop CLS, masked patches) in a call of its own."""
    bn = str(use_bn).lower()
    cfg = tiny_cfg(
        f"ibot.separate_head={str(separate_head).lower()}",
        f"dino.head_use_bn={bn}",
        f"ibot.head_use_bn={bn}",
        f"dino.head_nlayers={nlayers}",
        f"ibot.head_nlayers={nlayers}",
        "train.centering=sinkhorn_knopp",
    )
    batch_size = 4
    model = SSLMetaArch(cfg)
    model.train()
    head_calls, norm_rows = [], []
    for side in ("student", "teacher"):
        for name, head in getattr(model, side).items():
            if name == "backbone":
                continue
            head.register_forward_hook(lambda module, args, out, key=(side, name): head_calls.append(key))
            norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
            assert len(norms) == (nlayers if nlayers == 1 else nlayers - 1) * use_bn
            for index, norm in enumerate(norms):
                norm.register_forward_hook(
                    lambda module, args, out, key=(side, name, index): norm_rows.append((key, args[0].shape[0]))
                )
    data = synthetic_batch(cfg, batch_size=batch_size)
    losses = model.forward_backward(data, teacher_temp=0.05)
    assert all(torch.isfinite(v) for v in losses.values())

    n_global, n_local, n_masked = (
        2 * batch_size,
        cfg.crops.local_crops_number * batch_size,
        int(data["n_masked_patches"]),
    )
    assert 0 < n_masked < 2 * batch_size * 16
    if separate_head:
        groups = {
            ("teacher", "dino_head"): [n_global],
            ("teacher", "ibot_head"): [n_masked],
            ("student", "dino_head"): [n_global, n_local],
            ("student", "ibot_head"): [n_masked],
        }
    else:
        groups = {
            ("teacher", "dino_head"): [n_global, n_masked],
            ("student", "dino_head"): [n_global, n_local, n_masked],
        }
    assert sorted(head_calls) == sorted(groups)  # each head module called once per side
    expected_rows = [
        ((side, name, index), rows)
        for (side, name), sizes in groups.items()
        for index in range(
            len([m for m in getattr(model, side)[name].modules() if isinstance(m, torch.nn.BatchNorm1d)])
        )
        for rows in sizes
    ]
    assert sorted(norm_rows) == sorted(expected_rows)


def _upstream_head_state(prefix, in_dim, hidden_dim, bottleneck_dim, n_prototypes, generator):
    """Key names and shapes of upstream DINOv2's 3-layer DINOHead (no BatchNorm) state dict, as in
    its training checkpoints: ``mlp`` = Linear, GELU, Linear, GELU, Linear; ``last_layer`` made by
    ``torch.nn.utils.weight_norm`` (magnitudes ``weight_g`` of shape (K, 1)); random values."""
    shapes = {
        "mlp.0.weight": (hidden_dim, in_dim),
        "mlp.0.bias": (hidden_dim,),
        "mlp.2.weight": (hidden_dim, hidden_dim),
        "mlp.2.bias": (hidden_dim,),
        "mlp.4.weight": (bottleneck_dim, hidden_dim),
        "mlp.4.bias": (bottleneck_dim,),
        "last_layer.weight_g": (n_prototypes, 1),
        "last_layer.weight_v": (n_prototypes, bottleneck_dim),
    }
    return {prefix + key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_an_upstream_training_state_with_heads_loads_strictly(norm_last_layer):
    flag = str(norm_last_layer).lower()
    cfg = tiny_cfg("ibot.separate_head=true", f"dino.head_norm_last_layer={flag}", f"ibot.head_norm_last_layer={flag}")
    model = SSLMetaArch(cfg)
    g = torch.Generator().manual_seed(0)
    state = {}
    for side in ("student", "teacher"):
        state.update(
            {
                f"{side}.backbone.{k}": torch.randn(v.shape, generator=g)
                for k, v in model.student["backbone"].state_dict().items()
            }
        )
        for head in ("dino_head", "ibot_head"):
            state.update(_upstream_head_state(f"{side}.{head}.", 32, 64, 32, 64, g))
    state["dino_loss.center"] = torch.randn(1, 64, generator=g)
    state["ibot_patch_loss.center"] = torch.randn(1, 64, generator=g)
    model.load_state_dict(state, strict=True)
    for key in ("student.dino_head.last_layer.weight_g", "teacher.ibot_head.last_layer.weight_v"):
        assert torch.equal(model.state_dict()[key], state[key])
    # The loaded magnitudes are applied: logits = weight_g * cosine.
    head = model.teacher["dino_head"]
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        features = head.forward_bottleneck(x)
        directions = torch.nn.functional.normalize(state["teacher.dino_head.last_layer.weight_v"], dim=1)
        expected = features @ (state["teacher.dino_head.last_layer.weight_g"] * directions).T
        torch.testing.assert_close(head(x), expected)


def test_prototype_magnitudes_train_in_the_prototype_group_unless_fixed():
    cfg = tiny_cfg()
    model = SSLMetaArch(cfg)
    last_layer = model.student["dino_head"].last_layer
    assert [n for n, _ in last_layer.named_parameters()] == ["weight_g", "weight_v"]
    assert torch.equal(last_layer.weight_g, torch.ones(64, 1))
    optimizer = build_optimizer(model.student, 2, cfg.optim)
    group = next(g for g in optimizer.param_groups if any(p is last_layer.weight_g for p in g["params"]))
    # As upstream: the prototype group (lr frozen at first), full lr multiplier, weight-decayed.
    assert group["is_last_layer"] and group["lr_multiplier"] == 1.0 and group["wd_multiplier"] == 1.0
    assert any(p is last_layer.weight_v for p in group["params"])
    model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    assert last_layer.weight_g.grad is not None and last_layer.weight_g.grad.abs().sum() > 0
    assert {id(p) for p in model.last_layer_parameters()} == {id(last_layer.weight_g), id(last_layer.weight_v)}

    fixed = SSLMetaArch(tiny_cfg("dino.head_norm_last_layer=true"))
    last_layer = fixed.student["dino_head"].last_layer
    assert [n for n, _ in last_layer.named_parameters()] == ["weight_v"]
    assert "dino_head.last_layer.weight_g" in fixed.student.state_dict()  # same keys: a buffer of ones
    assert torch.equal(last_layer.weight_g, torch.ones(64, 1))
    assert fixed.last_layer_parameters() == [last_layer.weight_v]
