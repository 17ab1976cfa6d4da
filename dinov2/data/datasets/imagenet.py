"""ImageNet in its standard layout, read directly (no metadata preparation step)::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG        (class-folder validation set)
    <root>/test/*.JPEG              (optional, unlabelled: targets are -1)

Classes are the wnids in sorted order (the usual 0..999 indices). With ``labels=<file>`` the
``classes`` are human-readable names; the file holds one class per line, either ``wnid,name``
or ``wnid name`` (the ``LOC_synset_mapping.txt`` form). ``class_ids`` always holds the wnids.
"""

from __future__ import annotations

import os

from dinov2.data.datasets.base import BAD_IMAGES_KEY, DatasetFormatError, open_text
from dinov2.data.datasets.image_folder import CACHE_KEYS, ImageFolderDataset
from dinov2.data.spec import SpecKey

SPLITS = ("TRAIN", "VAL", "TEST")


def read_class_names(path: str) -> dict[str, str]:
    """``wnid -> name`` from a labels file (``wnid,name`` or ``wnid name`` per line)."""
    names: dict[str, str] = {}
    with open_text(path, "ImageNet labels file") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        head = line.partition(",")[0]
        if "," in line and not head.strip().count(" "):
            wnid, _, name = line.partition(",")
        else:
            wnid, _, name = line.strip().partition(" ")
        wnid, name = wnid.strip(), name.strip()
        if not wnid or not name:
            raise DatasetFormatError(f"ImageNet labels file {path}, line {number}: expected 'wnid,name', got {line!r}")
        names[wnid] = name
    return names


class ImageNetDataset(ImageFolderDataset):
    SPEC_KEYS = {
        "root": SpecKey(str, help="ImageNet root holding train/ and val/"),
        "split": SpecKey(str.upper, "TRAIN", "TRAIN, VAL or TEST", SPLITS),
        "labels": SpecKey(str, "", "optional class-name file: 'wnid,name' or 'wnid name' per line"),
        **CACHE_KEYS,
        **BAD_IMAGES_KEY,
    }

    def __init__(
        self,
        root: str,
        split: str = "TRAIN",
        labels: str = "",
        transform=None,
        target_transform=None,
        bad_images: str = "raise",
        cache: bool = True,
        cache_dir: str = "",
    ):
        split = split.upper()
        if split not in SPLITS:
            raise ValueError(f"ImageNet split must be one of {SPLITS}, got {split!r}")
        directory = os.path.join(root, split.lower())
        if not os.path.isdir(directory):
            raise DatasetFormatError(f"ImageNet split folder {directory} does not exist")
        super().__init__(
            directory, transform, target_transform, bad_images, cache, cache_dir, class_folders=split != "TEST"
        )
        self.split = split
        if split == "TEST":
            # Unlabelled: keep the class list of train so that predictions have names.
            train_dir = os.path.join(root, "train")
            self.classes = (
                sorted(e.name for e in os.scandir(train_dir) if e.is_dir()) if os.path.isdir(train_dir) else []
            )
        self.class_ids = list(self.classes)
        if labels:
            names = read_class_names(labels)
            missing = [w for w in self.class_ids if w not in names]
            if missing:
                raise DatasetFormatError(f"ImageNet labels file {labels} has no name for class(es) {missing[:5]}")
            self.classes = [names[w] for w in self.class_ids]
