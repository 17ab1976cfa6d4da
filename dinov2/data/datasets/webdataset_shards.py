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
headers of local shards, taken from a shard list's sample counts, or else read once) and, within
the shard it resumes in, reads the remaining skipped samples without decoding them.
:class:`~dinov2.data.loaders.ResumableDataLoader` saves and restores this position.

Shards may live anywhere :mod:`~dinov2.data.datasets.shard_sources` reads from (local paths,
``http(s)://``, ``s3://`` and the other fsspec protocols, ``pipe:`` commands), named by brace
patterns in ``urls`` or listed in a ``shard_list`` file. Each is read as a stream through a
:class:`~dinov2.data.datasets.shard_sources.ShardStream`, which retries broken reads, and the tar
reader here refuses an archive that stops without its end-of-archive block: ``tarfile`` ends an
archive quietly at a missing or garbled header, so a truncated shard would be a short epoch.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import tarfile
from typing import Iterator

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from dinov2.data.datasets.base import BAD_IMAGES_KEY, DatasetFormatError
from dinov2.data.datasets.shard_sources import ShardReadError, ShardStream, is_local, read_shard_list, read_text
from dinov2.data.image_io import check_policy, decode_image_bytes
from dinov2.data.samplers import default_rank_and_world_size
from dinov2.data.spec import DatasetSpecError, SpecKey, parse_bool

logger = logging.getLogger("dinov2")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Tar members webdataset's tar reader leaves out of every sample (``__*__`` metadata entries).
_SKIPPED_MEMBER = re.compile(r"__[^/]*__($|/)")


def read_class_list(path: str, **stream_options) -> list[str]:
    """Class names from a JSON list (or ``{"classes": [...]}``) or a text file with one name per
    line, at a local path or a URL."""
    text = read_text(path, "class list", **stream_options)
    if path.endswith(".json"):
        content = json.loads(text)
        content = content.get("classes") if isinstance(content, dict) else content
        if not isinstance(content, list):
            raise DatasetFormatError(f"class list {path}: expected a JSON list or an object with 'classes'")
        return [str(c) for c in content]
    return [line.strip() for line in text.splitlines() if line.strip()]


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Notes on the archive why ``tarfile`` stopped reading headers. It stops at the zero block that
    ends an archive, but also, quietly, at a header that is missing, cut short or garbled (after the
    first), which is what a shard cut off mid-transfer or mid-upload looks like."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            tarfile_.dinov2_unfinished = None  # the end-of-archive block
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            tarfile_.dinov2_unfinished = str(exc)
            raise


def shard_members(stream: ShardStream) -> Iterator[dict]:
    """The regular tar members of one shard as webdataset's grouping takes them
    (``{"fname", "data", "__url__"}``), ``__*__`` metadata members left out.

    Raises :class:`DatasetFormatError` for an archive that is damaged or ends without its
    end-of-archive block; a :class:`ShardReadError` of the stream gets the last member read added.
    """
    url, last = stream.url, None

    def reached() -> str:
        return f"; the last complete member was {last!r}" if last else "; no member was complete"

    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo)
        tar.dinov2_unfinished = "no end-of-archive block"
        for info in tar:
            if not info.isreg() or _SKIPPED_MEMBER.match(info.name):
                continue
            data = tar.extractfile(info).read()
            last = info.name
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # a streamed archive would keep every member's header otherwise
    except tarfile.TarError as exc:
        raise DatasetFormatError(
            f"WebDataset shard {url} is not a readable tar archive ({exc}) after {stream.position} bytes{reached()}"
        ) from None
    except ShardReadError as exc:
        raise ShardReadError(f"{exc}{reached()}") from exc
    if tar.dinov2_unfinished is not None:
        raise DatasetFormatError(
            f"WebDataset shard {url} ends after {stream.position} bytes without the tar end-of-archive block "
            f"({tar.dinov2_unfinished}){reached()}: the shard is truncated or damaged"
        )


def shard_samples(url: str, expected: int | None = None, **stream_options) -> Iterator[dict]:
    """The undecoded samples of one shard (tar members grouped by key, by webdataset);
    ``expected``: the sample count a shard list gave, checked once the shard is read."""
    count = 0
    with ShardStream(url, **stream_options) as stream:
        for sample in wds.tariterators.group_by_keys(shard_members(stream)):
            count += 1
            yield sample
    if expected is not None and count != expected:
        raise DatasetFormatError(
            f"WebDataset shard {url} holds {count} samples but its shard list says {expected}: "
            "a resumed run would skip the wrong samples; fix the list's nsamples"
        )


def count_shard_samples(url: str, **stream_options) -> int:
    """Number of samples in one shard, as webdataset's tar reader groups members into samples.

    A local shard is counted from its member headers (the tar is opened for random access, so the
    member data is seeked over, not read); any other is read through once.
    """
    if not is_local(url):
        return sum(1 for _ in shard_samples(url, **stream_options))
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
        "urls": SpecKey(
            str,
            "",
            "shard paths, URLs (https://, s3://, ...) or pipe: commands, brace patterns allowed: "
            "train-{000000..000031}.tar (this or shard_list)",
        ),
        "shard_list": SpecKey(
            str, "", "file (path or URL) naming the shards: one per line, or a .json index with nsamples"
        ),
        "length": SpecKey(int, 0, "number of samples (lets len() work; 0: unknown, or the shard list's total)"),
        "classes": SpecKey(str, "", "class list file (.json list or one name per line; path or URL)"),
        "shuffle": SpecKey(
            int, 0, "permute each run of N consecutive samples of a reader; also shuffles shard order (0: off)"
        ),
        "repeat": SpecKey(parse_bool, False, "loop over the shards forever (for iteration-based training)"),
        "seed": SpecKey(int, 0, "seed of the shard and sample shuffles"),
        "retries": SpecKey(int, 3, "times in a row a broken read of a remote shard is retried"),
        "retry_wait": SpecKey(float, 1.0, "seconds before the first retry (doubling for each next one)"),
        "timeout": SpecKey(float, 60.0, "seconds a connection may stall before the read counts as broken"),
        **BAD_IMAGES_KEY,
    }

    def __init__(
        self,
        urls: str | list[str] = "",
        shard_list: str = "",
        length: int = 0,
        classes: str = "",
        shuffle: int = 0,
        repeat: bool = False,
        seed: int = 0,
        retries: int = 3,
        retry_wait: float = 1.0,
        timeout: float = 60.0,
        transform=None,
        target_transform=None,
        bad_images: str = "raise",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if retries < 0 or retry_wait < 0 or timeout <= 0:
            raise DatasetSpecError(
                f"WebDataset: retries ({retries}) and retry_wait ({retry_wait}) must be >= 0, timeout ({timeout}) > 0"
            )
        # Passed to every ShardStream (shards, and shard and class lists at a URL).
        self.stream_options = {"retries": int(retries), "retry_wait": float(retry_wait), "timeout": float(timeout)}
        if bool(urls) == bool(shard_list):
            raise DatasetSpecError("WebDataset needs exactly one of urls=<shards> and shard_list=<file>")
        self._shard_sizes: dict[str, int] = {}
        if shard_list:
            listed = read_shard_list(shard_list, **self.stream_options)
            self.shards = [url for url, _ in listed]
            self._shard_sizes = {url: count for url, count in listed if count is not None}
            self._listed_sizes = dict(self._shard_sizes)  # checked when a shard has been read
            if not length and len(self._shard_sizes) == len(set(self.shards)):
                length = sum(count for _, count in listed)
        else:
            self.shards = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
            self._listed_sizes = {}
        missing = [s for s in self.shards if is_local(s) and not os.path.isfile(s)]
        if missing:
            raise DatasetFormatError(f"WebDataset shard(s) not found: {missing[:5]} (of {len(self.shards)})")
        self.length = length
        self.classes = read_class_list(classes, **self.stream_options) if classes else []
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
            if not is_local(url):
                logger.info("counting the samples of %s by reading it (a shard list with nsamples saves this)", url)
            self._shard_sizes[url] = count_shard_samples(url, **self.stream_options)
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
        samples = itertools.chain.from_iterable(
            shard_samples(url, self._listed_sizes.get(url), **self.stream_options) for url in shards[first:]
        )
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
