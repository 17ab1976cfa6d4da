"""Image decoding with an explicit policy for corrupted or truncated files.

``raise`` turns any decoding failure into a :class:`BadImageError` naming the file. ``skip`` logs the
file and returns ``None``; datasets pass that ``None`` on as the whole sample and
:class:`SkipBadSamples` (the collate wrapper that :func:`dinov2.data.loaders.make_data_loader` always
installs) drops it and reports how many samples of the batch were dropped. The count travels inside
the batch, so it crosses loader worker processes without any shared state.

Corrupt JPEG data behind a valid header: libjpeg notices much of it (a bad Huffman code, data left
over or missing when the last block is decoded, a restart marker out of place) but only as a
warning, and Pillow's JPEG decoder discards libjpeg's warnings (``output_message`` is a no-op in
its ``JpegDecode.c``): such a file decodes into garbage without an error. So JPEGs are decoded with
the optional ``simplejpeg`` package (libjpeg-turbo) in strict mode when it is installed, which
turns those warnings into errors for the policy above; without it, Pillow decodes them and only
truncation and fatal errors are reported. Damage that leaves a decodable stream (JPEG has no
checksum) cannot be detected by any decoder.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
from typing import Any, BinaryIO, Callable, Sequence

from PIL import Image

logger = logging.getLogger("dinov2")

BAD_IMAGE_POLICIES = ("raise", "skip")
# Key under which SkipBadSamples reports the number of dropped samples of a dict batch.
SKIPPED_KEY = "skipped_images"
# Errors PIL raises for unreadable, truncated or hostile files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class BadImageError(RuntimeError):
    """An image that cannot be decoded; the message names the file."""


def check_policy(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images policy must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    return policy


def _handle_failure(name: str, exc: BaseException, policy: str) -> None:
    if policy == "raise":
        raise BadImageError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    logger.warning("skipping unreadable image %s (%s: %s)", name, type(exc).__name__, exc)


def _to_rgb(image: Image.Image) -> Image.Image:
    # load() forces the full decode here, so truncated files fail now and not inside a transform.
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


_JPEG_MAGIC = b"\xff\xd8\xff"
# libjpeg's words (jerror.h) for a damaged stream. Other strict-mode failures are things simplejpeg
# does not do (e.g. CMYK to RGB) and leave the file to Pillow.
_CORRUPT_JPEG = re.compile(
    r"Corrupt JPEG data|Premature end of JPEG file|Bogus|Unsupported marker type|Invalid JPEG file structure"
)


@functools.lru_cache(maxsize=None)
def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _decode_jpeg_strictly(data: bytes) -> Image.Image | None:
    """An RGB image from libjpeg-turbo in strict mode, ``None`` to leave the file to Pillow.

    Raises ``ValueError`` with libjpeg's message for corrupt data. For a sound file the pixels are
    those Pillow gives (both run libjpeg with its default, accurate DCT and fancy upsampling).
    """
    simplejpeg = _simplejpeg()
    if simplejpeg is None:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace in ("CMYK", "YCCK") or (Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS):
            return None  # Pillow's CMYK conversion and its decompression-bomb check
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        if _CORRUPT_JPEG.search(str(exc)):
            raise
        return None
    return Image.fromarray(pixels)


def _decode(source: BinaryIO) -> Image.Image:
    is_jpeg = source.read(len(_JPEG_MAGIC)) == _JPEG_MAGIC
    source.seek(0)
    if is_jpeg and _simplejpeg() is not None:  # only JPEGs are read whole before the header is checked
        image = _decode_jpeg_strictly(source.read())
        if image is not None:
            return image
        source.seek(0)
    with Image.open(source) as image:
        return _to_rgb(image)


def load_image_file(path: str | os.PathLike, policy: str = "raise") -> Image.Image | None:
    """Open ``path`` as a fully decoded PIL RGB image; on failure raise or return ``None`` per ``policy``."""
    try:
        with open(path, "rb") as f:
            return _decode(f)
    except FileNotFoundError:
        # A missing file is a dataset error, not a corrupted image: never skipped.
        raise
    except _DECODE_ERRORS as exc:
        _handle_failure(os.fspath(path), exc, policy)
        return None


def decode_image_bytes(data: bytes, name: str, policy: str = "raise") -> Image.Image | None:
    """Decode encoded image bytes (e.g. from a tar shard); ``name`` identifies them in errors."""
    try:
        return _decode(io.BytesIO(data))
    except _DECODE_ERRORS as exc:
        _handle_failure(name, exc, policy)
        return None


class SkipBadSamples:
    """Collate wrapper that drops ``None`` samples (images skipped by the ``skip`` policy).

    * dict batches (e.g. the DINO training collate) get an extra integer entry
      ``batch["skipped_images"]``: the number of samples dropped from this batch;
    * other batches (tuples/lists from ``default_collate``) are returned unchanged; every skipped
      file was already logged by the worker that read it;
    * a batch whose samples were all skipped comes out as ``{"skipped_images": n}`` alone, which a
      loop adds to its counter and then moves past.
    """

    def __init__(self, collate_fn: Callable[[list], Any] | None = None):
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn

    def __call__(self, samples: Sequence[Any]) -> Any:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return {SKIPPED_KEY: skipped}
        batch = self.collate_fn(kept)
        if isinstance(batch, dict):
            batch[SKIPPED_KEY] = skipped
        return batch
