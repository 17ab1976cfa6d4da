"""High-resolution adaptation: mixed (global, local) crop sizes per batch, the same on every rank,
reproducible on resume, with masks and position embeddings that follow the size."""

import json
from collections import Counter
from pathlib import Path

import pytest
from train_helpers import make_image_folder, tiny_overrides

from dinov2.data.augmentations import FastDataAugmentationDINO
from dinov2.train.data import CropSizeSchedule, build_train_data_loader
from dinov2.train.train import main
from dinov2.utils.config import load_config

MIXED = [
    "crops.global_crops_sizes=[16,24]",
    "crops.local_crops_sizes=[8,12]",
    "crops.global_local_crop_pairs_ratios=[0.25,0.75]",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def test_size_pairs_follow_the_ratios_and_depend_only_on_seed_and_batch():
    schedule = CropSizeSchedule([(16, 8), (24, 12)], [0.25, 0.75], seed=3, batch_size=4, world_size=2)
    counts = Counter(schedule.pair_index(b) for b in range(4000))
    assert abs(counts[0] / 4000 - 0.25) < 0.03 and abs(counts[1] / 4000 - 0.75) < 0.03
    again = CropSizeSchedule([(16, 8), (24, 12)], [0.25, 0.75], seed=3, batch_size=4, world_size=2)
    other_seed = CropSizeSchedule([(16, 8), (24, 12)], [0.25, 0.75], seed=4, batch_size=4, world_size=2)
    sequence = [schedule.pair_index(b) for b in range(64)]
    assert sequence == [again.pair_index(b) for b in range(64)]
    assert sequence != [other_seed.pair_index(b) for b in range(64)]
    # Map-style: rank r's k-th sample of batch b sits at b * B * W + r + k * W, for every rank.
    for b in (0, 5, 17):
        positions = [b * 8 + rank + k * 2 for rank in (0, 1) for k in range(4)]
        assert {schedule.batch_of_position(p) for p in positions} == {b}
    # Streams, 3 workers per rank: reader r * 3 + w's n-th sample is at n * 6 + r * 3 + w; its
    # batch n // 4 is the rank's batch (n // 4) * 3 + w.
    stream = CropSizeSchedule([(16, 8), (24, 12)], [0.25, 0.75], seed=3, batch_size=4, world_size=2, stream_workers=3)
    for rank in (0, 1):
        assert stream.batch_of_position(5 * 6 + rank * 3 + 2) == 1 * 3 + 2
    with pytest.raises(ValueError, match="sum to 1"):
        CropSizeSchedule([(16, 8), (24, 12)], [0.5, 0.6], 0, 4, 1)
    with pytest.raises(ValueError, match="one probability per pair"):
        CropSizeSchedule([(16, 8), (24, 12)], [1.0], 0, 4, 1)


def _shapes(batch):
    return (
        tuple(batch["collated_global_crops"].shape[-2:]),
        tuple(batch["collated_local_crops"].shape[-2:]),
        tuple(batch["collated_masks"].shape),
    )


def test_every_rank_crops_a_batch_at_the_same_size_and_a_resumed_loader_continues_it(data_root):
    cfg = load_config(None, tiny_overrides(data_root, *MIXED, "train.batch_size_per_gpu=2"))
    schedule = CropSizeSchedule.from_config(cfg, world_size=2)
    per_rank = []
    for rank in (0, 1):
        loader, _ = build_train_data_loader(cfg, 4, rank, 2)
        iterator = iter(loader)
        per_rank.append([_shapes(next(iterator)) for _ in range(10)])
    assert per_rank[0] == per_rank[1]
    expected = [((16, 16), (8, 8), (4, 16)), ((24, 24), (12, 12), (4, 36))]
    assert per_rank[0] == [expected[schedule.pair_index(b)] for b in range(10)]
    assert {shape for shape in per_rank[0]} == set(expected)  # both sizes occur in 10 batches
    # Resumed after 4 batches: the following batches have the sizes (and pixels) of the straight run.
    straight, _ = build_train_data_loader(cfg, 4, 0, 2)
    straight_batches = [b for _, b in zip(range(7), iter(straight))]
    first, _ = build_train_data_loader(cfg, 4, 0, 2)
    first_iterator = iter(first)
    for _ in range(4):
        next(first_iterator)
    resumed, _ = build_train_data_loader(cfg, 4, 0, 2)
    resumed.load_state_dict(first.state_dict())
    for straight_batch, resumed_batch in zip(straight_batches[4:], iter(resumed)):
        assert _shapes(straight_batch) == _shapes(resumed_batch)
        assert straight_batch["collated_global_crops"].equal(resumed_batch["collated_global_crops"])
        assert straight_batch["collated_masks"].equal(resumed_batch["collated_masks"])


def test_augmentation_keeps_one_size_without_pairs_and_rejects_uneven_lists(data_root):
    cfg = load_config(None, tiny_overrides(data_root))
    assert FastDataAugmentationDINO.from_config(cfg.crops).size_pairs == [(16, 8)]
    uneven = load_config(
        None, tiny_overrides(data_root, "crops.global_crops_sizes=[16,24]", "crops.local_crops_sizes=[8]")
    )
    with pytest.raises(ValueError, match="same length"):
        FastDataAugmentationDINO.from_config(uneven.crops)
    no_ratios = load_config(
        None, tiny_overrides(data_root, "crops.global_crops_sizes=[16]", "crops.local_crops_sizes=[8]")
    )
    with pytest.raises(ValueError, match="global_local_crop_pairs_ratios"):
        build_train_data_loader(no_ratios, 4, 0, 1)


def test_high_resolution_stage_continues_from_a_checkpoint_with_a_gram_teacher(tmp_path, data_root):
    main(["--output-dir", str(tmp_path / "base"), *tiny_overrides(data_root, "train.max_iterations=3")])
    checkpoint = tmp_path / "base" / "checkpoints" / "ckpt_00000003"
    # The model keeps its 16 px position embeddings (interpolated for 24 px crops); a Gram
    # teacher at twice the resolution of each batch's global crops.
    stage = tiny_overrides(
        data_root,
        *MIXED,
        f"train.init_from_checkpoint={checkpoint}",
        "train.max_iterations=6",
        "gram.use_loss=true",
        "gram.resolution_scale=2.0",
    )
    main(["--output-dir", str(tmp_path / "highres"), *stage])
    lines = [
        json.loads(line) for line in (Path(tmp_path) / "highres" / "training_metrics.jsonl").read_text().splitlines()
    ]
    assert [line["iteration"] for line in lines] == list(range(1, 7))
    assert all(line["nonfinite_steps"] == 0 and line["gram_loss"] >= 0 for line in lines)
