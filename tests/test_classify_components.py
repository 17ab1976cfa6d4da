"""The parts classifier training is built from: the feature cache (through the evaluation
feature extractor), resume states (the core's atomic writer and retention) and the optimiser
groups from dinov2.optim."""

import pytest
import torch
from classify_helpers import tiny_classifier
from torch.utils.data import Subset

from dinov2.classify.checkpoint import ClassifierFileError
from dinov2.classify.config import load_classify_config
from dinov2.classify.data import ClassifyDataError, build_datasets, make_task_dataset, task_targets
from dinov2.classify.feature_cache import cache_features
from dinov2.classify.optimization import build_optimizer
from dinov2.classify.resume import (
    RESUME_STATE_KEYS,
    latest_resume_state,
    read_resume_state,
    resume_states,
    write_resume_state,
)
from dinov2.classify.transforms import eval_transform, preprocessing_settings
from dinov2.data.loaders import make_dataset
from dinov2.optim import scale_learning_rates
from dinov2_tools.shapes import make_shapes_dataset
from dinov2_tools.synthetic_industrial import make_industrial_dataset


def test_cached_features_are_the_backbone_pooling_with_every_task_target(tmp_path):
    make_shapes_dataset(tmp_path, count=16, size=16, seed=2)
    transform = eval_transform(preprocessing_settings(crop_size=16, resize_size=16))
    dataset, tasks = make_task_dataset(f"CSV:path={tmp_path / 'train.csv'}:bad_images=skip", transform)
    broken = dataset.get_image_path(4)
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    subset = Subset(dataset, [6, 4, 0, 3, 1])  # position 1 is the unreadable image
    model, _ = tiny_classifier()
    cached = cache_features(model, subset, torch.device("cpu"), batch_size=2)

    assert len(cached) == 4 and set(cached.features) == {"cls", "mean"}
    kept = [6, 0, 3, 1]
    with torch.no_grad():
        expected = model.features(torch.stack([dataset[i][0] for i in kept]))
    for key in ("cls", "mean"):
        torch.testing.assert_close(cached.features[key], expected[key])
    assert set(cached.targets) == set(tasks)
    for row, index in enumerate(kept):
        features, targets = cached[row]
        assert {t: int(v) for t, v in targets.items()} == dataset[index][1]
    assert -1 in cached.targets["closure"].tolist()  # missing labels stay missing

    assert task_targets(subset, [0, 2])["presence"].tolist() == [dataset[6][1]["presence"], dataset[0][1]["presence"]]
    with pytest.raises(ClassifyDataError, match="not a classifier dataset"):
        task_targets(torch.utils.data.TensorDataset(torch.zeros(2)), [0])


def test_validation_fraction_holds_out_whole_groups_and_loss_weights_name_real_tasks(tmp_path):
    make_industrial_dataset(str(tmp_path), groups=10, images_per_group=2, size=16, seed=3)
    spec = f"Industrial:root={tmp_path}:split=train"
    preprocessing = preprocessing_settings(crop_size=16, resize_size=16)
    common = [f"output_dir={tmp_path / 'out'}", f"data.train={spec}"]
    cfg = load_classify_config(None, [*common, "data.val_fraction=0.25"])
    train_set, val_set, tasks = build_datasets(cfg, preprocessing)
    groups = make_dataset(spec).get_group_ids()
    train_groups, val_groups = ({groups[i] for i in part.indices} for part in (train_set, val_set))
    assert val_groups and train_groups and not train_groups & val_groups  # photos of one part on one side only
    assert len(train_set) + len(val_set) == len(groups)
    typo = load_classify_config(None, [*common, "heads.loss_weights={labl: 0.5}"])
    with pytest.raises(ClassifyDataError, match=r"heads.loss_weights names task\(s\) \['labl'\] .*tasks: \['label'\]"):
        build_datasets(typo, preprocessing)


def _state(epoch):
    return {key: None for key in RESUME_STATE_KEYS} | {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}


def test_resume_states_are_written_atomically_and_pruned_by_the_core_retention(tmp_path):
    for epoch in (1, 2, 3, 4):
        write_resume_state(tmp_path, _state(epoch), keep=2)
    assert [epoch for epoch, _ in resume_states(tmp_path)] == [3, 4]
    assert latest_resume_state(tmp_path).name == "epoch_0004.pth"
    assert torch.equal(read_resume_state(latest_resume_state(tmp_path))["model"]["w"], torch.full((2,), 4.0))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary files

    keep_all = tmp_path / "all"
    for epoch in (1, 2, 3):
        write_resume_state(keep_all, _state(epoch), keep=0)
    assert [epoch for epoch, _ in resume_states(keep_all)] == [1, 2, 3]

    # The recorded SHA-256 (sha256sum format) catches a state changed in place, which torch would load.
    latest = latest_resume_state(tmp_path)
    record = (tmp_path / "checkpoints" / "epoch_0004.pth.sha256").read_text().split()
    assert record[1] == "epoch_0004.pth" and not (tmp_path / "checkpoints" / "epoch_0001.pth.sha256").exists()
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.raises(ClassifierFileError, match="epoch_0004.pth does not match its recorded SHA-256"):
        read_resume_state(latest)

    with pytest.raises(ValueError, match="optimizer"):
        write_resume_state(tmp_path, {"epoch": 5}, keep=2)
    (tmp_path / "checkpoints" / "epoch_0005.pth").write_bytes(b"")
    with pytest.raises(ClassifierFileError, match="epoch_0005.pth"):
        read_resume_state(latest_resume_state(tmp_path))


def test_stage_schedule_scales_every_group_from_its_peak():
    model, _ = tiny_classifier()
    optimizer = build_optimizer(model, head_lr=1e-2, backbone_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    peaks = [group["base_lr"] for group in optimizer.param_groups]
    assert peaks == [group["lr"] for group in optimizer.param_groups] and len(set(peaks)) > 2
    scale_learning_rates(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.25 * p for p in peaks])
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["heads.presence.weight"])] == 0.05 and decay[id(named["heads.presence.bias"])] == 0.0
    assert decay[id(named["backbone.norm.weight"])] == 0.0
    assert decay[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.05
