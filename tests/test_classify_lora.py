import copy
import shutil

import pytest
import torch
from classify_helpers import tiny_classifier

from dinov2.classify.checkpoint import load_classifier, save_classifier
from dinov2.classify.config import load_classify_config
from dinov2.classify.lora import add_lora, has_lora, lora_settings, merge_lora, trainable_fraction
from dinov2.classify.trainer import train_classifier
from dinov2_tools.shapes import make_shapes_dataset


def _with_random_adapters(model, mlp=False):
    settings = lora_settings(r=4, alpha=8, mlp=mlp)
    add_lora(model.backbone, settings)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters do something
            torch.nn.init.normal_(param, std=0.1)
    return settings


@pytest.mark.parametrize("mlp", [False, True])
def test_merged_model_gives_the_same_outputs(mlp):
    model, config = tiny_classifier()
    _with_random_adapters(model, mlp)
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any(".attn.qkv." in n for n in names) and any(".attn.proj." in n for n in names)
    assert any(".mlp.fc1." in n for n in names) == mlp
    assert not any("patch_embed" in n for n in names)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = model(images)
        merged = merge_lora(copy.deepcopy(model))
        after = merged(images)
    assert not has_lora(merged)
    assert set(merged.state_dict()) == set(tiny_classifier()[0].state_dict())
    for task in before:
        torch.testing.assert_close(after[task], before[task], atol=1e-5, rtol=1e-5)


def test_classifier_file_round_trip_with_and_without_adapters(tmp_path):
    model, config = tiny_classifier()
    settings = _with_random_adapters(model)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
    config.lora = settings
    save_classifier(tmp_path / "unmerged.pth", model, config)
    config.lora = None
    with pytest.raises(ValueError, match="LoRA"):
        save_classifier(tmp_path / "bad.pth", model, config)
    save_classifier(tmp_path / "merged.pth", merge_lora(copy.deepcopy(model)), config)
    for name in ("unmerged.pth", "merged.pth"):
        loaded, loaded_config = load_classifier(tmp_path / name)
        assert has_lora(loaded) == (name == "unmerged.pth")
        with torch.no_grad():
            got = loaded(images)
        for task in expected:
            torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=1e-5)


def test_lpft_stage_two_changes_only_adapters_and_heads(tmp_path):
    make_shapes_dataset(tmp_path / "data", count=40, size=16, seed=3)
    options = [
        f"data.train=CSV:path={tmp_path / 'data' / 'train.csv'}",
        f"data.val=CSV:path={tmp_path / 'data' / 'val.csv'}",
        "data.crop_size=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "backbone.patch_size=4",
        "backbone.embed_dim=32",
        "backbone.depth=2",
        "backbone.num_heads=2",
        "optim.mode=lpft",
        "optim.epochs=2",
        "lpft.probe_epochs=1",
        "lpft.r=2",
        "lpft.lr=0.01",
        "optim.warmup_epochs=0",
        "checkpointing.keep_last=5",
    ]
    summary = train_classifier(load_classify_config(None, [f"output_dir={tmp_path / 'run'}", *options]))
    stage1 = torch.load(tmp_path / "run/checkpoints/epoch_0001.pth", weights_only=True)
    stage2 = torch.load(tmp_path / "run/checkpoints/epoch_0002.pth", weights_only=True)
    assert stage1["lora"] is None and stage2["lora"]["r"] == 2
    before, after = stage1["model"], stage2["model"]
    changed_heads = 0
    for key, value in before.items():
        if key.startswith("heads."):
            changed_heads += not torch.equal(after[key], value)
            continue
        # Wrapped layers keep their original weight under base_layer.
        new_key = (
            key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(after[new_key], value), f"{key} changed in stage 2"
    assert changed_heads == len([k for k in before if k.startswith("heads.")])
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)
    fractions = summary["trainable_params"]
    assert fractions["probe"]["fraction"] < fractions["lora"]["fraction"] < 0.5
    # The exported model has the adapters merged in and loads as a plain classifier.
    model, _ = load_classifier(tmp_path / "run" / "model_final.pth")
    assert not has_lora(model)
    # Interrupted at the stage boundary: the resumed run draws the same adapters and ends the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    (resumed / "checkpoints" / "epoch_0002.pth").unlink()
    (resumed / "model_final.pth").unlink()
    train_classifier(load_classify_config(None, [f"output_dir={resumed}", *options]))
    again = torch.load(resumed / "checkpoints" / "epoch_0002.pth", weights_only=True)["model"]
    assert again.keys() == after.keys() and all(torch.equal(again[key], after[key]) for key in after)


def test_trainable_fraction_counts():
    model, _ = tiny_classifier()
    model.backbone.requires_grad_(False)
    counts = trainable_fraction(model)
    heads = sum(p.numel() for p in model.heads.parameters())
    assert counts["trainable"] == heads
    assert counts["fraction"] == pytest.approx(heads / sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("generation", ["dinov2", "dinov3"])
def test_mlp_adapters_reach_every_feed_forward_linear(generation):
    """``mlp=True`` adapts each linear layer of every block's feed-forward, whatever its names:
    DINOv2's Mlp (fc1, fc2) and fused SwiGLU (w12, w3), DINOv3's SwiGLU (w1, w2, w3)."""
    from dinov2.models.vision_transformer import DinoVisionTransformer
    from dinov2.models.vision_transformer_v3 import DinoV3VisionTransformer

    tiny = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=16)
    if generation == "dinov2":
        builds = [(DinoVisionTransformer(**tiny), ("fc1", "fc2"))]
        builds.append((DinoVisionTransformer(**tiny, ffn_layer="swiglufused"), ("w12", "w3")))
    else:
        builds = [(DinoV3VisionTransformer(**tiny), ("fc1", "fc2"))]
        builds.append((DinoV3VisionTransformer(**tiny, ffn_layer="swiglu", mlp_ratio=6.0), ("w1", "w2", "w3")))
    for backbone, mlp_names in builds:
        backbone.eval()
        add_lora(backbone, lora_settings(r=2, mlp=True))
        adapted = {n.split(".lora_A")[0] for n, _ in backbone.named_parameters() if "lora_A" in n}
        expected = {f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")}
        expected |= {f"blocks.{i}.mlp.{n}" for i in range(2) for n in mlp_names}
        assert adapted == expected
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        images = torch.randn(2, 3, 16, 24)
        with torch.no_grad():
            before = backbone.forward_features(images)["x_norm_patchtokens"]
            merged = merge_lora(copy.deepcopy(backbone))
            after = merged.forward_features(images)["x_norm_patchtokens"]
        assert not has_lora(merged)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
