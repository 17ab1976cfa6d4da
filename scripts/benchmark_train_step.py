"""Time the SSL training step of a recipe and report model FLOPs utilisation (MFU).

    python scripts/benchmark_train_step.py [--config-file configs/train/quickdraw_vit_tiny.yaml]
        [--threads N] [--warmup 3] [--steps 10] [--loader-steps 10] [key=value ...]

1. Builds the recipe's :class:`~dinov2.train.trainer.SSLTrainer` (output in a temporary folder,
   k-NN monitor off) and pre-builds a few batches with its data loader.
2. Times ``train_step`` (forward, backward, clipping, AdamW step, EMA teacher update) on the
   pre-built batches: median after ``--warmup`` steps.
3. Counts the FLOPs of one step with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
   attention, convolutions: the model FLOPs; element-wise work is not counted).
4. Measures this machine's fp32 matmul rate in the same process and with the same threads: three
   1024 x 1024 ``torch.mm`` after every timed step, so both see the same machine load.
5. MFU = step FLOPs / median step time / median matmul rate (also against the best matmul
   sample, the less flattering figure when other processes compete for the cores). A recipe that
   computes in bf16/fp16 (``compute_precision.param_dtype``) is also measured against the matmul
   rate of that dtype; ``compute_precision.param_dtype=fp32`` gives the fp32 reference step.
6. Times steps that pull their batch from the real loader (the recipe's ``train.num_workers``),
   and reports the overhead against the pre-built steps (measured before and after, averaged).

Prints step time, images/s (one image = its 2 global + N local crops; global crops/s also shown),
FLOPs, matmul rate, MFU, loader overhead and the load average. The machine is shared: the load
average tells how much the figures are inflated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_rate(size: int = 1024, repeats: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of ``size x size @ size x size`` in ``dtype`` on the CPU/GPU default device."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def step_flops(trainer, batch) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    return counter.get_total_flops()


def timed_steps(trainer, batches, n: int, rates=None, compute_dtype: torch.dtype = torch.float32):
    """Step times; with ``rates`` (a dict dtype -> list) also the matmul rates after each step."""
    times = []
    for _ in range(n):
        batch = next(batches)
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
        if rates is not None:
            for dtype in {torch.float32, compute_dtype}:
                rates.setdefault(dtype, []).append(matmul_rate(repeats=3, dtype=dtype))
    return times


def loader_steps(trainer, data_iter, n: int):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        batch = next(data_iter)
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/train/quickdraw_vit_tiny.yaml")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps on pre-built batches (per phase)")
    parser.add_argument("--loader-steps", type=int, default=10, help="timed steps with the real loader (0: skip)")
    parser.add_argument("--prebuilt-batches", type=int, default=4)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dinov2.train.ssl_meta_arch import PRECISIONS
    from dinov2.train.trainer import SSLTrainer
    from dinov2.utils.config import load_config

    overrides = [o for o in args.opts if o != "--"] + ["evaluation.knn_period_iterations=0"]
    cfg = load_config(args.config_file, overrides)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        trainer = SSLTrainer(cfg, output_dir=tmp)
        data_iter = iter(trainer.loader)
        prebuilt = [next(data_iter) for _ in range(args.prebuilt_batches)]
        batches = cycle(prebuilt)
        batch_size = int(cfg.train.batch_size_per_gpu)
        n_local = int(cfg.crops.local_crops_number)

        # A bf16 recipe's matmuls run at the bf16 rate (several times the fp32 one on CPUs with
        # AVX512-BF16/AMX), so its MFU is also given against the rate of its own dtype.
        compute_dtype = PRECISIONS[cfg.compute_precision.param_dtype]
        timed_steps(trainer, batches, args.warmup)
        flops = step_flops(trainer, next(batches))
        rates: dict = {}
        before = timed_steps(trainer, batches, args.steps, rates, compute_dtype)
        with_loader, after = [], []
        if args.loader_steps > 0:
            with_loader = loader_steps(trainer, data_iter, args.loader_steps)
            after = timed_steps(trainer, batches, args.steps, rates, compute_dtype)
        load_end = os.getloadavg()

    step = statistics.median(before + after)
    rate, best_rate = statistics.median(rates[torch.float32]), max(rates[torch.float32])
    achieved = flops / step
    print(f"recipe: {args.config_file} {' '.join(overrides)}")
    print(
        f"threads: {torch.get_num_threads()}, batch {batch_size} images x (2 global {cfg.crops.global_crops_size}px + "
        f"{n_local} local {cfg.crops.local_crops_size}px), loader workers {cfg.train.num_workers}"
    )
    print(
        f"step time (median of {len(before + after)} pre-built-batch steps after {args.warmup} warm-up): {step * 1000:.0f} ms"
    )
    print(f"throughput: {batch_size / step:.1f} images/s ({2 * batch_size / step:.1f} global crops/s)")
    print(f"model FLOPs per step (FlopCounterMode): {flops / 1e9:.1f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s")
    print(
        f"fp32 matmul rate (3 x 1024^3 torch.mm after each step, same threads): median {rate / 1e9:.1f}, "
        f"best {best_rate / 1e9:.1f} GFLOP/s over {len(rates[torch.float32])} samples"
    )
    print(
        f"MFU: {100 * achieved / rate:.1f}% of the median fp32 matmul rate ({100 * achieved / best_rate:.1f}% of the best)"
    )
    if compute_dtype != torch.float32:
        name = cfg.compute_precision.param_dtype
        low_rate = statistics.median(rates[compute_dtype])
        print(
            f"{name} matmul rate (same products): median {low_rate / 1e9:.1f} GFLOP/s -> "
            f"MFU {100 * achieved / low_rate:.1f}% of the {name} rate (the recipe computes in {name})"
        )
    if with_loader:
        first, second = statistics.median(before), statistics.median(after)
        reference = 0.5 * (first + second)
        real = statistics.median(with_loader)
        print(
            f"real data loading: median step {real * 1000:.0f} ms vs pre-built {reference * 1000:.0f} ms "
            f"(before {first * 1000:.0f}, after {second * 1000:.0f}): overhead {100 * (real / reference - 1):+.1f}%"
        )
    print(
        f"load average (1, 5, 15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
