"""Class-folder layout (``<root>/<class>/**/<image>``), with a directory index cache.

Scanning a million files takes tens of seconds on network storage, so the listing is cached in
``<cache_dir>/index-cache/<hash of the folder path>.json`` together with the modification time of
every directory it covers; a later start stats only the directories, and rescans when any of them
changed (adding or removing a file changes its directory's mtime). Nothing is written into the
dataset folder itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
from PIL import Image

from dinov2.data.datasets.base import (
    BAD_IMAGES_KEY,
    IMAGE_EXTENSIONS,
    DatasetFormatError,
    LabelledImageDataset,
    default_data_dir,
    write_bytes_atomic,
)
from dinov2.data.image_io import load_image_file
from dinov2.data.spec import SpecKey, parse_bool

logger = logging.getLogger("dinov2")
_INDEX_VERSION = 1

CACHE_KEYS = {
    "cache": SpecKey(parse_bool, True, "keep a directory index cache for fast start-up"),
    "cache_dir": SpecKey(str, "", "where the index cache goes (default $DINOV2_DATA or ~/.cache/dinov2-data)"),
}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _scan(directory: str, class_folders: bool) -> dict:
    """List images under ``directory`` with os.scandir; returns the index dict (without mtimes checked)."""
    dirs: dict[str, int] = {".": os.stat(directory).st_mtime_ns}
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []

    def walk(relative: str, label: int) -> None:
        stack = [relative]
        while stack:
            current = stack.pop()
            with os.scandir(os.path.join(directory, current)) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                rel = os.path.join(current, entry.name)
                if entry.is_dir(follow_symlinks=True):
                    if not entry.name.startswith("."):
                        dirs[rel] = entry.stat().st_mtime_ns
                        stack.append(rel)
                elif _is_image(entry.name):
                    paths.append(rel)
                    labels.append(label)

    if class_folders:
        with os.scandir(directory) as it:
            class_entries = sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
        for label, entry in enumerate(class_entries):
            classes.append(entry.name)
            dirs[entry.name] = entry.stat().st_mtime_ns
            walk(entry.name, label)
    else:
        walk(".", -1)
        paths = [os.path.normpath(p) for p in paths]
    return {"version": _INDEX_VERSION, "dirs": dirs, "classes": classes, "paths": paths, "labels": labels}


def _still_valid(directory: str, index: dict) -> bool:
    for rel, mtime in index["dirs"].items():
        try:
            if os.stat(os.path.join(directory, rel)).st_mtime_ns != mtime:
                return False
        except FileNotFoundError:
            return False
    return True


def index_cache_path(directory: str, cache_dir: str = "") -> str:
    digest = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:20]
    return os.path.join(cache_dir or default_data_dir(), "index-cache", f"{digest}.json")


def index_image_folder(directory: str, class_folders: bool = True, cache: bool = True, cache_dir: str = "") -> dict:
    """Return ``{"classes", "paths" (relative), "labels"}`` for ``directory``, using the cache when valid."""
    if not os.path.isdir(directory):
        raise DatasetFormatError(f"image folder {directory} is not a directory")
    cache_path = index_cache_path(directory, cache_dir) if cache else None
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as f:
                index = json.load(f)
            if (
                index.get("version") == _INDEX_VERSION
                and index.get("class_folders") == class_folders
                and _still_valid(directory, index)
            ):
                return index
        except (OSError, ValueError) as exc:  # a broken cache is rebuilt, never trusted
            logger.warning("ignoring unreadable index cache %s (%s)", cache_path, exc)
    index = _scan(directory, class_folders)
    index["class_folders"] = class_folders
    if class_folders and not index["classes"]:
        raise DatasetFormatError(f"image folder {directory} has no class sub-folders")
    if not index["paths"]:
        raise DatasetFormatError(f"image folder {directory} holds no images with extensions {IMAGE_EXTENSIONS}")
    if cache_path:
        try:
            write_bytes_atomic(cache_path, json.dumps(index).encode())
        except OSError as exc:  # read-only home: run without the cache, but say so
            logger.warning("cannot write index cache %s (%s); the folder will be rescanned next time", cache_path, exc)
    return index


class ImageFolderDataset(LabelledImageDataset):
    """``<root>/<class>/...`` with classes sorted by folder name."""

    SPEC_KEYS = {
        "root": SpecKey(str, help="folder with one sub-folder per class"),
        **CACHE_KEYS,
        **BAD_IMAGES_KEY,
    }

    def __init__(
        self,
        root: str,
        transform=None,
        target_transform=None,
        bad_images: str = "raise",
        cache: bool = True,
        cache_dir: str = "",
        class_folders: bool = True,
    ):
        super().__init__(transform, target_transform, bad_images)
        self.root = root
        index = index_image_folder(root, class_folders=class_folders, cache=cache, cache_dir=cache_dir)
        self.classes = list(index["classes"])
        self._paths = index["paths"]
        self._targets = np.asarray(index["labels"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def get_image_path(self, index: int) -> str:
        return os.path.join(self.root, self._paths[index])

    def load_image(self, index: int) -> Image.Image | None:
        return load_image_file(self.get_image_path(index), self.bad_images)

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def get_targets(self) -> np.ndarray:
        return self._targets.copy()
