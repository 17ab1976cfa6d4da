"""What every map-style dataset here shares: (PIL RGB image, target) samples, transforms,
the bad-image policy, ``classes`` / ``get_targets()`` / ``get_group_ids()``, and path checks."""

from __future__ import annotations

import gzip
import os
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinov2.data.image_io import check_policy
from dinov2.data.spec import SpecKey

BAD_IMAGES_KEY = {
    "bad_images": SpecKey(str, "raise", "what to do with a corrupted image: raise or skip", ("raise", "skip")),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class DatasetFormatError(ValueError):
    """The files on disk do not match the format; the message names the file and entry."""


@contextmanager
def open_text(path: str, what: str, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a user's text file (annotations, label lists, CSV, ``.ndjson[.gz]``) as UTF-8 for reading.

    Every dataset reads its text files through here, so that a missing file or one in another
    encoding (e.g. Latin-1 from a spreadsheet export) is a :class:`DatasetFormatError` naming the
    file, also when the bad bytes come up while the caller streams the lines. A UTF-8 byte-order
    mark, as spreadsheet programs write, is dropped. ``what`` names the file's role in the error.
    """
    compressed = path.endswith(".gz")
    try:
        f = (gzip.open if compressed else open)(path, "rt", encoding="utf-8-sig", newline=newline)
    except FileNotFoundError:
        raise DatasetFormatError(f"{what} {path} does not exist") from None
    with f:
        try:
            yield f
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.end].hex(" ")
            raise DatasetFormatError(
                f"{what} {path} is not UTF-8 text (bytes {bad}: {exc.reason}); save it as UTF-8"
            ) from None
        except (gzip.BadGzipFile, EOFError) as exc:
            if not compressed:
                raise
            raise DatasetFormatError(f"{what} {path} is not a complete gzip file ({exc})") from None


def resolve_inside(root: str, relative: str, what: str) -> str:
    """Join ``relative`` to ``root`` and refuse anything that lands outside ``root`` (absolute paths,
    ``..``). The check is on the path as written: symlinks the user placed inside the root (e.g. an
    image folder on another disk) are followed, as a path from an annotation file cannot create them."""
    if not isinstance(relative, str) or not relative:
        raise DatasetFormatError(f"{what}: path must be a non-empty string, got {relative!r}")
    if os.path.isabs(relative):
        raise DatasetFormatError(f"{what}: path {relative!r} is absolute; it must be relative to the root {root}")
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, full]) != base:
        raise DatasetFormatError(f"{what}: path {relative!r} escapes the dataset root {root}")
    return full


class LabelledImageDataset(Dataset):
    """Base of the map-style datasets. Subclasses implement ``__len__``, ``load_image(index)``
    (PIL RGB or ``None`` when skipped), ``get_target(index)`` and set ``classes``."""

    classes: list[str]

    def __init__(
        self,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        bad_images: str = "raise",
    ):
        self.transform = transform
        self.target_transform = target_transform
        self.bad_images = check_policy(bad_images)

    def load_image(self, index: int) -> Image.Image | None:
        raise NotImplementedError

    def get_target(self, index: int) -> Any:
        raise NotImplementedError

    def get_targets(self) -> np.ndarray:
        raise NotImplementedError

    def get_group_ids(self) -> list | None:
        return None

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if image is None:  # skipped by the bad-image policy; SkipBadSamples drops it
            return None
        target = self.get_target(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def default_data_dir() -> str:
    """Where downloads and caches go: ``$DINOV2_DATA`` or ``~/.cache/dinov2-data``."""
    return os.environ.get("DINOV2_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "dinov2-data")


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write via a temporary file in the same directory, then rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
