"""Packed multi-crop attention: every crop of a step in one sequence, the same result as per resolution."""

import pytest
import torch
from test_train_ssl_meta_arch import synthetic_batch, tiny_cfg
from train_helpers import TINY_OVERRIDES

from dinov2.layers.packing import (
    PackedLayout,
    drop_add_residual_subset_packed,
    drop_path_packed,
    resolve_packed_kernel,
)
from dinov2.models import build_model_from_cfg, vit_small
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import load_config

CPU = torch.device("cpu")


def _model_and_inputs():
    torch.manual_seed(0)
    # Registers and an iBOT mask on the global crops: every token kind goes through the packing.
    model = vit_small(patch_size=4, img_size=16, embed_dim=48, depth=2, num_heads=3, num_register_tokens=1)
    model.train()
    crops = [torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)]
    masks = [torch.rand(4, 16) < 0.4, None]
    return model, crops, masks


def _forward_backward(model, crops, masks, mode):
    model.set_packed_attention(mode)
    model.zero_grad()
    outputs = model.forward_features_list(crops, masks)
    # Fixed random weights on every output token: a loss whose gradient does not cancel out.
    generator = torch.Generator().manual_seed(1)
    loss = sum((o["x_prenorm"] * torch.randn(o["x_prenorm"].shape, generator=generator)).sum() for o in outputs)
    loss = loss + sum(o["x_norm_clstoken"].square().sum() for o in outputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("kernel", ["packed", "sdpa_split", "sdpa_mask", "njt"])
def test_each_cpu_kernel_equals_the_per_resolution_forward_and_backward(kernel):
    model, crops, masks = _model_and_inputs()
    reference, reference_grads = _forward_backward(model, crops, masks, "per_resolution")
    packed, packed_grads = _forward_backward(model, crops, masks, kernel)
    for ref, out in zip(reference, packed):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert out[key].shape == ref[key].shape
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=f"{kernel} {key}")
    assert packed_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        # Summation order differs (a T x T masked softmax, a crop-by-crop loop): fp32 rounding,
        # measured at most 1e-5 of each gradient's largest entry.
        scale = grad.abs().max().item()
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=3e-5 * scale, msg=f"{kernel} {name}")


def test_packing_is_not_a_no_op_attention_stays_within_each_crop():
    """The dense mask matters: without it the crops would attend to each other and differ."""
    model, crops, masks = _model_and_inputs()
    model.eval()
    layout = PackedLayout.of([torch.zeros(4, 18, 1), torch.zeros(6, 6, 1)], "sdpa_mask")
    crop = layout.crop_of_token(CPU)
    assert crop.shape == (4 * 18 + 6 * 6,) and crop[17] == 0 and crop[18] == 1 and crop[-1] == 9
    with torch.no_grad():
        reference = model.forward_features_list(crops, masks)
        model.set_packed_attention("sdpa_mask")
        packed = model.forward_features_list(crops, masks)
        # One crop changed: only that crop's output changes.
        crops[1][2] += 1.0
        changed = model.forward_features_list(crops, masks)
    torch.testing.assert_close(packed[1]["x_prenorm"], reference[1]["x_prenorm"], rtol=1e-5, atol=1e-5)
    moved = (changed[1]["x_prenorm"] - packed[1]["x_prenorm"]).abs().amax(dim=(1, 2))
    assert moved[2] > 1e-3 and moved[[0, 1, 3, 4, 5]].max() == 0
    assert torch.equal(changed[0]["x_prenorm"], packed[0]["x_prenorm"])


def test_flex_attention_runs_inference_on_the_cpu_and_refuses_training_there():
    model, crops, masks = _model_and_inputs()
    with torch.no_grad():
        reference = model.forward_features_list(crops, masks)
        model.set_packed_attention("flex")
        packed = model.forward_features_list(crops, masks)
    for ref, out in zip(reference, packed):
        torch.testing.assert_close(out["x_prenorm"], ref["x_prenorm"], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="flex attention has no backward on the CPU"):
        model.forward_features_list(crops, masks)


def test_mode_resolution_per_device():
    cuda = torch.device("cuda")
    assert resolve_packed_kernel("per_resolution", CPU) is None
    # auto packs only where packing was measured faster (CUDA with xformers): never on the CPU.
    assert resolve_packed_kernel("auto", CPU) is None
    assert resolve_packed_kernel("packed", CPU) == "sdpa_split"
    assert resolve_packed_kernel("njt", CPU) == "njt"
    with pytest.raises(ValueError, match="xformers needs CUDA tensors"):
        resolve_packed_kernel("xformers", CPU)
    with pytest.raises(ValueError, match="packed_attention must be one of"):
        resolve_packed_kernel("fast", CPU)
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        assert resolve_packed_kernel("auto", cuda) is None
        assert resolve_packed_kernel("packed", cuda) == "njt"


def test_a_single_resolution_is_never_packed():
    model, crops, masks = _model_and_inputs()
    model.set_packed_attention("sdpa_mask")
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    model.forward_features_list(crops[:1], masks[:1])
    assert calls == [{}]


def test_packed_subset_stochastic_depth_keeps_whole_crops_per_resolution():
    layout = PackedLayout(((4, 3), (6, 2)), "sdpa_split")
    x = torch.zeros(1, layout.total_tokens, 5)
    seen = []

    def residual(tokens, kept_layout):
        seen.append(kept_layout)
        return torch.ones_like(tokens)

    torch.manual_seed(0)
    out = drop_add_residual_subset_packed(x, residual, 0.5, layout)
    # max(int(4 * 0.5), 1) = 2 of 4 and 3 of 6 crops keep the branch, scaled by 4/2 and 6/3.
    assert seen == [PackedLayout(((2, 3), (3, 2)), "sdpa_split")]
    global_crops, local_crops = layout.split(out)
    for crops, kept in ((global_crops, 2), (local_crops, 3)):
        per_crop = crops[..., 0]
        assert (per_crop == per_crop[:, :1]).all()  # a crop is kept or dropped as a whole
        assert sorted(per_crop[:, 0].tolist()) == [0.0] * (per_crop.shape[0] - kept) + [2.0] * kept


def test_packed_mask_stochastic_depth_drops_whole_crops():
    layout = PackedLayout(((8, 3), (16, 2)), "sdpa_split")
    torch.manual_seed(0)
    out = drop_path_packed(torch.ones(1, layout.total_tokens, 4), 0.5, layout)
    for crops in layout.split(out):
        per_crop = crops[..., 0]
        assert (crops == per_crop[..., None]).all() and (per_crop == per_crop[:, :1]).all()
        assert set(per_crop[:, 0].tolist()) == {0.0, 2.0}


def test_config_key_reaches_the_student_only_and_bad_values_are_refused():
    cfg = load_config(None, TINY_OVERRIDES + ["train.packed_attention=sdpa_split"])
    student, teacher, _ = build_model_from_cfg(cfg)
    assert student.packed_attention == "sdpa_split" and teacher.packed_attention == "per_resolution"
    assert build_model_from_cfg(load_config(None, TINY_OVERRIDES))[0].packed_attention == "auto"
    with pytest.raises(ValueError, match="train.packed_attention"):
        build_model_from_cfg(load_config(None, TINY_OVERRIDES + ["train.packed_attention=fast"]))


@pytest.mark.parametrize(
    "extra",
    [
        ("train.stochastic_depth=mask", "student.drop_path_rate=0.0"),
        ("train.activation_checkpointing=1", "student.drop_path_rate=0.0"),
    ],
)
def test_an_ssl_training_step_is_unchanged_by_packing(extra):
    results = []
    for mode in ("per_resolution", "packed"):
        cfg = tiny_cfg(f"train.packed_attention={mode}", *extra)
        torch.manual_seed(0)
        model = SSLMetaArch(cfg).train()
        torch.manual_seed(2)
        losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (ref_losses, ref_grads), (losses, grads) = results
    assert losses.keys() == ref_losses.keys()
    for name, value in ref_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_ssl_training_step_with_packed_subset_stochastic_depth_trains():
    cfg = tiny_cfg("train.packed_attention=packed", "train.stochastic_depth=subset", "student.drop_path_rate=0.5")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    losses = model.forward_backward(synthetic_batch(cfg), teacher_temp=0.05)
    assert torch.isfinite(losses["total_loss"])
    grads = [p.grad for p in model.student["backbone"].parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_packed_blocks_under_fsdp2_equal_the_unsharded_model():
    """FSDP2 passes ``packing=`` through its hooks (it rebuilds dataclass arguments) unchanged."""
    import copy

    import torch.distributed as dist

    from dinov2.distributed import free_port
    from dinov2.fsdp import mixed_precision_policy, shard_backbone

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = vit_small(
            patch_size=4, img_size=16, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.3, stochastic_depth="subset"
        )
        plain.set_packed_attention("packed")
        sharded = shard_backbone(copy.deepcopy(plain).train(), mixed_precision_policy("fp32", "fp32"))
        plain.train()
        crops = [torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)]
        outputs = []
        for model in (sharded, plain):
            torch.manual_seed(1)  # the same crops dropped in both
            out = model(crops, masks=[None, None], is_training=True)
            sum(o["x_prenorm"].sum() for o in out).backward()
            outputs.append([o["x_prenorm"].detach() for o in out])
        for a, b in zip(*outputs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        grad = sharded.blocks[0].attn.qkv.weight.grad.full_tensor()
        torch.testing.assert_close(grad, plain.blocks[0].attn.qkv.weight.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
