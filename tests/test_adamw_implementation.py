"""optim.adamw_implementation: torch's fused / foreach / for-loop AdamW, the same updates."""

import copy

import pytest
import torch
from train_helpers import TINY_OVERRIDES

from dinov2.optim import build_optimizer
from dinov2.optim.optimizers import adamw_implementation
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config

IMPLEMENTATIONS = ("for_loop", "foreach", "fused")


def _student_and_cfg(implementation="auto"):
    cfg = load_config(None, TINY_OVERRIDES + [f"optim.adamw_implementation={implementation}"])
    torch.manual_seed(0)
    return SSLMetaArch(cfg).student, cfg


def test_auto_picks_fused_where_torch_has_the_kernel():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_implementation(cpu, "auto") == "fused"
    assert adamw_implementation(cpu, "foreach") == "foreach"
    # No fused kernel for integer tensors, nor any kernel for the meta device: the next best.
    assert adamw_implementation([torch.zeros(3, dtype=torch.int64)], "auto") == "foreach"
    assert adamw_implementation([torch.zeros(3, device="meta")], "auto") == "for_loop"
    with pytest.raises(ValueError, match="optim.adamw_implementation=fused.*meta"):
        adamw_implementation([torch.zeros(3, device="meta")], "fused")
    with pytest.raises(ValueError, match="optim.adamw_implementation must be one of"):
        adamw_implementation(cpu, "apex")


def test_the_config_key_reaches_the_optimizer():
    student, cfg = _student_and_cfg()
    group = build_optimizer(student, 2, cfg.optim).param_groups[0]
    assert (group["fused"], group["foreach"]) == (True, False)
    student, cfg = _student_and_cfg("foreach")
    group = build_optimizer(student, 2, cfg.optim).param_groups[0]
    assert (group["fused"], group["foreach"]) == (False, True)
    with pytest.raises(ValueError, match="optim.adamw_implementation"):
        build_optimizer(student, 2, load_config(None, TINY_OVERRIDES + ["optim.adamw_implementation=fast"]).optim)


def _run_steps(student, implementation, grads, steps=3):
    student = copy.deepcopy(student)
    optimizer = build_optimizer(student, 2, _student_and_cfg(implementation)[1].optim)
    for step in range(steps):
        # Per-group lr and weight decay as the loop sets them (layer-wise decay, no-decay groups).
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * group["lr_multiplier"] / (step + 1)
            group["weight_decay"] = 0.04 * group["wd_multiplier"]
        for param, grad in zip(student.parameters(), grads[step]):
            param.grad = grad.clone()
        optimizer.step()
    return student, optimizer


def test_every_implementation_makes_the_same_updates():
    student, cfg = _student_and_cfg()
    generator = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=generator) for p in student.parameters()] for _ in range(3)]
    results = {name: _run_steps(student, name, grads)[0] for name in IMPLEMENTATIONS}
    reference = dict(results["for_loop"].named_parameters())
    moved = sum(not torch.equal(p, q) for p, q in zip(reference.values(), student.parameters()))
    assert moved == len(reference)  # every tensor was updated
    for name in ("foreach", "fused"):
        for key, param in results[name].named_parameters():
            torch.testing.assert_close(param, reference[key], rtol=1e-6, atol=1e-6, msg=f"{name}: {key}")


def test_a_loaded_state_keeps_the_configured_implementation():
    """load_state_dict restores group options too; a checkpoint written by another
    implementation must not switch the run back to it, and the update continues the same."""
    student, cfg = _student_and_cfg()
    generator = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=generator) for p in student.parameters()] for _ in range(3)]
    trained, saved_by_loop = _run_steps(student, "for_loop", grads, steps=2)
    expected = _run_steps(student, "for_loop", grads, steps=3)[0]

    resumed = copy.deepcopy(trained)
    optimizer = build_optimizer(resumed, 2, cfg.optim)  # auto: fused
    optimizer.load_state_dict(saved_by_loop.state_dict())
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2 * group["lr_multiplier"] / 3
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    for param, grad in zip(resumed.parameters(), grads[2]):
        param.grad = grad.clone()
    optimizer.step()
    for (key, param), reference in zip(resumed.named_parameters(), expected.parameters()):
        torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-6, msg=key)
