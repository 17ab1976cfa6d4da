"""train.compile: compiled blocks give the eager results, fall back with a warning, work under FSDP2.

Compiling is slow on a small shared CPU (inductor writes and builds C++), so the shapes are tiny,
the inductor tests few, and the training tests use one trainer each; torch's compile cache under
/tmp makes a second run faster.
"""

import copy
import logging

import pytest
import torch
from test_train_ssl_meta_arch import synthetic_batch, tiny_cfg
from train_helpers import make_image_folder, tiny_overrides

import dinov2.train.compile as compile_module
from dinov2.train.compile import compile_blocks
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config

# One block setting for all blocks (no drop rate) and one crop size: one compiled graph each for the
# student (with grad) and the teacher (no grad). No KoLeo: its log of tiny nearest-neighbour
# distances in an untrained model turns float rounding into 0.5% differences of some gradients
# (eager fp32 itself is 2% away from fp64 there), which would hide what this tests.
COMPILE_OVERRIDES = ["student.drop_path_rate=0.0", "crops.local_crops_number=0", "dino.koleo_loss_weight=0"]


def _forward_backward(model, cfg, seed=0):
    torch.manual_seed(seed)
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    grads = {name: p.grad.clone() for name, p in model.student.named_parameters() if p.grad is not None}
    return losses, grads


def test_compiled_blocks_give_the_eager_losses_gradients_and_names():
    cfg = tiny_cfg(*COMPILE_OVERRIDES)
    torch.manual_seed(0)
    eager = SSLMetaArch(cfg).train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 4  # 2 student + 2 teacher blocks
    # Only forward is replaced: parameter names (checkpoints, exports) are those of the eager model.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    expected_losses, expected_grads = _forward_backward(eager, cfg)
    losses, grads = _forward_backward(compiled, cfg)
    assert losses.keys() == expected_losses.keys()
    for name, value in expected_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        error = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 1e-5, (name, float(error))
    # A deep copy of a compiled model runs its own blocks, not the original's.
    copied = copy.deepcopy(compiled)
    with torch.no_grad():
        for param in copied.teacher["backbone"].parameters():
            param.zero_()
        x = torch.randn(2, 3, 16, 16)
        assert not torch.allclose(copied.teacher["backbone"](x), compiled.teacher["backbone"](x))


def _trainer(tmp_path, name, *extra):
    data = make_image_folder(tmp_path / "images")
    cfg = load_config(None, tiny_overrides(data, *COMPILE_OVERRIDES, "train.max_iterations=3", *extra))
    return SSLTrainer(cfg, output_dir=tmp_path / name)


def _train_steps(trainer, steps=3):
    data = iter(trainer.loader)
    losses = []
    for _ in range(steps):
        result = trainer.train_step(next(data))
        trainer.iteration += 1
        assert result["finite"]
        losses.append(result["losses"])
    return losses


def test_compiled_training_steps_match_eager(tmp_path):
    eager = _train_steps(_trainer(tmp_path, "eager"))
    trainer = _trainer(tmp_path, "compiled", "train.compile=true")
    assert trainer.compiled
    compiled = _train_steps(trainer)
    for step, (a, b) in enumerate(zip(compiled, eager)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (step, key)


def test_a_compiler_that_fails_the_probe_warns_and_trains_eager(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(compile_module, "compiler_problem", lambda *args: "CppCompileError: no C++ compiler found")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        trainer = _trainer(tmp_path, "fallback", "train.compile=true")
    assert not trainer.compiled
    (message,) = [r.getMessage() for r in caplog.records if "train.compile=true" in r.getMessage()]
    assert "no C++ compiler found" in message and "set train.compile=false" in message
    block = trainer.model.student["backbone"].blocks[0]
    assert "forward" not in vars(block)  # eager: the class's forward
    assert len(_train_steps(trainer, steps=1)) == 1


def test_the_probe_reports_a_real_failure_and_bad_modes_are_refused():
    problem = compile_module.compiler_problem(torch.device("cpu"), backend="no_such_backend")
    assert problem is not None and "no_such_backend" in problem
    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        compile_module.compile_for_training(
            tiny_cfg("train.compile=true", "train.compile_mode=reduce-overhead"), [], torch.device("cpu")
        )


@pytest.mark.slow
def test_fsdp_two_rank_training_with_compiled_blocks_matches_eager(tmp_path):
    """Compile per block, then shard: each FSDP2 unit's hooks run around a compiled forward."""
    from test_train_distributed import run_two_ranks

    data = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(data, *COMPILE_OVERRIDES, "train.max_iterations=2")
    eager = run_two_ranks(tmp_path / "eager", overrides)
    compiled = run_two_ranks(tmp_path / "compiled", overrides + ["train.compile=true"])
    assert [line["iteration"] for line in compiled] == [1, 2]
    for a, b in zip(compiled, eager):
        for key in ("total_loss", "dino_loss", "ibot_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
