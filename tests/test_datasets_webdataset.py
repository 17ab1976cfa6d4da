import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.image_io import SKIPPED_KEY, BadImageError
from dinov2.data.loaders import make_data_loader, make_dataset

SHARDS = 4
PER_SHARD = 3


def _jpeg_bytes(value):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (value, value, value)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    for s in range(SHARDS):
        with wds.TarWriter(str(tmp_path / f"train-{s:06d}.tar")) as sink:
            for k in range(PER_SHARD):
                n = s * PER_SHARD + k
                sink.write({"__key__": f"sample{n:04d}", "jpg": _jpeg_bytes(10 * n), "cls": n % 3,
                            "json": {"group_id": f"g{n // 2}"}})
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    return tmp_path


def _spec(root, extra=""):
    return f"WebDataset:urls={root}/train-{{000000..{SHARDS - 1:06d}}}.tar:classes={root}/classes.json{extra}"


def _label_of(image):
    return int(round(np.asarray(image)[5, 5, 0] / 10)) % 3


def test_streams_images_and_labels(shards):
    dataset = make_dataset(_spec(shards, ":length=12"))
    assert len(dataset) == 12 and dataset.classes == ["a", "b", "c"]
    samples = list(dataset)
    assert len(samples) == 12
    for image, target in samples:
        assert image.mode == "RGB" and image.size == (10, 10)
        assert target == _label_of(image)


def test_shards_split_over_ranks_and_workers(shards):
    seen = []
    for rank in range(2):
        dataset = make_dataset(_spec(shards), transform=lambda image: torch.as_tensor(np.asarray(image)))
        dataset.rank, dataset.world_size = rank, 2  # as if built on rank `rank` of 2
        loader = make_data_loader(dataset, batch_size=2, num_workers=2, drop_last=False)
        values = [int(v) for images, _ in loader for v in images[:, 5, 5, 0]]
        assert len(values) == 6  # two shards per rank
        seen.append(values)
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 12


def test_shuffle_and_repeat(shards):
    dataset = make_dataset(_spec(shards, ":shuffle=5:repeat=true:seed=1"))
    stream = iter(dataset)
    labels = [next(stream)[1] for _ in range(36)]  # three passes: repeat keeps going
    passes = [labels[0:12], labels[12:24], labels[24:36]]
    assert all(sorted(p) == sorted([n % 3 for n in range(12)]) for p in passes)
    values = [[int(np.asarray(next(stream)[0])[5, 5, 0]) for _ in range(12)] for _ in range(2)]
    assert values[0] != values[1]  # each pass is shuffled anew


def test_corrupted_sample_raise_and_skip(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as sink:
        sink.write({"__key__": "good", "jpg": _jpeg_bytes(50), "cls": 1})
        sink.write({"__key__": "broken", "jpg": _jpeg_bytes(60)[:100], "cls": 2})
    with pytest.raises(BadImageError, match="bad-000000.tar:broken.jpg"):
        list(make_dataset(f"WebDataset:urls={tmp_path}/bad-000000.tar"))
    dataset = make_dataset(f"WebDataset:urls={tmp_path}/bad-000000.tar:bad_images=skip")
    loader = make_data_loader(dataset, batch_size=4, num_workers=1, drop_last=False,
                              collate_fn=lambda s: {"targets": [t for _, t in s]})
    batches = list(loader)
    assert batches == [{"targets": [1], SKIPPED_KEY: 1}]


def test_missing_shard_and_missing_image_member(tmp_path):
    with pytest.raises(DatasetFormatError, match="shard.*not found"):
        make_dataset(f"WebDataset:urls={tmp_path}/none-{{000000..000001}}.tar")
    with wds.TarWriter(str(tmp_path / "odd-000000.tar")) as sink:
        sink.write({"__key__": "x", "txt": "no image", "cls": 0})
    with pytest.raises(DatasetFormatError, match="odd-000000.tar:x has no image member"):
        list(make_dataset(f"WebDataset:urls={tmp_path}/odd-000000.tar"))
