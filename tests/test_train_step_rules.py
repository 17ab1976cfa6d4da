"""Rules of one training step checked through SSLTrainer / SSLMetaArch: prototypes frozen during
the first epoch, gradient clipping before the optimizer step, warm start from a backbone file made
for another image size, KoLeo across ranks by config, SIGTERM as a stop request."""

import math
import os
import signal

import pytest
import torch
from train_helpers import TINY_OVERRIDES, make_image_folder, tiny_overrides

from dinov2.checkpoint.signals import StopSignal
from dinov2.hub.weights import WeightsError, save_state_dict
from dinov2.models import build_backbone
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=4)


def _prototypes(trainer):
    return [p.detach().clone() for p in trainer.model.last_layer_parameters()]


def test_prototypes_stay_frozen_for_the_first_epoch_then_train(tmp_path, data_root):
    # Epoch = 2 iterations, warm-up 0 so the lr is non-zero from the first step.
    cfg = load_config(
        None,
        tiny_overrides(
            data_root,
            "train.OFFICIAL_EPOCH_LENGTH=2",
            "optim.warmup_epochs=0",
            "optim.freeze_last_layer_epochs=1",
            "optim.base_lr=0.05",
        ),
    )
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "run")
    # The shared DINO/iBOT head's prototype directions and (trained) magnitudes.
    assert len(trainer.model.last_layer_parameters()) == 2
    iterator = iter(trainer.loader)
    start = _prototypes(trainer)
    backbone_start = trainer.model.student["backbone"].blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(2):  # the first epoch
        batch = next(iterator)
        batch.pop("skipped_images")
        assert trainer.train_step(batch)["finite"]
        trainer.iteration += 1
    assert all(torch.equal(a, b) for a, b in zip(start, _prototypes(trainer)))
    assert not torch.equal(backbone_start, trainer.model.student["backbone"].blocks[0].attn.qkv.weight)
    batch = next(iterator)
    batch.pop("skipped_images")
    assert trainer.train_step(batch)["finite"]
    assert not all(torch.equal(a, b) for a, b in zip(start, _prototypes(trainer)))


def _norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@pytest.mark.parametrize("scope", ["per_module", "global"])
def test_gradients_are_clipped_to_the_configured_norm_before_the_step(tmp_path, data_root, scope):
    cfg = load_config(
        None,
        tiny_overrides(data_root, "optim.clip_grad=0.01", "ibot.separate_head=true", f"optim.clip_grad_scope={scope}"),
    )
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "run")
    seen = []
    original_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(
            {
                name: _norm([p.grad for p in module.parameters() if p.grad is not None])
                for name, module in trainer.model.student.items()
            }
        )
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    batch = next(iter(trainer.loader))
    batch.pop("skipped_images")
    result = trainer.train_step(batch)
    norms = seen[0]
    assert set(norms) == {"backbone", "dino_head", "ibot_head"}
    assert result["grad_norm"] > 0.03  # the logged norm is the one of all gradients before clipping
    if scope == "per_module":  # as upstream: each module on its own
        for name, norm in norms.items():
            assert norm == pytest.approx(0.01, rel=1e-3), name
    else:  # one norm over the whole student
        assert _norm(torch.tensor(list(norms.values()))) == pytest.approx(0.01, rel=1e-3)
        assert not all(norm == pytest.approx(0.01, rel=1e-2) for norm in norms.values())


def test_clip_student_gradients_returns_the_norm_before_clipping_and_sees_non_finite():
    from dinov2.optim.grad_clip import clip_student_gradients

    student = torch.nn.ModuleDict(
        {"backbone": torch.nn.Linear(3, 4), "dino_head": torch.nn.Linear(4, 2), "ibot_head": torch.nn.Linear(4, 2)}
    )

    def set_grads(scale_backbone, scale_head):
        for name, module in student.items():
            for param in module.parameters():
                param.grad = (
                    None
                    if name == "ibot_head"
                    else torch.full_like(param, scale_backbone if name == "backbone" else scale_head)
                )

    set_grads(1.0, 0.01)  # 16 entries of 1 -> norm 4; 10 of 0.01 -> norm 0.0316
    expected = math.sqrt(16 + 10 * 1e-4)
    norm = clip_student_gradients(student, 1.0, "per_module")
    assert float(norm) == pytest.approx(expected)
    assert _norm([p.grad for p in student["backbone"].parameters()]) == pytest.approx(1.0)
    assert _norm([p.grad for p in student["dino_head"].parameters()]) == pytest.approx(
        math.sqrt(10) * 0.01
    )  # under the limit
    set_grads(1.0, 0.01)
    assert float(clip_student_gradients(student, 1.0, "global")) == pytest.approx(expected)
    assert _norm([p.grad for m in student.values() for p in m.parameters() if p.grad is not None]) == pytest.approx(1.0)
    set_grads(1.0, float("inf"))
    assert not math.isfinite(float(clip_student_gradients(student, 1.0, "per_module")))
    with pytest.raises(ValueError, match="optim.clip_grad_scope"):
        clip_student_gradients(student, 1.0, "per_layer")


def test_warm_start_resamples_position_embeddings_of_another_image_size(tmp_path):
    # The released backbones are made for 518 px; training builds them for the global crop size.
    cfg = load_config(None, TINY_OVERRIDES)
    torch.manual_seed(5)
    released = build_backbone(cfg.student, img_size=32)  # 8 x 8 patch grid vs the run's 4 x 4
    released.eval()
    path = save_state_dict(released.state_dict(), tmp_path / "released.pth")
    model = SSLMetaArch(load_config(None, TINY_OVERRIDES + [f"student.pretrained_weights={path}"]))
    student, teacher = model.student["backbone"], model.teacher["backbone"]
    assert student.pos_embed.shape == (1, 1 + 16, 32)
    for key, value in released.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(student.state_dict()[key], value), key
    assert torch.equal(student.pos_embed, teacher.pos_embed)
    # Resampled like the released model does on the fly: same features at the training resolution.
    teacher.eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), released(images), rtol=1e-5, atol=1e-5)

    bad = {k: v for k, v in released.state_dict().items()}
    bad["pos_embed"] = torch.zeros(1, 1 + 15, 32)  # not a square grid
    save_state_dict(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="square grid"):
        SSLMetaArch(load_config(None, TINY_OVERRIDES + [f"student.pretrained_weights={tmp_path / 'bad.pth'}"]))


def test_koleo_across_ranks_follows_the_config():
    assert SSLMetaArch(load_config(None, TINY_OVERRIDES)).koleo_loss.distributed
    assert not SSLMetaArch(load_config(None, TINY_OVERRIDES + ["dino.koleo_distributed=false"])).koleo_loss.distributed


def test_sigterm_requests_a_checkpoint_and_stop():
    previous = signal.getsignal(signal.SIGTERM)
    calls = []
    with StopSignal(callback=lambda: calls.append(1)) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and calls == [1] and stop.should_stop()
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_from_the_config(precision):
    from test_train_ssl_meta_arch import synthetic_batch

    from dinov2.fsdp import mixed_precision_policy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    policy = mixed_precision_policy(precision, "fp32")  # what FSDP2 gets on several ranks
    assert (policy.param_dtype, policy.reduce_dtype) == (dtype, torch.float32)
    cfg = load_config(
        None,
        TINY_OVERRIDES + [f"compute_precision.param_dtype={precision}", f"compute_precision.teacher_dtype={precision}"],
    )
    model = SSLMetaArch(cfg)
    model.train()
    seen = []
    hook = model.student["backbone"].blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05, scaler=scaler)
    hook.remove()
    assert dtype in seen  # the matmuls ran in the low precision ...
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())  # ... the losses in fp32
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)  # master weights and grads stay fp32
    assert all(p.grad is None for p in model.teacher.parameters())
