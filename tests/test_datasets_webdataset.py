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
                sink.write(
                    {
                        "__key__": f"sample{n:04d}",
                        "jpg": _jpeg_bytes(10 * n),
                        "cls": n % 3,
                        "json": {"group_id": f"g{n // 2}"},
                    }
                )
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
    loader = make_data_loader(
        dataset, batch_size=4, num_workers=1, drop_last=False, collate_fn=lambda s: {"targets": [t for _, t in s]}
    )
    batches = list(loader)
    assert batches == [{"targets": [1], SKIPPED_KEY: 1}]


def test_missing_shard_and_missing_image_member(tmp_path):
    with pytest.raises(DatasetFormatError, match="shard.*not found"):
        make_dataset(f"WebDataset:urls={tmp_path}/none-{{000000..000001}}.tar")
    with wds.TarWriter(str(tmp_path / "odd-000000.tar")) as sink:
        sink.write({"__key__": "x", "txt": "no image", "cls": 0})
    with pytest.raises(DatasetFormatError, match="odd-000000.tar:x has no image member"):
        list(make_dataset(f"WebDataset:urls={tmp_path}/odd-000000.tar"))


# Uneven shards (a reader's pass and the shuffle runs straddle shard boundaries); sample n is a
# PNG whose pixels hold n, so a batch tells exactly which samples it holds.
RESUME_SHARD_SIZES = (5, 7, 4, 6, 8, 3, 5, 6)


@pytest.fixture
def uneven_shards(tmp_path):
    n = 0
    for s, size in enumerate(RESUME_SHARD_SIZES):
        with wds.TarWriter(str(tmp_path / f"r-{s:06d}.tar")) as sink:
            for _ in range(size):
                buffer = io.BytesIO()
                Image.new("L", (4, 4), n).save(buffer, format="PNG")
                sink.write({"__key__": f"s{n:03d}", "png": buffer.getvalue(), "cls": n % 3})
                n += 1
    return f"WebDataset:urls={tmp_path}/r-{{000000..{len(RESUME_SHARD_SIZES) - 1:06d}}}.tar"


def _sample_numbers(samples):
    return [int(np.asarray(image)[0, 0, 0]) for image, _ in samples]


def _stream_loader(spec, rank, num_workers, batch_size=3):
    dataset = make_dataset(spec)
    dataset.rank, dataset.world_size = rank, 2  # as if built on rank `rank` of 2
    return make_data_loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_sample_numbers,
        rank=rank,
        world_size=2,
        persistent_workers=num_workers > 0,
    )


def _take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_with_the_same_samples_on_every_rank(uneven_shards, num_workers):
    spec = f"{uneven_shards}:shuffle=4:repeat=true:seed=3"
    total = 24  # 72 samples per rank: about three passes over its 22 samples
    for stop in (7, 17):  # an odd number of batches: the next one comes from worker 1
        saved = []
        for rank in range(2):
            straight = _take(_stream_loader(spec, rank, num_workers), total)
            interrupted = _stream_loader(spec, rank, num_workers)
            before = _take(interrupted, stop)
            assert before == straight[:stop]
            saved.append(interrupted.state_dict())
            resumed = _stream_loader(spec, rank, num_workers)
            resumed.load_state_dict(saved[0])  # rank 0's state: ranks consume batches in lockstep
            assert _take(resumed, total - stop) == straight[stop:], (rank, stop)
        assert saved[0] == saved[1]
        assert saved[0]["consumed_samples"] == stop * 3 * 2


def test_resume_checks_the_stream_and_warns_on_a_new_layout(uneven_shards, caplog):
    spec = f"{uneven_shards}:shuffle=4:repeat=true:seed=3"
    loader = _stream_loader(spec, 0, 0)
    _take(loader, 5)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed=3 but this dataset has seed=4"):
        _stream_loader(f"{uneven_shards}:shuffle=4:repeat=true:seed=4", 0, 0).load_state_dict(state)
    # Two workers instead of one: readers own other shards, so it goes on approximately, and says so.
    moved = _stream_loader(spec, 0, 2)
    with caplog.at_level("WARNING", logger="dinov2"):
        moved.load_state_dict(state)
    assert "workers_per_rank 1 -> 2" in caplog.text
    assert len(_take(moved, 2)) == 2


def test_shard_sample_count_from_tar_headers_matches_the_reader(tmp_path):
    from dinov2.data.datasets.webdataset_shards import count_shard_samples

    path = tmp_path / "multi-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for n in range(5):
            sink.write({"__key__": f"dir/k{n}", "jpg": _jpeg_bytes(n), "cls": n, "json": {"n": n}})
    assert count_shard_samples(str(path)) == 5 == len(list(make_dataset(f"WebDataset:urls={path}")))


def test_resume_does_not_decode_the_skipped_samples(uneven_shards, monkeypatch):
    import dinov2.data.datasets.webdataset_shards as shards_module

    spec = f"{uneven_shards}:shuffle=4:repeat=true:seed=3"
    loader = _stream_loader(spec, 0, 0)
    _take(loader, 20)  # 60 samples: the third pass over rank 0's shards
    decoded = []
    original = shards_module.decode_image_bytes
    monkeypatch.setattr(shards_module, "decode_image_bytes", lambda *args: decoded.append(args[1]) or original(*args))
    resumed = _stream_loader(spec, 0, 0)
    resumed.load_state_dict(loader.state_dict())
    _take(resumed, 2)
    assert len(decoded) == 6  # only the two batches it delivered
