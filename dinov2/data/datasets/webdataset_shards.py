"""WebDataset tar shards, streamed.

Each sample is a group of tar members sharing a key: an image (``jpg``, ``jpeg``, ``png`` or
``webp``), an optional ``cls`` (the integer label; -1 when absent) and optional ``json`` metadata.
Shards are dealt to ranks (``shards[rank::world_size]``, rank and world size taken when the dataset
is built) and then to loader workers (``webdataset.split_by_worker``), so every (rank, worker) pair
reads disjoint shards: use at least ``world_size * num_workers`` shards or some readers get none.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import webdataset as wds
from torch.utils.data import IterableDataset

from dinov2.data.datasets.base import BAD_IMAGES_KEY, DatasetFormatError
from dinov2.data.image_io import check_policy, decode_image_bytes
from dinov2.data.samplers import default_rank_and_world_size
from dinov2.data.spec import SpecKey, parse_bool

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def read_class_list(path: str) -> list[str]:
    """Class names from a JSON list (or ``{"classes": [...]}``) or a text file with one name per line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DatasetFormatError(f"class list {path} does not exist") from None
    if path.endswith(".json"):
        content = json.loads(text)
        content = content.get("classes") if isinstance(content, dict) else content
        if not isinstance(content, list):
            raise DatasetFormatError(f"class list {path}: expected a JSON list or an object with 'classes'")
        return [str(c) for c in content]
    return [line.strip() for line in text.splitlines() if line.strip()]


class WebDatasetStream(IterableDataset):
    SPEC_KEYS = {
        "urls": SpecKey(str, help="shard paths or URLs, brace patterns allowed: train-{000000..000031}.tar"),
        "length": SpecKey(int, 0, "number of samples (lets len() work; 0: unknown)"),
        "classes": SpecKey(str, "", "class list file (.json list or one name per line)"),
        "shuffle": SpecKey(int, 0, "sample shuffle buffer size; also shuffles shard order (0: off)"),
        "repeat": SpecKey(parse_bool, False, "loop over the shards forever (for iteration-based training)"),
        "seed": SpecKey(int, 0, "seed of the shard and sample shuffles"),
        **BAD_IMAGES_KEY,
    }

    def __init__(self, urls: str, length: int = 0, classes: str = "", shuffle: int = 0, repeat: bool = False,
                 seed: int = 0, transform=None, target_transform=None, bad_images: str = "raise",
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.shards = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
        local = [s for s in self.shards if "://" not in s and not s.startswith("pipe:")]
        missing = [s for s in local if not os.path.isfile(s)]
        if missing:
            raise DatasetFormatError(f"WebDataset shard(s) not found: {missing[:5]} (of {len(self.shards)})")
        self.length = length
        self.classes = read_class_list(classes) if classes else []
        self.shuffle = shuffle
        self.repeat = repeat
        self.seed = seed
        self.transform = transform
        self.target_transform = target_transform
        self.bad_images = check_policy(bad_images)
        # Fixed here, in the main process: loader workers have no process group to ask.
        self.rank, self.world_size = default_rank_and_world_size(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rank_shards(self, urls):
        return list(urls)[self.rank :: self.world_size]

    def __len__(self) -> int:
        if not self.length:
            raise TypeError("this WebDataset has no length; add length=N to its spec")
        return self.length

    def _pipeline(self, epoch: int):
        shardshuffle = max(1, min(len(self.shards), 100)) if self.shuffle else False
        stream = wds.WebDataset(
            self.shards,
            shardshuffle=shardshuffle,
            nodesplitter=self._rank_shards,
            workersplitter=wds.split_by_worker,
            empty_check=False,
            seed=self.seed + epoch,
        )
        if self.shuffle:
            stream = stream.shuffle(self.shuffle, seed=self.seed + epoch)
        return stream

    def _sample(self, raw: dict):
        name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            raise DatasetFormatError(f"WebDataset sample {name} has no image member ({'/'.join(IMAGE_KEYS)}); "
                                     f"members: {sorted(k for k in raw if not k.startswith('__'))}")
        image = decode_image_bytes(raw[image_key], f"{name}.{image_key}", self.bad_images)
        if image is None:
            return None
        target = -1
        if "cls" in raw:
            try:
                target = int(raw["cls"].decode().strip())
            except ValueError:
                raise DatasetFormatError(f"WebDataset sample {name}: cls {raw['cls'][:20]!r} is not an integer") from None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        while True:
            count = 0
            for raw in self._pipeline(epoch):
                count += 1
                yield self._sample(raw)
            if not self.repeat or count == 0:  # an empty reader must not spin forever
                return
            epoch += 1  # a new pass reshuffles differently
