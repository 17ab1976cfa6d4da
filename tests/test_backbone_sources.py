"""One backbone loader (dinov2.hub.sources) behind evaluation, classifiers, warm start, consolidation
and the hub: a training output directory means the same backbone to all of them, and a sharded
checkpoint is refused unread by all of them with the command that consolidates it."""

import pytest
import torch

from dinov2.eval.setup import build_model_for_eval
from dinov2.hub.backbones import make_dinov2_model
from dinov2.hub.sources import BackboneSourceError, load_backbone, load_backbone_from_config, resolve_weights_path
from dinov2.hub.weights import save_state_dict
from dinov2.train.warm_start import load_warm_start_weights
from dinov2.utils.config import load_config, save_config

TINY = [
    "student.arch=vit_small",
    "student.patch_size=4",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "crops.global_crops_size=16",
    "crops.mean=[0.5,0.5,0.5]",
    "crops.std=[0.25,0.25,0.25]",
]


@pytest.fixture
def run(tmp_path):
    """A training output directory: config.yaml and a teacher export."""
    cfg = load_config(None, TINY)
    save_config(cfg, tmp_path / "run")
    torch.manual_seed(0)
    model, _ = load_backbone_from_config(cfg)
    torch.nn.init.normal_(model.pos_embed)
    save_state_dict(model.state_dict(), tmp_path / "run" / "exports" / "teacher_backbone_latest.pth")
    return tmp_path / "run", cfg, model.state_dict()


def _same(state, model):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and set(state) == set(
        model.state_dict()
    )


def test_a_training_output_directory_is_one_backbone_everywhere(run):
    directory, cfg, expected = run
    model, spec = load_backbone(str(directory))
    assert _same(expected, model) and spec["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    evaluated = build_model_for_eval(None, directory)
    assert _same(expected, evaluated.model) and evaluated.mean == (0.5,) * 3 and evaluated.image_size == 16
    fresh, _ = load_backbone_from_config(cfg)
    assert not _same(expected, fresh)
    assert _same(expected, load_warm_start_weights(fresh, directory))  # student.pretrained_weights=<run dir>
    assert resolve_weights_path(directory) == directory / "exports" / "teacher_backbone_latest.pth"


def test_an_export_file_is_built_from_its_runs_config(run, tmp_path):
    # The heads (and the position-embedding rule) are in no tensor shape: a file in a run's
    # exports/ takes them from the run's config.yaml, a copy elsewhere is guessed from the shapes.
    directory, cfg, state = run
    export = directory / "exports" / "teacher_backbone_latest.pth"
    model, spec = load_backbone(str(export))
    assert model.blocks[0].attn.num_heads == 2 and _same(state, model)
    assert spec["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}  # the run's crops.mean / std
    alone = tmp_path / "alone.pth"
    alone.write_bytes(export.read_bytes())
    with pytest.raises(BackboneSourceError, match="pass num_heads"):  # 32 wide: no rule to guess by
        load_backbone(str(alone))
    given, _ = load_backbone(str(export), num_heads=4)  # an explicit num_heads wins over the config
    assert given.blocks[0].attn.num_heads == 4


def test_sharded_checkpoints_and_missing_exports_name_the_consolidation_command(run, tmp_path):
    directory, cfg, _ = run
    checkpoint = directory / "checkpoints" / "ckpt_0000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / ".metadata").write_bytes(b"never unpickled")
    backbone, _ = load_backbone_from_config(cfg)
    for option, load in (
        ("--pretrained-weights", lambda: build_model_for_eval(directory / "config.yaml", checkpoint)),
        ("student.pretrained_weights", lambda: load_warm_start_weights(backbone, checkpoint)),
        (
            "pretrained_weights",
            lambda: make_dinov2_model(
                "vit_small",
                img_size=16,
                patch_size=4,
                embed_dim=32,
                depth=2,
                num_heads=2,
                pretrained_weights=checkpoint,
            ),
        ),
    ):
        with pytest.raises(ValueError, match=rf"^{option}: .*sharded training checkpoint.*consolidate_checkpoint.py"):
            load()
    with pytest.raises(
        BackboneSourceError, match=r"^backbone source: .*sharded training checkpoint.*consolidate_checkpoint.py"
    ):
        load_backbone(str(checkpoint))  # backbone.source of a classifier
    (directory / "exports" / "teacher_backbone_latest.pth").unlink()
    with pytest.raises(BackboneSourceError, match=r"no backbone export.*consolidate_checkpoint.py .*--output"):
        load_backbone(str(directory))
    with pytest.raises(
        FileNotFoundError, match=r"^--pretrained-weights: .*without a teacher export.*consolidate_checkpoint.py"
    ):
        build_model_for_eval(None, directory)
    with pytest.raises(FileNotFoundError, match=r"^student.pretrained_weights: .*missing.pth does not exist"):
        load_warm_start_weights(backbone, tmp_path / "missing.pth")


def test_a_one_channel_backbone_keeps_its_channels_in_the_build_spec(tmp_path):
    from dinov2.hub.sources import build_backbone_from_spec, infer_vit_kwargs, vit_kwargs_of
    from dinov2.models.vision_transformer import vit_small

    model = vit_small(patch_size=4, img_size=16, embed_dim=32, depth=1, num_heads=2, in_chans=1)
    assert vit_kwargs_of(model)["in_chans"] == infer_vit_kwargs(model.state_dict(), num_heads=2)["in_chans"] == 1
    rebuilt = build_backbone_from_spec({"kind": "vit", "kwargs": vit_kwargs_of(model)})
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # a classifier file on it reloads


def test_a_conv_stem_backbone_keeps_its_stem_through_specs_and_bare_state_dicts(tmp_path):
    from dinov2.hub.sources import build_backbone_from_spec, infer_vit_kwargs, vit_kwargs_of
    from dinov2.layers import ConvStemPatchEmbed
    from dinov2.models import build_backbone
    from dinov2.models.vision_transformer import vit_small

    torch.manual_seed(0)
    model = vit_small(patch_size=4, img_size=28, embed_dim=32, depth=1, num_heads=2, patch_embed="conv_stem").eval()
    assert isinstance(model.patch_embed, ConvStemPatchEmbed)
    widths = [m.out_channels for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32]  # two stride-2 3x3 convolutions (28 -> 14 -> 7), then 1x1 to the width
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(images)["x_norm_patchtokens"]
        assert tokens.shape == (2, 49, 32)
        # Overlapping receptive fields: a pixel in one patch moves its neighbour's token too.
        moved = images.clone()
        moved[:, :, 3, 3] += 5.0  # last pixel row / column of patch (0, 0)
        neighbour = model.patch_embed(moved)[:, 1] - model.patch_embed(images)[:, 1]  # token of patch (0, 1)
        assert neighbour.abs().max() > 1e-4
    spec = vit_kwargs_of(model)
    inferred = infer_vit_kwargs(model.state_dict(), num_heads=2)
    assert spec["patch_embed"] == inferred["patch_embed"] == "conv_stem"
    assert spec["patch_size"] == inferred["patch_size"] == 4 and inferred["in_chans"] == 3
    for kwargs in (spec, inferred):
        rebuilt = build_backbone_from_spec({"kind": "vit", "kwargs": kwargs}).eval()
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(rebuilt.forward_features(images)["x_norm_patchtokens"], tokens)
    assert "patch_embed" not in vit_kwargs_of(vit_small(patch_size=4, img_size=16, embed_dim=32, depth=1, num_heads=2))

    def student(*overrides):
        return load_config(overrides=["student.arch=vit_tiny", "student.patch_size=4", *overrides]).student

    assert isinstance(build_backbone(student("student.patch_embed=conv_stem"), 28).patch_embed, ConvStemPatchEmbed)
    with pytest.raises(ValueError, match=r"Unknown patch_embed 'conv'"):
        build_backbone(student("student.patch_embed=conv"), 28)
    with pytest.raises(ValueError, match=r"power-of-two patch size, got 14x14"):
        build_backbone(student("student.patch_embed=conv_stem", "student.patch_size=14"), 28)
    with pytest.raises(ValueError, match=r"student.patch_embed 'conv_stem' needs student.generation dinov2"):
        build_backbone(student("student.patch_embed=conv_stem", "student.generation=dinov3"), 28)
