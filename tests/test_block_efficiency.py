"""Subset stochastic depth and activation checkpointing: same model, less compute or memory."""

import pytest
import torch
from test_train_ssl_meta_arch import synthetic_batch, tiny_cfg
from train_helpers import TINY_OVERRIDES

from dinov2.layers import Block
from dinov2.layers.drop_path import drop_add_residual_subset, uses_sample_subset
from dinov2.models import build_model_from_cfg, vit_small
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config


def _block(rate, mode, seed=0):
    torch.manual_seed(seed)
    return Block(dim=16, num_heads=2, drop_path=rate, init_values=0.5, stochastic_depth=mode)


def test_auto_mode_switches_to_the_subset_above_rate_0_1():
    assert not uses_sample_subset("auto", 0.0) and not uses_sample_subset("subset", 0.0)
    assert not uses_sample_subset("auto", 0.1) and uses_sample_subset("auto", 0.11)
    assert not uses_sample_subset("mask", 0.4)
    assert uses_sample_subset("subset", 0.05) and uses_sample_subset("auto", 0.4)
    with pytest.raises(ValueError, match="stochastic_depth"):
        _block(0.1, "fast")


@pytest.mark.parametrize("mode", ["mask", "subset", "auto"])
def test_rate_zero_and_eval_mode_are_exactly_the_plain_block(mode):
    x = torch.randn(6, 5, 16)
    plain = _block(0.0, "mask").train()
    for block in (_block(0.0, mode).train(), _block(0.4, mode).eval()):
        assert torch.equal(block(x), plain(x))


def test_subset_residual_equals_the_mask_residual_in_expectation():
    """Averaged over draws, both schemes give the undropped output (x + r(x))."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4)
    weight = torch.randn(4, 4)

    def residual(t):
        return torch.tanh(t @ weight)

    full = x + residual(x)
    draws = 4000
    with torch.no_grad():
        subset = sum(drop_add_residual_subset(x, residual, 0.4) for _ in range(draws)) / draws
        block = _block(0.4, "mask")
        mask = sum(x + block.drop_path1(residual(x)) for _ in range(draws)) / draws
    # 8 samples, 4 kept, scale 2: each draw's residual is 0 or 2 r, so the mean's s.d. is r / sqrt(draws).
    tolerance = 4 * residual(x).abs().max() / draws**0.5
    assert (subset - full).abs().max() < tolerance
    assert (mask - full).abs().max() < tolerance
    # A single draw drops: exactly b - int(b * (1 - rate)) samples keep x unchanged.
    one = drop_add_residual_subset(x, residual, 0.4)
    unchanged = (one == x).flatten(1).all(dim=1)
    assert int(unchanged.sum()) == 8 - int(8 * 0.6)
    torch.testing.assert_close(one[~unchanged], x[~unchanged] + 2 * residual(x[~unchanged]))


def test_only_kept_samples_get_gradients_through_the_branch():
    torch.manual_seed(0)
    x = torch.randn(10, 4, 16, requires_grad=True)
    block = _block(0.5, "subset").train()
    seen = []
    block.attn.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    out = block._forward(x)  # noqa: SLF001 - the branch alone, without checkpointing
    assert seen == [5]  # the attention ran on the 5 kept samples only
    # Samples dropped by both branches pass through unchanged: d out / d x is the identity.
    both_dropped = [i for i in range(10) if torch.equal(out[i], x[i])]
    out.sum().backward()
    for i in both_dropped:
        assert torch.equal(x.grad[i], torch.ones_like(x.grad[i]))
    assert any(not torch.equal(x.grad[i], torch.ones_like(x.grad[i])) for i in range(10) if i not in both_dropped)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def _loss_and_grads(model, x):
    model.zero_grad()
    torch.manual_seed(1)  # the same dropped samples in every run
    loss = model.forward_features(x)["x_norm_patchtokens"].square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["mask", "subset"])
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(every, mode):
    torch.manual_seed(0)
    model = vit_small(
        patch_size=4,
        img_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        init_values=1.0,
        drop_path_rate=0.3,
        drop_path_uniform=True,
        stochastic_depth=mode,
    ).train()
    x = torch.randn(6, 3, 16, 16)
    reference = _loss_and_grads(model, x)
    model.set_activation_checkpointing(every)
    assert [b.checkpoint_activations for b in model.blocks] == [i % every == 0 for i in range(4)]
    checkpointed = _loss_and_grads(model, x)
    torch.testing.assert_close(checkpointed[0], reference[0], rtol=0, atol=1e-6)
    assert checkpointed[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=0, atol=1e-6, msg=name)
    # Key names are those of the plain model: nothing is wrapped.
    assert all(".blocks." not in k and "_checkpoint" not in k for k in model.state_dict())


def test_config_keys_reach_the_student_only_and_bad_values_are_refused():
    cfg = load_config(None, TINY_OVERRIDES + ["train.activation_checkpointing=1", "train.stochastic_depth=subset"])
    student, teacher, _ = build_model_from_cfg(cfg)
    assert all(b.checkpoint_activations and b.stochastic_depth == "subset" for b in student.blocks)
    assert not any(b.checkpoint_activations for b in teacher.blocks)
    for key, value in (
        ("activation_checkpointing", "-1"),
        ("activation_checkpointing", "true"),
        ("stochastic_depth", "fast"),
    ):
        with pytest.raises(ValueError, match=f"train.{key}"):
            build_model_from_cfg(load_config(None, TINY_OVERRIDES + [f"train.{key}={value}"]))


def test_an_ssl_training_step_is_unchanged_by_checkpointing():
    results = []
    for every in (0, 1):
        cfg = tiny_cfg(
            f"train.activation_checkpointing={every}", "train.stochastic_depth=subset", "student.drop_path_rate=0.4"
        )
        torch.manual_seed(0)
        model = SSLMetaArch(cfg).train()
        torch.manual_seed(2)
        losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        results.append((losses["total_loss"].detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp_two_rank_training_with_checkpointed_blocks_matches_without(tmp_path):
    """Checkpointing inside each FSDP2 block unit: the recomputation all-gathers the block again."""
    from test_train_distributed import run_two_ranks
    from train_helpers import make_image_folder, tiny_overrides

    data = make_image_folder(tmp_path / "images")
    overrides = tiny_overrides(
        data, "train.max_iterations=2", "train.stochastic_depth=subset", "student.drop_path_rate=0.4"
    )
    plain = run_two_ranks(tmp_path / "plain", overrides)
    checkpointed = run_two_ranks(tmp_path / "checkpointed", overrides + ["train.activation_checkpointing=1"])
    assert [line["iteration"] for line in checkpointed] == [1, 2]
    for a, b in zip(checkpointed, plain):
        for key in ("total_loss", "dino_loss", "ibot_loss", "koleo_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
