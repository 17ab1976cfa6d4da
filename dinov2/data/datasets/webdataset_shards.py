"""WebDataset tar shards, streamed, with a position that can be saved and restored.

Each sample is a group of tar members sharing a key: an image (``jpg``, ``jpeg``, ``png`` or
``webp``), an optional ``cls`` (the integer label; -1 when absent) and optional ``json`` metadata.
The ``webdataset`` library reads the tars and groups their members into samples.

Every pass (epoch ``e``) over the shards is a deterministic function of ``(seed, e, rank, worker)``,
so a resumed run can continue exactly where it stopped:

* shards: dealt to ranks (``shards[rank::world_size]``, rank and world size taken when the dataset
  is built) and then to loader workers (``[worker::num_workers]``), so every (rank, worker)
  *reader* owns disjoint shards (use at least ``world_size * num_workers`` shards). A reader keeps
  its shards in every pass; with ``shuffle`` their order is a permutation seeded by
  ``(seed, e, rank, worker)``. Keeping them makes every pass of a reader equally long, so a
  resume skips whole passes by arithmetic and counts only the reader's own shards. (A batch comes
  from one worker and a shuffle run spans one or two shards either way, so re-dealing shards each
  pass would barely change what a batch mixes.)
* samples: ``shuffle=N`` permutes each run of ``N`` consecutive samples of a reader's pass with a
  generator seeded by ``(seed, e, rank, worker, run)``. (webdataset's own shuffle buffer is not used:
  its state cannot be saved, and replaying it means reading the whole pass again.)

The DataLoader takes batches from its workers round-robin (batch ``b`` from worker ``b %
num_workers``), so the number of batches a rank consumed fixes how many samples each of its readers
consumed. :meth:`WebDatasetStream.start_at_batch` makes the stream continue after that many batches:
each reader skips its consumed samples by whole passes and whole shards (counted from the tar
headers of local shards) and, within the shard it resumes in, reads the remaining skipped samples
without decoding them. :class:`~dinov2.data.loaders.ResumableDataLoader` saves and restores this
position.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
from typing import Iterator

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from dinov2.data.datasets.base import BAD_IMAGES_KEY, DatasetFormatError, open_text
from dinov2.data.image_io import check_policy, decode_image_bytes
from dinov2.data.samplers import default_rank_and_world_size
from dinov2.data.spec import SpecKey, parse_bool

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Tar members webdataset's tar reader leaves out of every sample (``__*__`` metadata entries).
_SKIPPED_MEMBER = re.compile(r"__[^/]*__($|/)")


def read_class_list(path: str) -> list[str]:
    """Class names from a JSON list (or ``{"classes": [...]}``) or a text file with one name per line."""
    with open_text(path, "class list") as f:
        text = f.read()
    if path.endswith(".json"):
        content = json.loads(text)
        content = content.get("classes") if isinstance(content, dict) else content
        if not isinstance(content, list):
            raise DatasetFormatError(f"class list {path}: expected a JSON list or an object with 'classes'")
        return [str(c) for c in content]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_shard_samples(url: str) -> int:
    """Number of samples in one shard, as webdataset's tar reader groups members into samples.

    A local shard is counted from its member headers (the tar is opened for random access, so the
    member data is seeked over, not read); a remote one is read through the library once.
    """
    if not _is_local(url):
        return sum(1 for _ in wds.tariterators.tarfile_samples([{"url": url}]))
    count, key = 0, None
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isreg() or _SKIPPED_MEMBER.match(member.name):
                continue
            prefix, _ = wds.tariterators.base_plus_ext(member.name)
            if prefix is not None and prefix != key:  # a new key starts a new sample
                count, key = count + 1, prefix
    return count


class WebDatasetStream(IterableDataset):
    SPEC_KEYS = {
        "urls": SpecKey(str, help="shard paths or URLs, brace patterns allowed: train-{000000..000031}.tar"),
        "length": SpecKey(int, 0, "number of samples (lets len() work; 0: unknown)"),
        "classes": SpecKey(str, "", "class list file (.json list or one name per line)"),
        "shuffle": SpecKey(
            int, 0, "permute each run of N consecutive samples of a reader; also shuffles shard order (0: off)"
        ),
        "repeat": SpecKey(parse_bool, False, "loop over the shards forever (for iteration-based training)"),
        "seed": SpecKey(int, 0, "seed of the shard and sample shuffles"),
        **BAD_IMAGES_KEY,
    }

    def __init__(
        self,
        urls: str,
        length: int = 0,
        classes: str = "",
        shuffle: int = 0,
        repeat: bool = False,
        seed: int = 0,
        transform=None,
        target_transform=None,
        bad_images: str = "raise",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.shards = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
        local = [s for s in self.shards if _is_local(s)]
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
        self.start_batches = 0  # batches of `start_batch_size` this rank consumed before (resume)
        self.start_batch_size = 0
        self._shard_sizes: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at_batch(self, batches: int, batch_size: int) -> None:
        """Continue after ``batches`` batches of ``batch_size`` samples that this rank's DataLoader
        already delivered (set before the loader's workers start; they take a copy)."""
        if batches < 0 or batch_size < 1:
            raise ValueError(f"invalid stream position: {batches} batches of {batch_size} samples")
        self.start_batches, self.start_batch_size = int(batches), int(batch_size)

    def stream_state(self) -> dict[str, int]:
        """What fixes the sample stream apart from rank, workers and batch size (checked on resume)."""
        return {
            "shards": len(self.shards),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "repeat": int(self.repeat),
            "epoch": self.epoch,
        }

    def _reader_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        own = self.shards[self.rank :: self.world_size][worker::num_workers]
        if not self.shuffle:
            return own
        order = np.random.default_rng([self.seed, epoch, self.rank, worker]).permutation(len(own))
        return [own[i] for i in order.tolist()]

    def _shard_size(self, url: str) -> int:
        if url not in self._shard_sizes:
            self._shard_sizes[url] = count_shard_samples(url)
        return self._shard_sizes[url]

    def __len__(self) -> int:
        if not self.length:
            raise TypeError("this WebDataset has no length; add length=N to its spec")
        return self.length

    def _raw_samples(self, shards: list[str], skip: int) -> Iterator[dict]:
        """The undecoded samples of ``shards`` in order, from the ``skip``-th on."""
        first = 0
        while skip and first < len(shards) and skip >= self._shard_size(shards[first]):
            skip -= self._shard_size(shards[first])
            first += 1
        samples = wds.tariterators.tarfile_samples({"url": url} for url in shards[first:])
        return itertools.islice(samples, skip, None)

    def _pass_samples(self, shards: list[str], epoch: int, worker: int, skip: int) -> Iterator[dict]:
        """One pass of a reader over its shards, shuffled in runs of ``shuffle`` samples, from the
        ``skip``-th sample on (only the run that holds it is read in full)."""
        if not self.shuffle:
            yield from self._raw_samples(shards, skip)
            return
        run = skip // self.shuffle
        samples = self._raw_samples(shards, run * self.shuffle)
        drop = skip - run * self.shuffle
        while True:
            chunk = list(itertools.islice(samples, self.shuffle))
            if not chunk:
                return
            order = np.random.default_rng([self.seed, epoch, self.rank, worker, run]).permutation(len(chunk))
            for i in order[drop:].tolist():
                yield chunk[i]
            run, drop = run + 1, 0

    def positioned_samples(self) -> Iterator[tuple[int, dict]]:
        """``(position, raw sample)`` for this reader (rank and loader worker), from the start
        position on; :meth:`decode_sample` turns a raw sample into ``(image, target)``.

        ``position`` numbers the samples of all readers uniquely: the ``n``-th sample of reader
        ``rank * num_workers + worker`` has position ``n * world_size * num_workers + reader``
        (seeded augmentation uses it). After :meth:`start_at_batch`, DataLoader worker ``j`` takes
        the role of worker ``(j + batches) % num_workers`` of the interrupted run: the resumed
        loader's first batch comes from its worker 0, and must be the one the interrupted run's
        worker ``batches % num_workers`` would have delivered next.
        """
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.start_batches) % num_workers
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker
        # Batches b < start_batches with b % num_workers == worker came from this reader.
        skip = (self.start_batches - worker + num_workers - 1) // num_workers * self.start_batch_size
        n, epoch = skip, self.epoch
        if skip:
            # Every pass of a reader covers the same shards: whole passes are skipped by arithmetic.
            length = sum(self._shard_size(url) for url in self._reader_shards(epoch, worker, num_workers))
            if length == 0 or (skip >= length and not self.repeat):
                return
            passes, skip = divmod(skip, length)
            epoch += passes
        while True:
            shards = self._reader_shards(epoch, worker, num_workers)
            count = 0
            for raw in self._pass_samples(shards, epoch, worker, skip):
                yield n * readers + reader, raw
                n, count = n + 1, count + 1
            if not self.repeat or count == 0:  # an empty reader must not spin forever
                return
            skip, epoch = 0, epoch + 1  # a new pass reshuffles differently

    def decode_sample(self, raw: dict):
        """``(image, target)`` of a raw sample, transformed; ``None`` for an image the ``skip``
        policy skipped."""
        name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            raise DatasetFormatError(
                f"WebDataset sample {name} has no image member ({'/'.join(IMAGE_KEYS)}); "
                f"members: {sorted(k for k in raw if not k.startswith('__'))}"
            )
        image = decode_image_bytes(raw[image_key], f"{name}.{image_key}", self.bad_images)
        if image is None:
            return None
        target = -1
        if "cls" in raw:
            try:
                target = int(raw["cls"].decode().strip())
            except ValueError:
                raise DatasetFormatError(
                    f"WebDataset sample {name}: cls {raw['cls'][:20]!r} is not an integer"
                ) from None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __iter__(self) -> Iterator:
        for _, raw in self.positioned_samples():
            yield self.decode_sample(raw)
