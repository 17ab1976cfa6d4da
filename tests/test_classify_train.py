import json
import shutil

import pytest
import torch
from classify_helpers import TINY_VIT

from dinov2.classify.checkpoint import load_classifier
from dinov2.classify.config import load_classify_config
from dinov2.classify.heads import HeadSpec, MultiHeadClassifier
from dinov2.classify.optimization import build_optimizer
from dinov2.classify.resume import RESUME_STATE_KEYS, resume_states, write_resume_state
from dinov2.classify.stages import set_trainable
from dinov2.classify.trainer import train_classifier
from dinov2.hub.sources import BackboneSourceError, load_backbone
from dinov2.hub.weights import save_state_dict
from dinov2.utils.config import ConfigError, load_config, save_config
from dinov2_tools.shapes import make_shapes_dataset

TINY = [
    "backbone.patch_size=4",
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "data.crop_size=16",
    "data.batch_size=8",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, count=48, size=16, seed=1)
    return root


def _cfg(output_dir, shapes, *extra):
    return load_classify_config(
        None,
        [
            f"output_dir={output_dir}",
            f"data.train=CSV:path={shapes / 'train.csv'}",
            f"data.val=CSV:path={shapes / 'val.csv'}",
            *TINY,
            *extra,
        ],
    )


def test_full_finetuning_writes_outputs_and_resumes_exactly(tmp_path, shapes):
    extra = ["optim.mode=full", "optim.epochs=3", "checkpointing.keep_last=5", "optim.warmup_epochs=0.5"]
    summary = train_classifier(_cfg(tmp_path / "a", shapes, *extra))
    out = tmp_path / "a"
    for name in ("config.yaml", "metrics.jsonl", "model_final.pth", "model_best.pth", "summary.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert set(lines[0]["val"]["tasks"]) == {"presence", "closure", "circularity"}
    assert lines[0]["val"]["tasks"]["closure"]["num_labelled"] < lines[0]["val"]["tasks"]["presence"]["num_labelled"]
    assert summary["best_mean_top1"] == max(line["val"]["mean_top1"] for line in lines)

    # Interrupt after epoch 2: drop what epoch 3 wrote, then run again with the same options.
    shutil.copytree(out, tmp_path / "b")
    resumed = tmp_path / "b"
    (resumed / "checkpoints" / "epoch_0003.pth").unlink()
    (resumed / "model_final.pth").unlink()
    train_classifier(_cfg(resumed, shapes, *extra))
    final_a, _ = load_classifier(out / "model_final.pth")
    final_b, _ = load_classifier(resumed / "model_final.pth")
    for (key, a), b in zip(final_a.state_dict().items(), final_b.state_dict().values()):
        assert torch.equal(a, b), key
    # The resumed run replaces the line of the epoch it trains again: one line per epoch.
    resumed_lines = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in resumed_lines] == [1, 2, 3]
    assert resumed_lines[:2] == lines[:2]


def test_starting_over_sets_the_earlier_runs_resume_states_aside(tmp_path, shapes):
    extra = ["optim.epochs=1", "checkpointing.keep_last=1"]
    for epoch in (9, 10):  # an earlier, longer run's states
        write_resume_state(tmp_path, {key: None for key in RESUME_STATE_KEYS} | {"epoch": epoch}, keep=5)
    train_classifier(_cfg(tmp_path, shapes, *extra, "checkpointing.resume=false"))
    assert [epoch for epoch, _ in resume_states(tmp_path)] == [1]  # not pruned against epochs 9 and 10
    assert sorted(p.name for p in (tmp_path / "checkpoints.replaced-1").glob("*.pth")) == [
        "epoch_0009.pth",
        "epoch_0010.pth",
    ]


def test_validation_period_skips_epochs_but_always_validates_the_last(tmp_path, shapes):
    extra = ["optim.epochs=5", "data.val_period_epochs=2", "checkpointing.period_epochs=5"]
    summary = train_classifier(_cfg(tmp_path, shapes, *extra))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["epoch"] for line in lines if "val" in line] == [2, 4, 5]
    assert summary["final"] == lines[-1]["val"]
    assert summary["best_epoch"] in (2, 4, 5)
    assert [path.name for path in sorted((tmp_path / "checkpoints").glob("*.pth"))] == ["epoch_0005.pth"]
    with pytest.raises(ConfigError, match="data.val_period_epochs"):
        _cfg(tmp_path / "bad", shapes, "data.val_period_epochs=0")


def test_probe_keeps_backbone_and_partial_unfreezes_last_blocks(tmp_path, shapes):
    for cache in ("false", "true"):
        out = tmp_path / f"probe_{cache}"
        summary = train_classifier(
            _cfg(out, shapes, "optim.mode=probe", "optim.epochs=2", f"optim.cache_features={cache}", "seed=3")
        )
        assert summary["final"]["tasks"]["presence"]["num_labelled"] > 0
        probe, _ = load_classifier(out / "model_final.pth")
        torch.manual_seed(3)  # the trainer seeds before building the backbone
        initial, _ = load_backbone("random", **TINY_VIT)
        for key, value in initial.state_dict().items():
            assert torch.equal(probe.backbone.state_dict()[key], value), key
        assert not torch.equal(probe.heads["presence"].weight, torch.zeros_like(probe.heads["presence"].weight))
    with pytest.raises(ConfigError, match="cache_features"):
        _cfg(tmp_path, shapes, "optim.mode=full", "optim.cache_features=true")
    backbone, _ = load_backbone("random", **TINY_VIT)
    model = MultiHeadClassifier(backbone, [HeadSpec("t", ("a", "b"))])
    set_trainable(model, "partial", unfreeze_last_k=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("backbone.blocks.1.", "backbone.norm.", "heads.")) for n in trainable)
    assert any(n.startswith("backbone.blocks.1.") for n in trainable)
    set_trainable(model, "full")
    optimizer = build_optimizer(model, head_lr=1e-2, backbone_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["heads.t.weight"])] == pytest.approx(1e-2)
    assert lr_of[id(named["backbone.norm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["backbone.blocks.1.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.25)
    assert lr_of[id(named["backbone.patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.125)


def test_backbone_from_training_output_and_consolidated_file(tmp_path, shapes):
    ssl_cfg = load_config(
        None,
        [
            "student.arch=vit_small",
            "student.patch_size=4",
            "student.embed_dim=32",
            "student.depth=2",
            "student.num_heads=2",
            "crops.global_crops_size=16",
            "crops.mean=[0.5,0.5,0.5]",
            "crops.std=[0.25,0.25,0.25]",
        ],
    )
    run = tmp_path / "ssl_run"
    save_config(ssl_cfg, run)
    reference, spec = load_backbone("random", **TINY_VIT, init_values=1e-5)
    torch.nn.init.normal_(reference.pos_embed)
    save_state_dict(reference.state_dict(), run / "exports" / "teacher_backbone_latest.pth")
    images = torch.randn(2, 3, 16, 16)
    export = run / "exports" / "teacher_backbone_latest.pth"
    alone = tmp_path / "alone.pth"  # the same file outside its run: no config to read the heads from
    alone.write_bytes(export.read_bytes())
    for source, kwargs in ((str(run), {}), (str(export), {}), (str(alone), {"num_heads": 2})):
        model, model_spec = load_backbone(source, **kwargs)
        assert model_spec["kwargs"]["embed_dim"] == 32 and model_spec["kwargs"]["depth"] == 2
        model.eval(), reference.eval()
        torch.testing.assert_close(model(images), reference(images))
    with pytest.raises(BackboneSourceError, match="num_heads"):
        load_backbone(str(alone))
    with pytest.raises(BackboneSourceError, match="no backbone export"):
        load_backbone(str(tmp_path / "ssl_run"), weights="exports/missing.pth")
    with pytest.raises(BackboneSourceError, match="not 'random'"):
        load_backbone(str(tmp_path / "nothing_here"))
    # A classifier trained from the training output keeps its weights as the starting point.
    cfg = _cfg(tmp_path / "from_ssl", shapes, f"backbone.source={run}", "optim.mode=probe", "optim.epochs=1")
    train_classifier(cfg)
    classifier, config = load_classifier(tmp_path / "from_ssl")
    torch.testing.assert_close(classifier.backbone(images), reference(images))
    assert config.extra["backbone_source"] == str(run)
    # Images are normalised as the backbone saw them during self-supervised training.
    assert config.preprocessing["mean"] == [0.5] * 3 and config.preprocessing["std"] == [0.25] * 3


def test_timm_backbone(tmp_path):
    pytest.importorskip("timm", reason="timm is an optional extra and is not installed here")
    backbone, spec = load_backbone("timm:vit_tiny_patch16_224")
    model = MultiHeadClassifier(backbone, [HeadSpec("t", ("a", "b"), "cls+mean")])
    assert model(torch.randn(1, 3, 224, 224))["t"].shape == (1, 2)
    assert spec == {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": {}}


def test_config_errors_name_the_key(tmp_path, shapes):
    with pytest.raises(ConfigError, match="optim.mode"):
        _cfg(tmp_path, shapes, "optim.mode=sideways")
    with pytest.raises(ConfigError, match="lpft.probe_epochs"):
        _cfg(tmp_path, shapes, "optim.mode=lpft", "optim.epochs=2", "lpft.probe_epochs=2")
    with pytest.raises(ConfigError, match="nonsense"):
        _cfg(tmp_path, shapes, "optim.nonsense=1")
    with pytest.raises(Exception, match="unknown tasks"):
        train_classifier(_cfg(tmp_path / "x", shapes, "heads.tasks=[presence,colour]"))


def test_single_label_folders_use_the_configured_task_name(tmp_path):
    from classify_helpers import random_image

    for split in ("train", "val"):
        for c, name in enumerate(("cats", "dogs")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                random_image(100 * c + 10 * i + (split == "val"), size=(16, 16)).save(
                    tmp_path / split / name / f"{i}.png"
                )
    cfg = load_classify_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train=ImageFolder:root={tmp_path / 'train'}:cache=false",
            f"data.val=ImageFolder:root={tmp_path / 'val'}:cache=false",
            "heads.single_task_name=animal",
            "optim.epochs=1",
            *TINY,
        ],
    )
    summary = train_classifier(cfg)
    assert summary["final"]["tasks"]["animal"]["num_labelled"] == 8
    _, config = load_classifier(tmp_path / "run")
    assert [(h.name, h.classes) for h in config.heads] == [("animal", ("cats", "dogs"))]


def test_partial_finetuning_with_bf16_autocast(tmp_path, shapes):
    cfg = _cfg(
        tmp_path / "bf16", shapes, "optim.mode=partial", "optim.unfreeze_last_k=1", "optim.amp=bf16", "optim.epochs=1"
    )
    summary = train_classifier(cfg)
    assert summary["final"]["mean_top1"] is not None
    line = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["stage"] == "partial" and all(v == v for v in line["train"].values())  # finite, not NaN
    model, config = load_classifier(tmp_path / "bf16")
    assert config.preprocessing["mean"] == [0.485, 0.456, 0.406]  # ImageNet default for a random backbone
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train_classifier(_cfg(tmp_path / "fp16", shapes, "optim.amp=fp16", "optim.epochs=1", "device=cpu"))


class _RunsCode:
    def __reduce__(self):  # pickles as a call of os.system (a harmless ``true`` if ever run)
        import os

        return (os.system, ("true",))


def test_bad_resume_state_is_refused_naming_the_file(tmp_path, shapes):
    from dinov2.classify.checkpoint import ClassifierFileError

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = checkpoints / "epoch_0001.pth"
    cases = {
        "pickled code": ("refusing to load classifier resume state", "pickled global"),
        "empty": ("cannot read classifier resume state", "the file is empty"),
        "garbage": ("cannot read classifier resume state", "truncated or corrupt, or not a torch file"),
        "not a resume state": ("classifier resume state", "lacks the entries"),
    }
    for kind, expected in cases.items():
        if kind == "pickled code":
            torch.save({"epoch": 1, "model": _RunsCode()}, state)
        elif kind == "empty":
            state.write_bytes(b"")
        elif kind == "garbage":
            state.write_bytes(b"\x00garbage" * 50)
        else:
            torch.save({"epoch": 1}, state)
        with pytest.raises(ClassifierFileError) as info:
            train_classifier(_cfg(tmp_path / "run", shapes, "optim.epochs=2"))
        message = str(info.value)
        assert str(state) in message and all(part in message for part in expected), (kind, message)
