"""Backbones and classifiers in transformers, timm and ONNX Runtime (dinov2.hub.interop,
dinov2.classify.onnx_export / onnx_predict). Every model is built from a config with random
weights: nothing is downloaded."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from classify_helpers import random_image, save_tiny_classifier, tiny_classifier

from dinov2.hub import interop, interop_onnx
from dinov2.hub.sources import build_backbone_from_spec, vit_kwargs_of
from dinov2.hub.weights import save_state_dict
from dinov2.models.vision_transformer import DinoVisionTransformer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=1.0)
VARIANTS = {
    "plain": {},
    "registers": dict(num_register_tokens=2, interpolate_antialias=True, interpolate_offset=0.0),
    "swiglu": dict(ffn_layer="swiglufused"),
}


def _perturbed(model_class, options, seed, parts):
    torch.manual_seed(seed)
    model = model_class(**options).eval()
    with torch.no_grad():
        # Far from the initial values, so that a LayerScale, token, position or bias left behind shows.
        for name, param in model.named_parameters():
            if any(part in name for part in parts):
                param.normal_(0.0, 0.5)
    return model


def tiny_vit(seed=0, **options) -> DinoVisionTransformer:
    parts = ("ls1", "ls2", "cls_token", "register_tokens", "pos_embed", "mask_token")
    return _perturbed(DinoVisionTransformer, {**TINY, **options}, seed, parts)


def features(model, images):
    with torch.no_grad():
        out = model.forward_features(images)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def hf_features(hf_model, images, registers):
    with torch.no_grad():
        tokens = hf_model(pixel_values=images).last_hidden_state
    return tokens[:, 0], tokens[:, 1 + registers :]


def assert_close(ours, theirs, atol):
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= atol


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_folder_loads_with_the_same_features(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_vit(**VARIANTS[variant])
    interop.export_transformers(model, tmp_path / "hf")
    hf_model, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    expected = "Dinov2WithRegistersModel" if model.num_register_tokens else "Dinov2Model"
    assert type(hf_model).__name__ == expected
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    images = torch.randn(2, 3, 56, 56)
    assert_close(features(model, images), hf_features(hf_model.eval(), images, model.num_register_tokens), 1e-5)
    if variant == "registers":
        # Same resizing rule (bicubic to the grid, antialiased): equal at any size.
        images = torch.randn(2, 3, 42, 70)
        assert_close(features(model, images), hf_features(hf_model, images, 2), 1e-5)


def test_transformers_folder_vits14_width_at_518px(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # The published ViT-S/14 shape at its native 518 px, cut to one block to stay quick.
    model = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=1, num_heads=6, init_values=1.0)
    model.eval()
    interop.export_transformers(model, tmp_path / "hf")
    hf_model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(1, 3, 518, 518)
    assert_close(features(model, images), hf_features(hf_model, images, 0), 1e-5)


def test_transformers_folder_reads_back_in_both_key_layouts(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    model = tiny_vit(**VARIANTS["swiglu"])
    interop.export_transformers(model, tmp_path / "hf")
    back = interop.load_transformers_backbone(tmp_path / "hf")
    assert set(back.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # What a classifier file stores for it (a build spec) rebuilds the same architecture.
    rebuilt = build_backbone_from_spec({"kind": "vit", "kwargs": vit_kwargs_of(back)})
    rebuilt.load_state_dict(back.state_dict(), strict=True)
    # The layout of the installed transformers' own state dict (q_proj/gate_proj in 5.x).
    hf_model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(native / "model.safetensors"))
    again = interop.load_transformers_backbone(native)
    images = torch.randn(2, 3, 42, 70)  # non-square: the reader resizes positions as transformers does
    assert_close(features(again, images), hf_features(hf_model, images, 0), 1e-5)


def test_transformers_errors_name_the_problem(tmp_path):
    with pytest.raises(interop.InteropError, match="biases"):
        interop.transformers_config(DinoVisionTransformer(**TINY, proj_bias=False))
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(interop.InteropError, match="model_type 'vit'"):
        interop.load_transformers_backbone(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        interop.load_transformers_backbone(tmp_path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_state_dict_loads_strictly_with_the_same_features(variant, tmp_path):
    timm = pytest.importorskip("timm")
    model = tiny_vit(**VARIANTS[variant])
    name, args = interop.timm_model_args(model)
    timm_model = timm.create_model(name, pretrained=False, num_classes=0, **args).eval()
    timm_model.load_state_dict(interop.timm_state_dict(model), strict=True)
    interop.export_timm(model, tmp_path / "timm")
    from_folder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 3, 56, 56)
    registers = model.num_register_tokens
    for candidate in (timm_model, from_folder):
        with torch.no_grad():
            tokens = candidate.forward_features(images)
        assert_close(features(model, images), (tokens[:, 0], tokens[:, 1 + registers :]), 1e-5)


def test_onnx_backbone_matches_pytorch_with_a_dynamic_batch(tmp_path, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_vit(**VARIANTS["registers"])
    path = interop_onnx.export_onnx(model, tmp_path / "backbone.onnx", image_size=(42, 70))  # non-square, not native
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["cls_token", "patch_tokens"]
    for batch in (1, 3):
        images = torch.randn(batch, 3, 42, 70)
        cls, patches = session.run(None, {"images": images.numpy()})
        assert_close(features(model, images), (torch.from_numpy(cls), torch.from_numpy(patches)), 1e-4)
    report = interop_onnx.compare_onnx(model, path, batch_size=2, repeats=1)
    assert report["max_abs_diff"] <= 1e-4 and report["onnx_ms_per_image"] > 0
    # Weights too large for one protobuf (ViT-g) go to a data file beside the graph.
    monkeypatch.setattr(interop_onnx, "_ONNX_INLINE_LIMIT", 0)
    big = interop_onnx.export_onnx(model, tmp_path / "big" / "backbone.onnx")
    assert sorted(p.name for p in big.parent.iterdir()) == ["backbone.onnx", "backbone.onnx.data"]
    assert interop_onnx.compare_onnx(model, big, batch_size=1, repeats=1)["max_abs_diff"] <= 1e-4


def test_a_conv_stem_backbone_exports_to_onnx_only(tmp_path):
    model = tiny_vit(img_size=32, patch_size=4, patch_embed="conv_stem")
    for export in (interop.transformers_config, interop.timm_model_args):
        with pytest.raises(interop.InteropError, match=r"patch_embed='conv_stem' \(export it to ONNX instead\)"):
            export(model)
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = interop_onnx.export_onnx(model, tmp_path / "backbone.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 32, 32)
    cls, patches = session.run(None, {"images": images.numpy()})
    assert_close(features(model, images), (torch.from_numpy(cls), torch.from_numpy(patches)), 1e-4)


def test_export_script_writes_each_format(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model = tiny_vit()
    weights = save_state_dict(model.state_dict(), tmp_path / "backbone.pth")
    script = REPO / "scripts" / "export_backbone.py"
    command = [sys.executable, str(script), str(weights), "--format", "hf", "--output", str(tmp_path / "hf")]
    run = subprocess.run(command + ["--num-heads", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_attention_heads"]) == ("dinov2", 64, 2)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = processor(images=random_image(0, size=(90, 70)), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 56, 56)  # the model's own size
    back = interop.load_transformers_backbone(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # The other formats through the same entry, in-process.
    pytest.importorskip("timm")
    assert interop.main([str(weights), "--format", "timm", "--output", str(tmp_path / "timm"), "--num-heads", "2"]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2" and config["model_args"]["embed_dim"] == 64
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    args = [str(weights), "--format", "onnx", "--output", str(tmp_path / "b.onnx"), "--num-heads", "2"]
    assert interop.main(args + ["--image-size", "28", "42", "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["height"], report["width"]) == (28, 42) and report["max_abs_diff"] <= 1e-4


def test_classifier_onnx_predicts_the_same_probabilities(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dinov2.classify.onnx_export import export_classifier_onnx
    from dinov2.classify.predict import predict

    classifier = save_tiny_classifier(tmp_path / "classifier.pth")
    onnx_path = export_classifier_onnx(classifier, tmp_path / "deploy" / "classifier.onnx")
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(24, 20), (40, 31), (20, 20), (57, 90)]):
        random_image(i, size=size).save(images / f"{i}.png")
    for multi_crop in (False, True):
        ours = predict(images, classifier, device="cpu", multi_crop=multi_crop)
        served = predict(images, onnx_path, multi_crop=multi_crop)
        assert list(served.columns) == list(ours.columns)
        assert (served.filter(like="_label") == ours.filter(like="_label")).all().all()
        probs = ours.filter(like="_prob_").to_numpy(float)
        # The same torchvision views through the ONNX graph: only float rounding differs.
        assert np.abs(served.filter(like="_prob_").to_numpy(float) - probs).max() <= 1e-5
    # The predictor file runs on its own, with PyTorch made unimportable (Pillow preprocessing).
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['onnx_predict', '--model', {str(onnx_path)!r}, '--images', {str(images)!r}]; "
        f"runpy.run_path({str(REPO / 'dinov2' / 'classify' / 'onnx_predict.py')!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    records = json.loads(run.stdout)
    expected = predict(images, classifier, device="cpu", output_format="json")
    assert [r["image"] for r in records] == [r["image"] for r in expected]
    for got, want in zip(records, expected):
        for task, prediction in want["predictions"].items():
            assert got["predictions"][task]["label"] == prediction["label"]
            for name, value in prediction["probabilities"].items():
                assert abs(got["predictions"][task]["probabilities"][name] - value) <= 1e-4


def test_classifier_with_lora_adapters_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("peft")
    from dinov2.classify.checkpoint import save_classifier
    from dinov2.classify.lora import add_lora, lora_settings
    from dinov2.classify.onnx_export import export_classifier_onnx
    from dinov2.classify.predict import predict

    model, config = tiny_classifier()
    config.lora = lora_settings(r=2)
    add_lora(model.backbone, config.lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make the adapters count
                param.normal_(0.0, 0.5)
    classifier = save_classifier(tmp_path / "lora.pth", model, config)
    onnx_path = export_classifier_onnx(classifier, tmp_path / "lora.onnx")
    images = [random_image(i, size=(30, 26)) for i in range(3)]
    ours = predict(images, classifier, device="cpu").filter(like="_prob_").to_numpy(float)
    served = predict(images, onnx_path).filter(like="_prob_").to_numpy(float)
    assert np.abs(served - ours).max() <= 1e-5


def test_transformers_folder_is_a_backbone_source_for_evaluation_and_warm_start(tmp_path):
    """The reverse direction without transformers installed: ``load_backbone`` (classifiers'
    ``backbone.source``), ``--pretrained-weights`` and ``student.pretrained_weights`` all take a
    transformers folder, with its preprocessing statistics."""
    from dinov2.eval.setup import build_model_for_eval
    from dinov2.hub.sources import load_backbone
    from dinov2.train.warm_start import load_warm_start_weights

    model = tiny_vit(**VARIANTS["registers"])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    interop.export_transformers(model, tmp_path / "hf", mean=mean, std=std)
    images = torch.randn(2, 3, 56, 56)
    expected = features(model, images)

    loaded, spec = load_backbone(str(tmp_path / "hf"))
    assert spec["kind"] == "vit" and all(torch.equal(a, b) for a, b in zip(features(loaded, images), expected))

    evaluated = build_model_for_eval(None, tmp_path / "hf", image_size=56)
    assert (evaluated.mean, evaluated.std, evaluated.config_path) == (mean, std, None)
    assert all(torch.equal(a, b) for a, b in zip(features(evaluated.model, images), expected))

    student = DinoVisionTransformer(**{**TINY, **VARIANTS["registers"]})
    load_warm_start_weights(student, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(features(student.eval(), images), expected))


# ------------------------------------------------------------------------------ DINOv3 backbones
TINY_V3 = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_storage_tokens=2)
VARIANTS_V3 = {
    "mlp": {},
    "swiglu": dict(ffn_layer="swiglu", mlp_ratio=6.0),
    # No storage tokens, no LayerScale, no qkv bias.
    "bare": dict(num_storage_tokens=0, init_values=None, qkv_bias=False),
}
# A key bias that is not masked: transformers has one (key_bias), timm has not.
KEY_BIAS_V3 = dict(mask_k_bias=False)


def tiny_vit_v3(seed=0, **options):
    from dinov2.models.vision_transformer_v3 import DinoV3VisionTransformer

    parts = ("ls1", "ls2", "cls_token", "storage_tokens", "qkv.bias", "mask_token")
    return _perturbed(DinoV3VisionTransformer, {**TINY_V3, **options}, seed, parts)


def all_tokens_v3(model, images):
    """[CLS, storage tokens, patches] after the final norm, as transformers' last_hidden_state."""
    with torch.no_grad():
        out = model.forward_features(images)
    return torch.cat((out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]), dim=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS_V3) + ["key_bias"])
def test_dinov3_transformers_folder_loads_with_the_same_features_and_reads_back(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("this transformers has no DINOv3ViTModel")
    from safetensors.torch import save_file

    from dinov2.hub.sources import load_backbone

    model = tiny_vit_v3(**VARIANTS_V3.get(variant, KEY_BIAS_V3))
    interop.export_transformers(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    hf_model, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf_model).__name__ == "DINOv3ViTModel"
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    images = torch.randn(2, 3, 48, 80)  # non-square and not the nominal size: RoPE takes any
    expected = all_tokens_v3(model, images)
    with torch.no_grad():
        theirs = hf_model.eval()(pixel_values=images).last_hidden_state
    assert theirs.shape == expected.shape and (theirs - expected).abs().max().item() <= 1e-5
    # Back as a backbone (evaluation, classifiers, warm start and distillation read it through
    # load_backbone), from our published-name layout and from transformers 5.x's own state dict.
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(native / "model.safetensors"))
    for folder in (tmp_path / "hf", native):
        back, spec = load_backbone(str(folder))
        assert spec["kind"] == "dinov3"
        assert torch.equal(all_tokens_v3(back.eval(), images), expected)
    if variant == "swiglu":
        from dinov2.eval.setup import build_model_for_eval
        from dinov2.train.warm_start import load_warm_start_weights

        evaluated = build_model_for_eval(None, tmp_path / "hf", image_size=64)
        assert torch.equal(all_tokens_v3(evaluated.model, images), expected)
        student = type(model)(**{**TINY_V3, **VARIANTS_V3[variant]})
        load_warm_start_weights(student, tmp_path / "hf")
        assert torch.equal(all_tokens_v3(student.eval(), images), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS_V3))
def test_dinov3_timm_state_dict_loads_strictly_with_the_same_features(variant, tmp_path):
    timm = pytest.importorskip("timm")
    model = tiny_vit_v3(**VARIANTS_V3[variant])
    name, args = interop.timm_model_args(model)
    assert name.endswith("_dinov3_qkvb" if variant != "bare" else "_dinov3")
    timm_model = timm.create_model(name, pretrained=False, num_classes=0, **args).eval()
    timm_model.load_state_dict(interop.timm_state_dict(model), strict=True)
    interop.export_timm(model, tmp_path / "timm")
    from_folder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 3, 48, 80)
    expected = all_tokens_v3(model, images)
    for candidate in (timm_model, from_folder):
        with torch.no_grad():
            tokens = candidate.forward_features(images)
        assert tokens.shape == expected.shape and (tokens - expected).abs().max().item() <= 1e-5


def test_dinov3_onnx_backbone_matches_pytorch_with_a_dynamic_batch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_vit_v3(**VARIANTS_V3["swiglu"])
    path = interop_onnx.export_onnx(model, tmp_path / "backbone.onnx", image_size=(32, 48))  # RoPE tables for 2x3
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 48)
        cls, patches = session.run(None, {"images": images.numpy()})
        assert_close(features(model, images), (torch.from_numpy(cls), torch.from_numpy(patches)), 1e-4)
    report = interop_onnx.compare_onnx(model, path, batch_size=2, repeats=1)
    assert report["max_abs_diff"] <= 1e-4 and (report["height"], report["width"]) == (32, 48)


def test_dinov3_exports_refuse_what_the_targets_cannot_express(tmp_path):
    refused = {
        "untie_cls_and_patch_norms": dict(untie_cls_and_patch_norms=True),
        "rope_normalize_coords": dict(rope_normalize_coords="min"),
        "rope_min_period": dict(rope_base=None, rope_min_period=0.5, rope_max_period=50.0),
    }
    for option, settings in refused.items():
        model = tiny_vit_v3(**settings)
        for fmt in ("hf", "timm"):
            with pytest.raises(interop.InteropError, match=option):
                interop.export_backbone(model, tmp_path / option / fmt, fmt)
            assert not (tmp_path / option / fmt).exists()  # refused before anything is written
    # A periods buffer of no rope_base (e.g. edited or trained otherwise) would be recomputed wrongly.
    model = tiny_vit_v3()
    with torch.no_grad():
        model.rope_embed.periods.mul_(1.5)
    with pytest.raises(interop.InteropError, match="rope_embed.periods"):
        interop.transformers_config(model)
    with pytest.raises(interop.InteropError, match="norm_eps"):
        interop.timm_model_args(tiny_vit_v3(norm_eps=1e-6))
    with pytest.raises(interop.InteropError, match="mask_k_bias"):
        interop.timm_model_args(tiny_vit_v3(**KEY_BIAS_V3))
    # The training-only local CLS norm is left out: inference never uses it.
    model = tiny_vit_v3(untie_global_and_local_cls_norm=True)
    assert not any("local_cls_norm" in key for key in interop.transformers_state_dict(model))


def test_dinov3_transformers_folder_without_a_bias_it_declares_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from dinov2.hub.sources import load_backbone

    interop.export_transformers(tiny_vit_v3(), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    (missing,) = [key for key in state if key.endswith("layer.0.attention.q_proj.bias")]
    del state[missing]
    save_file(state, str(weights))
    with pytest.raises(interop.InteropError, match=r"block 0 lacks .*q_proj\.bias.*query_bias"):
        load_backbone(str(tmp_path / "hf"))
