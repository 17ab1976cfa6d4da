import math
from pathlib import Path

import pytest
import torch

from dinov2.hub import backbones
from dinov2.hub.weights import WeightsError, load_backbone_weights, read_state_dict, save_state_dict
from dinov2.layers import Attention
from dinov2.layers.attention import explicit_attention
from dinov2.models.vision_transformer import make_vit, vit_small

# Key lists of the published checkpoints, kept in the repository (tests/data/README.md).
REFERENCE = Path(__file__).resolve().parent / "data"


def _reference_keys(name):
    path = REFERENCE / name
    rows = [line.split("\t") for line in path.read_text().strip().splitlines()]
    return {key: tuple(int(d) for d in shape.strip("()").split(",") if d.strip()) for key, shape in rows}


def _tiny(**kwargs):
    options = dict(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2, init_values=1e-5)
    options.update(kwargs)
    return make_vit("vit_small", **options).eval()


def _expected_param_count(dim, depth, hidden, swiglu, registers=0, grid=37, patch=14):
    """Parameter count of the released architectures, from the shapes of each layer."""
    ffn = (dim * 2 * hidden + 2 * hidden + hidden * dim + dim) if swiglu else (2 * dim * hidden + hidden + dim)
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + dim + 2 * dim + ffn + dim
    top = dim * (1 + registers) + (grid * grid + 1) * dim + dim + (3 * patch * patch * dim + dim) + 2 * dim
    return top + depth * block


@pytest.mark.parametrize(
    "name, tensors, dim, depth, hidden, swiglu, registers",
    [
        ("dinov2_vits14", 175, 384, 12, 1536, False, 0),
        ("dinov2_vitb14", 175, 768, 12, 3072, False, 0),
        ("dinov2_vitl14", 343, 1024, 24, 4096, False, 0),
        ("dinov2_vitg14", 567, 1536, 40, 4096, True, 0),
        ("dinov2_vits14_reg", 176, 384, 12, 1536, False, 4),
        ("dinov2_vitb14_reg", 176, 768, 12, 3072, False, 4),
        ("dinov2_vitl14_reg", 344, 1024, 24, 4096, False, 4),
        ("dinov2_vitg14_reg", 568, 1536, 40, 4096, True, 4),
    ],
)
def test_factories_match_published_architectures(name, tensors, dim, depth, hidden, swiglu, registers):
    with torch.device("meta"):  # shapes only: ViT-g would need 4.5 GB otherwise
        model = backbones.ENTRY_POINTS[name](pretrained=False)
    state = model.state_dict()
    assert len(state) == tensors
    assert sum(v.numel() for v in state.values()) == _expected_param_count(dim, depth, hidden, swiglu, registers)


def test_vits14_keys_and_shapes_equal_the_official_release():
    with torch.device("meta"):
        plain = backbones.dinov2_vits14(pretrained=False).state_dict()
        reg = backbones.dinov2_vits14_reg(pretrained=False).state_dict()
    expected_plain = _reference_keys("dinov2_vits14_keys.tsv")
    expected_reg = _reference_keys("dinov2_vits14_reg4_keys.tsv")
    assert {k: tuple(v.shape) for k, v in plain.items()} == expected_plain
    assert {k: tuple(v.shape) for k, v in reg.items()} == expected_reg
    assert len(plain) == 175 and sum(v.numel() for v in plain.values()) == 22_056_576
    assert len(reg) == 176


def test_official_format_state_dict_round_trips_strictly(tmp_path):
    source = backbones.dinov2_vits14(pretrained=False)
    path = save_state_dict(source.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    loaded = backbones.dinov2_vits14(pretrained_weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # The same through safetensors and through an upstream-style training checkpoint.
    st_path = save_state_dict(source.state_dict(), tmp_path / "backbone.safetensors")
    assert torch.equal(read_state_dict(st_path)["pos_embed"], source.pos_embed.detach())
    nested = {"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}, "iteration": torch.tensor(3)}
    torch.save(nested, tmp_path / "teacher_checkpoint.pth")
    assert torch.equal(read_state_dict(tmp_path / "teacher_checkpoint.pth")["cls_token"], source.cls_token.detach())


def test_corrupted_state_dict_names_every_bad_key(tmp_path):
    model = _tiny()
    state = dict(model.state_dict())
    state["blocks.0.attn.qkv.wieght"] = state.pop("blocks.0.attn.qkv.weight")  # renamed
    del state["norm.bias"]  # missing
    state["extra.thing"] = torch.zeros(1)  # unexpected
    state["pos_embed"] = torch.zeros(1, 5, 32)  # wrong shape
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(_tiny(), state)
    message = str(info.value)
    for key in ("blocks.0.attn.qkv.weight", "norm.bias", "blocks.0.attn.qkv.wieght", "extra.thing", "pos_embed"):
        assert key in message


def test_hub_entry_point_without_weights_explains_why():
    with pytest.raises(ValueError, match="cannot be downloaded.*pretrained_weights=PATH"):
        backbones.dinov2_vits14()


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"config": {"a": 1}, "notes": "x"}, path)
    with pytest.raises(WeightsError, match="bad.pth"):
        read_state_dict(path)


def test_sdpa_attention_equals_plain_softmax_reference():
    attention = Attention(dim=48, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 11, 48)
    q, k, v = attention.qkv(x).reshape(3, 11, 3, 4, 12).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(12), dim=-1)
    reference = attention.proj((weights @ v).transpose(1, 2).reshape(3, 11, 48))
    torch.testing.assert_close(attention(x), reference, atol=1e-5, rtol=1e-5)


def test_explicit_attention_matches_sdpa_values_and_gradients():
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    explicit = explicit_attention(q, k, v)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(explicit, fused)
    upstream = torch.randn_like(explicit)
    grads_explicit = torch.autograd.grad(explicit, (q, k, v), upstream)
    grads_fused = torch.autograd.grad(fused, (q, k, v), upstream)
    for mine, reference in zip(grads_explicit, grads_fused):
        torch.testing.assert_close(mine, reference)


def test_bf16_cpu_attention_takes_the_explicit_path_and_stays_close_to_fp32(monkeypatch):
    attention = Attention(dim=48, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 11, 48)
    reference = attention(x)
    calls = []
    monkeypatch.setattr(
        "dinov2.layers.attention.explicit_attention",
        lambda *args, **kwargs: calls.append(args[0].dtype) or explicit_attention(*args, **kwargs),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(x)
    assert calls == [torch.bfloat16]
    torch.testing.assert_close(low.float(), reference, atol=0.05, rtol=0.05)
    attention(x)  # fp32 stays on scaled_dot_product_attention
    assert calls == [torch.bfloat16]


def test_list_forward_of_global_and_local_crops_equals_separate_forwards():
    model = _tiny(num_register_tokens=2)
    global_crops, local_crops = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)
    masks = torch.rand(4, 16) > 0.5
    together = model.forward_features([global_crops, local_crops], [masks, None])
    apart = [model.forward_features(global_crops, masks), model.forward_features(local_crops)]
    for joint, single in zip(together, apart):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(joint[key], single[key], atol=1e-6, rtol=1e-6)
    assert together[0]["x_norm_regtokens"].shape == (4, 2, 32)
    assert together[1]["x_norm_patchtokens"].shape == (6, 4, 32)


def test_masked_patches_are_replaced_by_the_mask_token():
    model = _tiny()
    with torch.no_grad():
        model.mask_token.fill_(3.0)
    images = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 5] = True
    tokens = model.prepare_tokens_with_masks(images, masks)
    unmasked = model.prepare_tokens_with_masks(images)
    pos = model.pos_embed[0, 1 + 5]
    torch.testing.assert_close(tokens[0, 1 + 5], model.mask_token[0] + pos)
    torch.testing.assert_close(tokens[1], unmasked[1])


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True)])
def test_position_embedding_interpolates_to_non_square_sizes(offset, antialias):
    model = _tiny(interpolate_offset=offset, interpolate_antialias=antialias)
    out = model.forward_features(torch.randn(2, 3, 24, 12))
    assert out["x_norm_patchtokens"].shape == (2, 6 * 3, 32)
    # At the training resolution the stored embedding is used as is.
    tokens = model.prepare_tokens_with_masks(torch.zeros(1, 3, 16, 16))
    torch.testing.assert_close(tokens[0, 1:] - model.patch_embed(torch.zeros(1, 3, 16, 16))[0], model.pos_embed[0, 1:])


def test_input_size_that_is_not_a_multiple_of_the_patch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        _tiny()(torch.randn(1, 3, 18, 16))


def test_intermediate_layers_shapes_and_last_layer_matches_forward_features():
    model = _tiny(num_register_tokens=1)
    images = torch.randn(2, 3, 16, 8)
    last = model.get_intermediate_layers(images, n=1)[0]
    torch.testing.assert_close(last, model.forward_features(images)["x_norm_patchtokens"])
    both = model.get_intermediate_layers(images, n=2, reshape=True, return_class_token=True)
    assert len(both) == 2
    patches, cls = both[1]
    assert patches.shape == (2, 32, 4, 2) and cls.shape == (2, 32)
    by_index = model.get_intermediate_layers(images, n=[0], norm=False)
    assert by_index[0].shape == (2, 8, 32)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(images, n=[5])


def test_swiglu_ffn_hidden_width_of_vitg():
    with torch.device("meta"):
        model = backbones.dinov2_vitg14(pretrained=False)
    assert model.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert model.blocks[0].mlp.w3.weight.shape == (1536, 4096)


def test_forward_returns_cls_features_and_gradients_flow():
    model = vit_small(patch_size=4, img_size=16, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.5)
    model.train()
    out = model(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 32)
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
