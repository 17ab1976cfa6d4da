"""Evaluation over datasets with unreadable images: bad_images=skip leaves them out, raise names them."""

import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from dinov2.data.datasets.webdataset_shards import WebDatasetStream
from dinov2.data.image_io import BadImageError
from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.features import BlockFeatures, class_names_of, extract_features
from dinov2.eval.linear import HeadGrid, OnlineTrainSource, make_head_grid, train_linear_grid
from dinov2.models.vision_transformer import vit_small


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vit_small(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2).eval()


def _folder(root, broken):
    for k in range(6):
        folder = root / ("a" if k % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * k, 255 - 40 * k, 0)).save(folder / f"{k}.jpg")
    for k in broken:
        path = root / ("a" if k % 2 == 0 else "b") / f"{k}.jpg"
        path.write_bytes(path.read_bytes()[:100])  # truncated JPEG


def test_skipped_images_are_left_out_of_features(tmp_path, model):
    _folder(tmp_path, broken=[2])  # dataset order: a/0, a/2, a/4, b/1, b/3, b/5
    transform = make_classification_eval_transform(crop_size=16)
    lenient = make_dataset(f"ImageFolder:root={tmp_path}:bad_images=skip:cache=false", transform=transform)
    features = extract_features(model, lenient, batch_size=2, num_workers=0)
    assert features.indices.tolist() == [0, 2, 3, 4, 5]
    assert features.labels.tolist() == [0, 0, 1, 1, 1]
    assert features.features.shape == (5, 32)
    strict = make_dataset(f"ImageFolder:root={tmp_path}:cache=false", transform=transform)
    with pytest.raises(BadImageError, match="2.jpg"):
        extract_features(model, strict, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"rank\(s\) \[0\] of 1 got no samples"):  # every rank says which
        extract_features(model, lenient, batch_size=2, num_workers=0, indices=[1])  # only the broken image


def test_skipped_images_in_a_stream(tmp_path, model):
    def jpeg(value):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (value, value, value)).save(buffer, format="JPEG")
        return buffer.getvalue()

    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as sink:
        for n in range(4):
            data = jpeg(50 * n)
            sink.write({"__key__": f"k{n}", "jpg": data[:100] if n == 1 else data, "cls": n % 2})
    stream = make_dataset(
        f"WebDataset:urls={tmp_path}/s-000000.tar:bad_images=skip",
        transform=make_classification_eval_transform(crop_size=16),
    )
    features = extract_features(model, stream, batch_size=2, num_workers=0)
    assert features.labels.tolist() == [0, 0, 1]  # samples 0, 2, 3
    assert class_names_of(stream) is None  # no classes=: integer labels, reports without names


def test_a_stream_built_for_one_of_several_ranks_is_read_whole_for_evaluation(tmp_path, model):
    # Under torchrun a WebDataset stream deals its shards to the ranks when it is built; the
    # evaluation spreads a stream over ranks by position itself, so it must read every shard.
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"s-{shard:06d}.tar")) as sink:
            for n in range(3):
                image = Image.new("RGB", (16, 16), (80 * n, 0, 0))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                sink.write({"__key__": f"s{shard}-{n}", "png": buffer.getvalue(), "cls": shard})
    stream = WebDatasetStream(
        urls=f"{tmp_path}/s-{{000000..000001}}.tar",
        transform=make_classification_eval_transform(crop_size=16),
        rank=1,
        world_size=2,
    )
    features = extract_features(model, stream, batch_size=2, num_workers=0)
    assert features.labels.tolist() == [0, 0, 0, 1, 1, 1] and features.indices.tolist() == list(range(6))
    assert (stream.rank, stream.world_size) == (1, 2)  # the caller's stream is left as it was


def test_online_linear_probe_survives_an_all_skipped_batch(tmp_path, model):
    _folder(tmp_path, broken=[0, 2])  # dataset indices 0 and 1: the first batch below
    dataset = make_dataset(
        f"ImageFolder:root={tmp_path}:bad_images=skip:cache=false",
        transform=make_classification_eval_transform(crop_size=16),
    )
    val = extract_features(model, dataset, feature_fn=BlockFeatures(2), batch_size=4, num_workers=0)
    source = OnlineTrainSource(model, dataset, range(len(dataset)), 2, "cpu", num_workers=0)
    batches = list(source.batches([torch.tensor([0, 1]).numpy(), torch.tensor([2, 3]).numpy()]))
    assert [len(labels) for _, labels in batches] == [0, 2]
    assert batches[0][0].shape == (0, 3, 32)
    grid = HeadGrid(make_head_grid([0.1], [1, 2], [True]), 32, 2, seed=0, lr_scale=1.0, device="cpu")
    before = [p.detach().clone() for p in grid.parameters()]
    assert grid.train_step(*batches[0], lr_factor=1.0).tolist() == [0.0, 0.0]  # an empty step changes nothing
    assert all(torch.equal(a, b) for a, b in zip(before, grid.parameters()))
    result = train_linear_grid(
        source, val, 2, make_head_grid([0.1], [1, 2], [True]), 32, epochs=2, batch_size=2, seed=0, progress=False
    )
    assert result.iterations == 6 and len(result.history) == 2
    assert all(torch.isfinite(p).all() for p in result.grid.parameters())
