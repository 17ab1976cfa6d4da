"""DINOv3 backbones: the released key layout, loading official-format files, RoPE, the published
shapes, and a DINOv3-style student through training, warm start and evaluation."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import make_image_folder, tiny_overrides

from dinov2.classify.heads import HeadSpec, MultiHeadClassifier, pooled_features
from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval import knn
from dinov2.eval.features import extract_features
from dinov2.eval.knn import knn_classify
from dinov2.eval.pca import patch_features, pca_rgb_maps
from dinov2.eval.setup import build_model_for_eval
from dinov2.hub import ENTRY_POINTS, build_backbone_from_spec, dinov3_vits16, load_backbone
from dinov2.hub.weights import WeightsError, save_state_dict
from dinov2.layers.rope import RopePositionEmbedding, apply_rope_to_qkv, rope_periods
from dinov2.models import DinoV3VisionTransformer, build_backbone, build_model_from_cfg
from dinov2.models.vision_transformer import vit_small
from dinov2.models.vision_transformer_v3 import DINOV3_RELEASES, make_dinov3_release, make_vit_v3
from dinov2.optim.param_groups import param_multipliers
from dinov2.train.train import main
from dinov2.train.warm_start import load_warm_start_weights
from dinov2.utils.config import load_config, load_saved_config

REPO = Path(__file__).resolve().parents[1]
KEYS_FILE = REPO / "tests" / "data" / "dinov3_vits16_keys.tsv"
DINOV2_OUTPUT_KEYS = {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
TINY_V3 = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_storage_tokens=2)


def released_keys():
    rows = [line.split("\t") for line in KEYS_FILE.read_text().splitlines() if line.strip()]
    return [(key, tuple(ast.literal_eval(shape))) for key, shape in rows]


@pytest.fixture(scope="module")
def vits16():
    torch.manual_seed(0)
    return make_dinov3_release("dinov3_vits16").eval()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, vits16):
    """A file with exactly the released ViT-S/16 keys and shapes, random values (as a download would be)."""
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in released_keys()}
    reference = vits16.state_dict()  # the buffers hold what the release's hold
    state.update({k: v for k, v in reference.items() if k.endswith(("periods", "bias_mask"))})
    path = tmp_path_factory.mktemp("dinov3") / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(state, path)
    return path, state


def test_vits16_factory_has_exactly_the_released_keys_and_shapes(vits16):
    model = vits16
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == released_keys()
    # The buffers that make the layout DINOv3's: RoPE periods and the key-bias mask.
    assert torch.allclose(model.rope_embed.periods, 100.0 ** (torch.arange(16) / 16.0))
    mask = model.blocks[0].attn.qkv.bias_mask
    assert mask[:384].eq(1).all() and mask[384:768].eq(0).all() and mask[768:].eq(1).all()


def test_official_file_loads_strictly_through_the_hub_entry_and_the_source_loader(official_file):
    path, state = official_file
    by_entry = dinov3_vits16(weights=path)
    by_hub = torch.hub.load(str(REPO), "dinov3_vits16", source="local", pretrained_weights=path)
    by_source, spec = load_backbone(str(path))
    by_name, _ = load_backbone("hub:dinov3_vits16", weights=path)
    for model in (by_entry, by_hub, by_source, by_name):
        assert isinstance(model, DinoV3VisionTransformer)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # The build spec rebuilds the same architecture without the file (classifier files store it).
    assert spec["kind"] == "dinov3"
    assert spec["kwargs"]["num_heads"] == 6 and spec["kwargs"]["rope_base"] == 100.0
    rebuilt = build_backbone_from_spec(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    with pytest.raises(ValueError, match="weights=PATH"):
        dinov3_vits16()  # nothing is downloaded


def test_wrong_files_get_one_error_naming_every_bad_key(tmp_path, official_file):
    path, state = official_file
    dinov2_file = tmp_path / "dinov2_vits14_reg4.pth"
    with torch.device("meta"):  # the layout is the point, not the values: allocate without initialising
        dinov2_model = vit_small(patch_size=14, num_register_tokens=4, img_size=518, init_values=1.0)
    save_state_dict(dinov2_model.to_empty(device="cpu").state_dict(), dinov2_file)
    with pytest.raises(WeightsError) as error:
        dinov3_vits16(weights=dinov2_file)
    message = str(error.value)
    assert str(dinov2_file) in message and "DINOv2-format file" in message
    assert "rope_embed.periods" in message and "storage_tokens" in message  # missing
    assert "pos_embed" in message and "register_tokens" in message  # unexpected
    assert "patch_embed.proj.weight: file (384, 3, 14, 14) vs model (384, 3, 16, 16)" in message
    # A damaged DINOv3 file through the source loader (evaluation, classifiers).
    damaged = dict(state)
    del damaged["blocks.3.attn.qkv.bias_mask"]
    damaged["blocks.0.ls1.gamma"] = torch.zeros(7)
    bad_file = tmp_path / "damaged.pth"
    torch.save(damaged, bad_file)
    with pytest.raises(WeightsError) as error:
        dinov3_vits16(weights=bad_file)
    message = str(error.value)
    assert "missing keys (1): blocks.3.attn.qkv.bias_mask" in message
    assert "blocks.0.ls1.gamma: file (7,) vs model (384,)" in message


def test_rope_scores_depend_only_on_the_offset_between_positions():
    torch.manual_seed(0)
    head_dim, side = 16, 5
    rope = RopePositionEmbedding(embed_dim=2 * head_dim, num_heads=2).eval()
    sin, cos = rope(side, side)
    assert sin.shape == cos.shape == (side * side, head_dim)
    # The same query and key at every position (one head, no prefix tokens), rotated by position.
    q, k, v = torch.randn(3, head_dim)
    qkv = torch.stack((q, k, v)).reshape(1, 1, 3, 1, head_dim).expand(1, side * side, 3, 1, head_dim)
    rotated = apply_rope_to_qkv(qkv, (sin, cos))[0, :, :, 0]
    scores = (rotated[:, 0] @ rotated[:, 1].T).reshape(side, side, side, side)  # (row, col, row', col')
    assert torch.equal(rotated[:, 2], qkv[0, :, 2, 0])  # values are not rotated
    for dy, dx in [(0, 0), (1, 0), (0, 2), (2, -1), (-3, 3)]:
        same_offset = [
            scores[r, c, r + dy, c + dx]
            for r in range(side)
            for c in range(side)
            if 0 <= r + dy < side and 0 <= c + dx < side
        ]
        assert torch.allclose(torch.stack(same_offset), same_offset[0], atol=1e-5), (dy, dx)
    assert not torch.allclose(scores[0, 0, 0, 1], scores[0, 0, 1, 0])  # rows and columns rotate differently
    # The periods buffer: base ** (4 j / head_dim), or log-spaced between two given periods.
    assert torch.allclose(rope.periods, torch.tensor([100.0 ** (4 * j / head_dim) for j in range(head_dim // 4)]))
    spaced = rope_periods(head_dim, base=None, min_period=1.0, max_period=8.0)
    assert torch.allclose(spaced, torch.tensor([1.0, 2.0, 4.0, 8.0]))


def test_rope_prefix_tokens_normalisation_and_training_augmentation():
    rope = RopePositionEmbedding(embed_dim=32, num_heads=2, normalize_coords="max", rescale_coords=2.0)
    # "max" keeps the aspect ratio: a 2 x 4 grid spans half the range along its short side.
    coords = rope.eval().coordinates(2, 4)
    assert torch.allclose(coords[:, 0].unique(), torch.tensor([-0.75, -0.25])) and coords[:, 1].max() == 0.75
    assert torch.equal(rope(2, 4)[0], rope(2, 4)[0])  # eval: deterministic
    rope.train()
    torch.manual_seed(1)
    drawn = rope.coordinates(2, 4)
    ratio = drawn / coords
    assert torch.allclose(ratio, ratio[0, 0]) and 0.5 <= ratio[0, 0] <= 2.0 and ratio[0, 0] != 1.0
    # CLS and storage tokens pass through unrotated.
    qkv = torch.randn(2, 3 + 8, 3, 2, 16)
    out = apply_rope_to_qkv(qkv, rope.eval()(2, 4))
    assert torch.equal(out[:, :3], qkv[:, :3]) and not torch.allclose(out[:, 3:, :2], qkv[:, 3:, :2])
    with pytest.raises(ValueError, match="do not fit"):
        apply_rope_to_qkv(torch.randn(1, 4, 3, 2, 16), rope(2, 4))


def test_forward_outputs_at_224_px_and_a_non_square_size(vits16):
    torch.manual_seed(0)
    model = vits16
    out = model.forward_features(torch.randn(2, 3, 224, 224))
    assert DINOV2_OUTPUT_KEYS <= set(out)
    assert out["x_norm_clstoken"].shape == (2, 384) and out["x_norm_patchtokens"].shape == (2, 196, 384)
    assert out["x_norm_regtokens"].shape == out["x_storage_tokens"].shape == (2, 4, 384)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 196, 384)
    images = torch.randn(1, 3, 160, 96)
    out = model.forward_features(images)
    assert out["x_norm_patchtokens"].shape == (1, 10 * 6, 384)
    layers = model.get_intermediate_layers(images, n=2, reshape=True, return_class_token=True)
    assert [tuple(p.shape) for p, _ in layers] == [(1, 384, 10, 6)] * 2
    assert torch.allclose(layers[-1][1], out["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(model(images), out["x_norm_clstoken"], atol=1e-5)


def test_matches_the_transformers_implementation_of_dinov3():
    """Same weights, same outputs as transformers' independent DINOv3ViTModel (SwiGLU and MLP shapes)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("this transformers has no DINOv3ViTModel")
    for ffn_layer, mlp_ratio in (("mlp", 4.0), ("swiglu", 6.0)):
        torch.manual_seed(0)
        ours = make_vit_v3("vit_small", **TINY_V3, ffn_layer=ffn_layer, mlp_ratio=mlp_ratio, init_values=0.5).eval()
        block = ours.blocks[0]
        hidden = block.mlp.fc1.out_features if ffn_layer == "mlp" else block.mlp.w1.out_features
        config = transformers.DINOv3ViTConfig(
            hidden_size=32,
            intermediate_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=4,
            image_size=16,
            num_register_tokens=2,
            layer_norm_eps=1e-5,
            rope_theta=100.0,
            use_gated_mlp=ffn_layer != "mlp",
            hidden_act="gelu" if ffn_layer == "mlp" else "silu",
            key_bias=False,
        )
        theirs = transformers.DINOv3ViTModel(config).eval()
        theirs.load_state_dict(_to_transformers(ours.state_dict(), ffn_layer))
        images = torch.randn(2, 3, 16, 24)
        expected = theirs(pixel_values=images).last_hidden_state
        out = ours.forward_features(images)
        got = torch.cat((out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]), dim=1)
        assert torch.allclose(got, expected, atol=1e-5), ffn_layer


def _to_transformers(state, ffn_layer):
    renamed = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.register_tokens": state["storage_tokens"],
        "embeddings.mask_token": state["mask_token"][None],
        "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    mlp = (
        {"fc1": "up_proj", "fc2": "down_proj"}
        if ffn_layer == "mlp"
        else {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    )
    for i in range(2):
        src, dst = f"blocks.{i}.", f"model.layer.{i}."
        q, k, v = state[src + "attn.qkv.weight"].chunk(3)
        qb, _, vb = state[src + "attn.qkv.bias"].chunk(3)  # the key bias is masked out
        renamed.update(
            {
                dst + "attention.q_proj.weight": q,
                dst + "attention.q_proj.bias": qb,
                dst + "attention.k_proj.weight": k,
                dst + "attention.v_proj.weight": v,
                dst + "attention.v_proj.bias": vb,
                dst + "attention.o_proj.weight": state[src + "attn.proj.weight"],
                dst + "attention.o_proj.bias": state[src + "attn.proj.bias"],
                dst + "layer_scale1.lambda1": state[src + "ls1.gamma"],
                dst + "layer_scale2.lambda1": state[src + "ls2.gamma"],
            }
        )
        for norm in ("norm1", "norm2"):
            renamed.update({dst + f"{norm}.{p}": state[src + f"{norm}.{p}"] for p in ("weight", "bias")})
        for ours_name, theirs_name in mlp.items():
            for p in ("weight", "bias"):
                renamed[dst + f"mlp.{theirs_name}.{p}"] = state[src + f"mlp.{ours_name}.{p}"]
    return renamed


def test_masked_key_bias_and_untied_norms():
    torch.manual_seed(0)
    model = make_vit_v3("vit_small", **TINY_V3, untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    model.eval()
    images = torch.randn(2, 3, 16, 16)
    before = model.forward_features(images)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias[32:64] += 5.0  # the key third: masked, so no effect
    after = model.forward_features(images)
    assert torch.allclose(before["x_norm_patchtokens"], after["x_norm_patchtokens"], atol=1e-6)
    # cls_norm normalises CLS and storage tokens, norm the patches; local_cls_norm only local crops in training.
    with torch.no_grad():
        model.cls_norm.bias.fill_(3.0)
        model.local_cls_norm.bias.fill_(-3.0)
    out = model.forward_features(images)
    assert torch.allclose(out["x_norm_clstoken"].mean(), torch.tensor(3.0), atol=0.5)
    assert not torch.allclose(out["x_norm_patchtokens"].mean(), torch.tensor(3.0), atol=0.5)
    model.train()
    global_out, local_out = model.forward_features([images, torch.randn(2, 3, 8, 8)], [None, None])
    assert global_out["x_norm_clstoken"].mean() > 2.0 and local_out["x_norm_clstoken"].mean() < -2.0
    assert {"cls_norm.weight", "local_cls_norm.weight"} <= set(model.state_dict())
    # Storage tokens are embeddings (layer 0) for layer-wise lr decay.
    assert param_multipliers("backbone.storage_tokens", 2, 0.5, 1.0)["lr_multiplier"] == 0.5**3


def test_classifier_heads_and_pca_maps_take_a_dinov3_backbone():
    torch.manual_seed(0)
    backbone = make_vit_v3("vit_small", **TINY_V3).eval()
    images = torch.randn(3, 3, 16, 12)
    pooled = pooled_features(backbone, images)
    assert pooled["cls"].shape == pooled["mean"].shape == (3, 32)
    classifier = MultiHeadClassifier(backbone, [HeadSpec("shape", ("a", "b"), pooling="cls+mean")])
    assert classifier(images)["shape"].shape == (3, 2)
    maps = pca_rgb_maps(patch_features(backbone, images))
    assert maps.shape == (3, 4, 3, 3) and 0.0 <= maps.min() and maps.max() <= 1.0


# ViT-S/16 21M, S+ 29M, B 86M, L 300M, H+ 840M, 7B 6,716M parameters (the DINOv3 model card).
PUBLISHED_PARAMETERS = {
    "dinov3_vits16": 21e6,
    "dinov3_vits16plus": 29e6,
    "dinov3_vitb16": 86e6,
    "dinov3_vitl16": 300e6,
    "dinov3_vith16plus": 840e6,
    "dinov3_vit7b16": 6716e6,
}


def test_published_shapes_have_the_published_parameter_counts():
    assert set(PUBLISHED_PARAMETERS) == set(DINOV3_RELEASES) and set(DINOV3_RELEASES) <= set(ENTRY_POINTS)
    for name, published in PUBLISHED_PARAMETERS.items():
        with torch.device("meta"):  # shapes only: the 7B model allocates nothing
            model = make_dinov3_release(name)
        count = sum(p.numel() for p in model.parameters())
        assert math.isclose(count, published, rel_tol=0.03), (name, count)
        keys = model.state_dict()
        assert keys["rope_embed.periods"].shape == (model.embed_dim // model.num_heads // 4,)
        assert keys["storage_tokens"].shape == (1, 4, model.embed_dim)
    assert round(count / 1e6) == 6716  # the 7B figure is published to the million
    assert "local_cls_norm.weight" in keys and "blocks.0.attn.qkv.bias" not in keys and "blocks.0.mlp.w3.weight" in keys


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def v3_overrides(data_root, *extra):
    return tiny_overrides(data_root, "student.generation=dinov3", "student.num_register_tokens=2", *extra)


def test_dinov3_student_trains_exports_warm_starts_and_evaluates(tmp_path, data_root):
    out = tmp_path / "run"
    main(
        [
            "--output-dir",
            str(out),
            *v3_overrides(
                data_root,
                "student.ffn_layer=swiglu",
                "student.layerscale=1.0",  # residual branches at full weight: informative features from 2 steps
                "train.max_iterations=2",
                "checkpointing.period_iterations=2",
                "evaluation.export_period_iterations=2",
            ),
        ]
    )
    cfg = load_saved_config(out)
    student, teacher, _ = build_model_from_cfg(cfg)
    assert isinstance(student, DinoV3VisionTransformer) and student.rope_embed.rescale_coords == 2.0
    export = out / "exports" / "teacher_backbone_latest.pth"
    exported = torch.load(export, weights_only=True)
    assert "rope_embed.periods" in exported and "storage_tokens" in exported and "pos_embed" not in exported
    # The export is a DINOv3 file: the source loader, warm start and evaluation take it as it is.
    from_file, spec = load_backbone(str(export))
    from_dir, _ = load_backbone(str(out))
    assert spec["kind"] == "dinov3" and isinstance(from_dir, DinoV3VisionTransformer)
    for key, value in from_file.state_dict().items():
        assert torch.equal(value, exported[key]) and torch.equal(from_dir.state_dict()[key], value), key
    warm = load_warm_start_weights(build_backbone(cfg.student, 16), export)
    assert torch.equal(warm.storage_tokens, exported["storage_tokens"])
    backbone = build_model_for_eval(None, export, image_size=16)
    assert backbone.description.startswith("DINOv3 file")
    transform = make_classification_eval_transform(crop_size=16, mean=backbone.mean, std=backbone.std)
    queries_root = make_image_folder(tmp_path / "queries", seed=1)
    bank = extract_features(
        backbone.model, make_dataset(f"ImageFolder:root={data_root}:cache=false", transform), num_workers=0
    )
    queries = extract_features(
        backbone.model, make_dataset(f"ImageFolder:root={queries_root}:cache=false", transform), num_workers=0
    )
    assert bank.features.shape == (24, 32)
    scores = knn_classify(queries.features, bank.features, bank.labels, ks=[5], num_classes=3)[5]
    assert (scores.argmax(dim=1) == queries.labels).float().mean() >= 0.9  # three colours: easy
    # The k-NN command takes the file alone (no --config-file, no --arch).
    args = ["--pretrained-weights", str(export), "--image-size", "16", "--output-dir", str(tmp_path / "knn")]
    args += ["--train-dataset", f"ImageFolder:root={data_root}:cache=false", "--nb-knn", "5"]
    args += ["--test-dataset", f"ImageFolder:root={queries_root}:cache=false", "--num-workers", "0"]
    assert knn.main(args) == 0
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert results["runs"][0]["splits"]["test"]["k=5"]["top1"] >= 0.9
    # A DINOv3 file into a DINOv2 student is refused with the key list.
    dinov2_cfg = load_config(None, tiny_overrides(data_root))
    with pytest.raises(WeightsError, match="unexpected keys .*rope_embed.periods"):
        load_warm_start_weights(build_backbone(dinov2_cfg.student, 16), export)


def test_config_rejects_an_unknown_generation(data_root):
    cfg = load_config(None, v3_overrides(data_root, "student.generation=dinov4"))
    with pytest.raises(ValueError, match="student.generation must be one of"):
        build_backbone(cfg.student, 16)
