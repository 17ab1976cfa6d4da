"""Industrial inspection layout (MMPretrain-style JSON annotations with part groups).

::

    <root>/annotations/{train,val,test}.json
    <root>/<split>/<group_id>/<group_id>-<k>.jpeg

Each annotation file is ``{"metainfo": {"classes": [...]}, "data_list": [{"img_path", "gt_label",
"group_id"}, ...]}``. ``img_path`` is relative to the root (``train/g01/g01-0.jpeg``); a path
relative to the split folder (``g01/g01-0.jpeg``) is accepted as well. Everything is validated on
load: unknown label index, missing file, a path that escapes the root, and a group that appears in
train and in val or test (val and test may share groups; many datasets use the same file for both).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from dinov2.data.datasets.base import (
    BAD_IMAGES_KEY,
    DatasetFormatError,
    LabelledImageDataset,
    open_text,
    resolve_inside,
)
from dinov2.data.image_io import load_image_file
from dinov2.data.spec import SpecKey, parse_bool

SPLITS = ("train", "val", "test")


def annotation_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"{split}.json")


def read_annotations(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Read one annotation file; check its structure and return (classes, data_list)."""
    try:
        with open_text(path, "annotation file") as f:
            content = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"annotation file {path} is not valid JSON: {exc}") from None
    if not isinstance(content, dict) or "data_list" not in content:
        raise DatasetFormatError(f"annotation file {path}: expected an object with 'metainfo' and 'data_list'")
    classes = content.get("metainfo", {}).get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DatasetFormatError(f"annotation file {path}: 'metainfo.classes' must be a non-empty list of names")
    entries = content["data_list"]
    if not isinstance(entries, list):
        raise DatasetFormatError(f"annotation file {path}: 'data_list' must be a list")
    for number, entry in enumerate(entries):
        missing = [k for k in ("img_path", "gt_label", "group_id") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DatasetFormatError(f"annotation file {path}: data_list[{number}] lacks {', '.join(missing)}")
    return classes, entries


def _group_key(group_id: Any) -> str:
    return str(group_id)


class IndustrialDataset(LabelledImageDataset):
    SPEC_KEYS = {
        "root": SpecKey(str, help="dataset root holding annotations/ and the split folders"),
        "split": SpecKey(str, "train", "train, val or test", SPLITS),
        "check_groups": SpecKey(parse_bool, True, "refuse groups shared between train and val/test"),
        **BAD_IMAGES_KEY,
    }

    def __init__(
        self,
        root: str,
        split: str = "train",
        transform=None,
        target_transform=None,
        bad_images: str = "raise",
        check_groups: bool = True,
    ):
        super().__init__(transform, target_transform, bad_images)
        if split not in SPLITS:
            raise ValueError(f"Industrial split must be one of {SPLITS}, got {split!r}")
        if not os.path.isdir(root):
            raise DatasetFormatError(f"Industrial dataset root {root} is not a directory")
        self.root = root
        self.split = split
        path = annotation_path(root, split)
        self.classes, entries = read_annotations(path)
        self._paths: list[str] = []
        self._group_ids: list[Any] = []
        targets = []
        for number, entry in enumerate(entries):
            what = f"{path}: data_list[{number}] ({entry['img_path']!r})"
            label = entry["gt_label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(self.classes):
                raise DatasetFormatError(
                    f"{what}: gt_label {label!r} is not a class index in 0..{len(self.classes) - 1} ({self.classes})"
                )
            self._paths.append(self._locate(entry["img_path"], what))
            self._group_ids.append(entry["group_id"])
            targets.append(label)
        self._targets = np.asarray(targets, dtype=np.int64)
        if check_groups:
            self._check_group_leak(path)

    def _locate(self, img_path: str, what: str) -> str:
        candidates = [resolve_inside(self.root, img_path, what)]
        split_dir = os.path.join(self.root, self.split)
        if os.path.isdir(split_dir):
            candidates.append(resolve_inside(self.root, os.path.join(self.split, img_path), what))
        for candidate in candidates:
            if os.path.isfile(candidate):
                return candidate
        raise DatasetFormatError(f"{what}: image file not found (looked for {' and '.join(candidates)})")

    def _check_group_leak(self, own_path: str) -> None:
        """A part group must not be both in train and in an evaluation split."""
        if self.split == "train":
            others = [s for s in ("val", "test") if os.path.isfile(annotation_path(self.root, s))]
            train_groups = {_group_key(g): i for i, g in enumerate(self._group_ids)}
            for other in others:
                other_path = annotation_path(self.root, other)
                _, entries = read_annotations(other_path)
                for number, entry in enumerate(entries):
                    if _group_key(entry["group_id"]) in train_groups:
                        raise DatasetFormatError(
                            f"group {entry['group_id']!r} is split across train and {other}: "
                            f"{other_path}: data_list[{number}] ({entry['img_path']!r}) and "
                            f"{own_path}: data_list[{train_groups[_group_key(entry['group_id'])]}]"
                        )
        else:
            train_path = annotation_path(self.root, "train")
            if not os.path.isfile(train_path):
                return
            _, train_entries = read_annotations(train_path)
            train_groups = {_group_key(e["group_id"]): i for i, e in enumerate(train_entries)}
            for number, (group, _path) in enumerate(zip(self._group_ids, self._paths)):
                if _group_key(group) in train_groups:
                    raise DatasetFormatError(
                        f"group {group!r} is split across train and {self.split}: "
                        f"{own_path}: data_list[{number}] and {train_path}: data_list[{train_groups[_group_key(group)]}]"
                    )

    def __len__(self) -> int:
        return len(self._paths)

    def load_image(self, index: int) -> Image.Image | None:
        return load_image_file(self._paths[index], self.bad_images)

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def get_targets(self) -> np.ndarray:
        return self._targets.copy()

    def get_group_ids(self) -> list:
        return list(self._group_ids)

    def get_image_path(self, index: int) -> str:
        return self._paths[index]
