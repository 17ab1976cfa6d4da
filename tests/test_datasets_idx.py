"""MNIST-style IDX files (``MNIST:root=...``), in the exact format Fashion-MNIST ships."""

import gzip
import struct

import numpy as np
import pytest

from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.loaders import make_dataset


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion_root(tmp_path):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 12, True), ("t10k", 5, False)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        suffix = ".gz" if gz else ""
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


def test_reads_gzipped_and_plain_splits_with_fashion_names(fashion_root):
    train = make_dataset(f"MNIST:root={fashion_root}:split=train")
    test = make_dataset(f"MNIST:root={fashion_root}:split=test")
    assert len(train) == 12 and len(test) == 5
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    image, target = train[3]
    assert image.size == (28, 28) and image.mode == "RGB" and target == 3
    assert train.get_targets().tolist() == [i % 10 for i in range(12)]
    with gzip.open(fashion_root / "train-images-idx3-ubyte.gz", "rb") as f:
        first = np.frombuffer(f.read(), dtype=np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    assert np.array_equal(np.asarray(train[0][0])[..., 0], first)
    inverted = make_dataset(f"MNIST:root={fashion_root}:split=train:invert=true:classes=digits")
    assert np.array_equal(np.asarray(inverted[0][0])[..., 0], 255 - first)
    assert inverted.classes[:3] == ["0", "1", "2"]


def test_broken_files_are_named(fashion_root):
    (fashion_root / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DatasetFormatError, match="t10k-labels-idx1-ubyte.*header says"):
        make_dataset(f"MNIST:root={fashion_root}:split=test")
    (fashion_root / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04")
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        make_dataset(f"MNIST:root={fashion_root}:split=test")
    (fashion_root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetFormatError, match="no t10k-labels-idx1-ubyte"):
        make_dataset(f"MNIST:root={fashion_root}:split=test")
    with pytest.raises(DatasetFormatError, match="names 2 classes"):
        make_dataset(f"MNIST:root={fashion_root}:split=train:classes=a,b")


@pytest.mark.skipif(
    not __import__("os").path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="needs Debian's Fashion-MNIST files: apt-get install dataset-fashion-mnist (.ci/run does)",
)
def test_debian_fashion_mnist_package():
    train = make_dataset("MNIST:root=/usr/share/datasets/fashion-mnist:split=train")
    test = make_dataset("MNIST:root=/usr/share/datasets/fashion-mnist:split=test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(test.get_targets()).tolist() == [1000] * 10
