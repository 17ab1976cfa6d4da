"""MNIST-style IDX files: MNIST, Fashion-MNIST, KMNIST (``MNIST:root=...:split=train|test``).

The folder holds ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` and the ``t10k-``
pair, each optionally gzipped (``.gz``), as the original distributions and Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) ship them. An IDX file is
a big-endian header (two zero bytes, a type code, the number of dimensions, one 32-bit size per
dimension) followed by the raw array; images are unsigned bytes, white ink on black.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
from PIL import Image

from dinov2.data.spec import SpecKey, parse_bool

from .base import DatasetFormatError, LabelledImageDataset, open_text

SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
UNSIGNED_BYTE = 0x08
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]


def _find(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DatasetFormatError(f"MNIST root {root} has no {stem} (or {stem}.gz)")


def read_idx(path: str, dimensions: int) -> np.ndarray:
    """The unsigned-byte array of an IDX file with ``dimensions`` dimensions (gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DatasetFormatError(f"cannot read IDX file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetFormatError(f"{path} is not an IDX file (its first bytes are not 00 00)")
    if data[2] != UNSIGNED_BYTE or data[3] != dimensions:
        raise DatasetFormatError(
            f"{path}: expected {dimensions}-d unsigned bytes (type 0x08), got type {data[2]:#04x} with {data[3]} dims"
        )
    header = 4 + 4 * dimensions
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetFormatError(f"{path}: header says {shape} ({expected} bytes), the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _class_names(value: str, root: str, count: int) -> list[str]:
    if value == "auto":
        names = FASHION_CLASSES if "fashion" in os.path.basename(os.path.normpath(root)).lower() else DIGIT_CLASSES
    elif value == "fashion":
        names = FASHION_CLASSES
    elif value == "digits":
        names = DIGIT_CLASSES
    elif os.path.isfile(value):
        with open_text(value, "MNIST class list") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [v.strip() for v in value.split(",") if v.strip()]
    if len(names) < count:
        raise DatasetFormatError(f"MNIST classes={value!r} names {len(names)} classes, the labels use {count}")
    return names


class IDXDataset(LabelledImageDataset):
    SPEC_KEYS = {
        "root": SpecKey(str, help="folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
        "split": SpecKey(str, "train", "train or test", tuple(SPLIT_PREFIXES)),
        "classes": SpecKey(
            str, "auto", "fashion, digits, a comma list or a file (auto: fashion if the folder name says so)"
        ),
        "invert": SpecKey(parse_bool, False, "black ink on white paper (as Quick, Draw! drawings)"),
    }

    def __init__(
        self,
        root: str,
        split: str = "train",
        classes: str = "auto",
        invert: bool = False,
        transform=None,
        target_transform=None,
    ):
        super().__init__(transform, target_transform, "raise")
        if split not in SPLIT_PREFIXES:
            raise ValueError(f"MNIST split must be one of {list(SPLIT_PREFIXES)}, got {split!r}")
        if not os.path.isdir(root):
            raise DatasetFormatError(f"MNIST root {root} is not a folder")
        prefix = SPLIT_PREFIXES[split]
        images_path = _find(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        self.images = read_idx(images_path, 3)
        self.targets = read_idx(labels_path, 1).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise DatasetFormatError(
                f"{images_path} holds {len(self.images)} images but {labels_path} {len(self.targets)} labels"
            )
        self.classes = _class_names(classes, root, int(self.targets.max()) + 1 if len(self.targets) else 0)
        self.invert = invert

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        pixels = self.images[index]
        if self.invert:
            pixels = 255 - pixels
        return Image.fromarray(np.ascontiguousarray(pixels), mode="L").convert("RGB")

    def get_target(self, index: int) -> int:
        return int(self.targets[index])

    def get_targets(self) -> np.ndarray:
        return self.targets
