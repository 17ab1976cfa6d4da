#!/usr/bin/env python
"""Benchmarks of evaluation on frozen features; prints the figures quoted in docs/evaluation.md.

1. k-NN: 10,000 queries against a 100,000 x 384 bank (1,000 classes, k in {10, 20, 100, 200}),
   timed against the bare similarity matmuls of the same chunks in the same process (the two
   alternate query chunk by query chunk, so load from other jobs falls on both alike), with the
   process's peak resident memory (``ru_maxrss``; the k-NN runs in a fresh subprocess so the
   figure is its own, Python and torch included).
2. Linear probe grid (13 learning rates x {1, 4} blocks x avgpool on/off = 52 heads): cached
   features against on-the-fly backbone features (no augmentation, so both see the same data and
   reach the same heads), on synthetic in-memory images. Two ratios: the training epochs alone
   (cached: the heads on the stored features; on-the-fly: backbone + heads per step), and end to
   end with the one-off extraction counted, which on-the-fly repeats every epoch: that ratio is
   therefore at most about the number of epochs, however fast the heads are.

    python scripts/benchmark_eval.py                 # both, 1 thread
    python scripts/benchmark_eval.py --only knn --threads 2

Timings on a shared machine are noisy: compare the ratios, not the absolute seconds. Each figure
is given as CPU time of this process (``time.process_time``: time spent waiting for a core is left
out, but other jobs still share caches, memory bandwidth and maybe the physical core) and as wall
time.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Clock:
    """Wall and CPU seconds of this process since it was created."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> dict:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def knn_worker(args) -> dict:
    import torch

    from dinov2.eval.knn import knn_search, normalize_features, vote

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 1000, 384
    centres = torch.randn(num_classes, dim, generator=g)
    bank_labels = torch.randint(0, num_classes, (args.bank,), generator=g)
    bank = centres[bank_labels] + 3.0 * torch.randn(args.bank, dim, generator=g)
    query_labels = torch.randint(0, num_classes, (args.queries,), generator=g)
    queries = centres[query_labels] + 3.0 * torch.randn(args.queries, dim, generator=g)
    del centres
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Paired per query chunk: the bare similarity matmuls of a chunk's blocks, then the k-NN of the
    # same chunk (search with its running top-k and merges, then the votes), alternating, so that
    # other jobs' load on a shared machine falls on both alike; each figure sums the chunks. Both
    # start from normalised features (normalising is a pass over the data, the same for both).
    bank_n = normalize_features(bank)
    bank_indices = torch.arange(args.bank)
    chunks = [
        normalize_features(queries[q : q + args.query_chunk_size])
        for q in range(0, args.queries, args.query_chunk_size)
    ]

    def bare_matmuls(chunk) -> dict:
        clock = Clock()
        for b in range(0, args.bank, args.bank_chunk_size):
            sims = chunk @ bank_n[b : b + args.bank_chunk_size].T
            del sims
        return clock.elapsed()

    def knn(chunk):
        clock = Clock()
        top_sims, _, top_labels = knn_search(
            chunk,
            bank_n,
            bank_labels,
            bank_indices,
            200,
            query_chunk_size=args.query_chunk_size,
            bank_chunk_size=args.bank_chunk_size,
            normalize=False,
        )
        scores = vote(top_sims, top_labels, (10, 20, 100, 200), 0.07, num_classes)
        return clock.elapsed(), scores

    kinds = ("cpu", "wall")
    matmul_runs, knn_runs = [], []
    for _ in range(args.repeats):
        matmul_total, knn_total, per_chunk = dict.fromkeys(kinds, 0.0), dict.fromkeys(kinds, 0.0), []
        for chunk in chunks:
            matmul_time = bare_matmuls(chunk)
            knn_time, chunk_scores = knn(chunk)
            per_chunk.append(chunk_scores)
            for kind in kinds:
                matmul_total[kind] += matmul_time[kind]
                knn_total[kind] += knn_time[kind]
        matmul_runs.append(matmul_total)
        knn_runs.append(knn_total)
    scores = {k: torch.cat([c[k] for c in per_chunk]) for k in per_chunk[0]}
    matmul_seconds = {kind: min(run[kind] for run in matmul_runs) for kind in kinds}
    knn_seconds = {kind: min(run[kind] for run in knn_runs) for kind in kinds}
    top1 = {k: float((s.argmax(dim=1) == query_labels).float().mean()) for k, s in scores.items()}
    return {
        "bank": args.bank,
        "queries": args.queries,
        "dim": dim,
        "threads": args.threads,
        "repeats": args.repeats,
        "matmul_runs": matmul_runs,
        "knn_runs": knn_runs,
        "query_chunk_size": args.query_chunk_size,
        "bank_chunk_size": args.bank_chunk_size,
        "matmul_seconds": matmul_seconds,
        "knn_seconds": knn_seconds,
        "ratio": {kind: knn_seconds[kind] / matmul_seconds[kind] for kind in kinds},
        "paired_ratios": [{kind: k[kind] / m[kind] for kind in kinds} for m, k in zip(matmul_runs, knn_runs)],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_data_mb": rss_before,
        "top1": top1,
    }


def linear_benchmark(args) -> dict:
    import torch
    from torch.utils.data import Dataset

    from dinov2.eval.features import BlockFeatures, extract_features
    from dinov2.eval.linear import CachedTrainSource, OnlineTrainSource, make_head_grid, train_linear_grid
    from dinov2.models.vision_transformer import vit_small

    torch.set_num_threads(args.threads)

    class Synthetic(Dataset):
        def __init__(self, n, seed, num_classes=10):
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.randint(0, num_classes, (n,), generator=g)
            patterns = torch.randn(
                num_classes, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(99)
            )
            self.images = patterns[self.labels] + 3.0 * torch.randn(n, 3, args.image_size, args.image_size, generator=g)

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

    torch.manual_seed(0)
    model = vit_small(patch_size=8, img_size=args.image_size, depth=args.depth, init_values=1.0).eval()
    train, val = Synthetic(args.train_samples, 0), Synthetic(args.val_samples, 1)
    configs = make_head_grid()
    options = dict(epochs=args.epochs, batch_size=args.linear_batch_size, seed=0, progress=False)
    val_features = extract_features(model, val, feature_fn=BlockFeatures(4), batch_size=128, num_workers=0)

    clock = Clock()
    cached = extract_features(model, train, feature_fn=BlockFeatures(4), batch_size=128, num_workers=0)
    extraction = clock.elapsed()
    clock = Clock()
    cached_result = train_linear_grid(CachedTrainSource(cached), val_features, 10, configs, model.embed_dim, **options)
    cached_heads = clock.elapsed()

    clock = Clock()
    online = OnlineTrainSource(model, train, range(len(train)), 4, "cpu", num_workers=0)
    online_result = train_linear_grid(online, val_features, 10, configs, model.embed_dim, **options)
    online_seconds = clock.elapsed()
    with torch.no_grad():
        max_weight_diff = max(
            float((cached_result.grid.head(i).weight - online_result.grid.head(i).weight).abs().max())
            for i in range(len(configs))
        )
    kinds = ("cpu", "wall")
    cached_seconds = {kind: extraction[kind] + cached_heads[kind] for kind in kinds}
    return {
        "heads": len(configs),
        "train_samples": args.train_samples,
        "epochs": args.epochs,
        "iterations": cached_result.iterations,
        "backbone": f"ViT-S/8 depth {args.depth} at {args.image_size}px",
        "threads": args.threads,
        "extraction_seconds": extraction,
        "cached_head_seconds": cached_heads,
        "cached_seconds": cached_seconds,
        "online_seconds": online_seconds,
        "training_speedup": {kind: online_seconds[kind] / cached_heads[kind] for kind in kinds},
        "speedup": {kind: online_seconds[kind] / cached_seconds[kind] for kind in kinds},
        "cached_best": [configs[cached_result.best_head].name, cached_result.val_accuracy[cached_result.best_head]],
        "online_best": [configs[online_result.best_head].name, online_result.val_accuracy[online_result.best_head]],
        "max_head_weight_difference": max_weight_diff,
    }


def _seconds(figure: dict, digits: int = 2) -> str:
    return f"{figure['cpu']:.{digits}f} s CPU ({figure['wall']:.{digits}f} s wall)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["knn", "linear"], default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--query-chunk-size", type=int, default=1024)
    parser.add_argument("--bank-chunk-size", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=2, help="k-NN and bare-matmul runs each (fastest kept)")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--linear-batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--knn-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    if args.knn_worker:
        print(json.dumps(knn_worker(args)))
        return 0
    print("load average (1, 5, 15 min) at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if args.only in (None, "knn"):
        argv = [
            sys.executable,
            __file__,
            "--knn-worker",
            "--threads",
            str(args.threads),
            "--bank",
            str(args.bank),
            "--queries",
            str(args.queries),
            "--query-chunk-size",
            str(args.query_chunk_size),
            "--bank-chunk-size",
            str(args.bank_chunk_size),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        knn = json.loads(out.strip().splitlines()[-1])
        print(
            f"k-NN {knn['queries']} queries x {knn['bank']} x {knn['dim']} bank, k in 10/20/100/200, {knn['threads']} thread(s): "
            f"bare matmuls {_seconds(knn['matmul_seconds'])}, k-NN {_seconds(knn['knn_seconds'])} (fastest of {knn['repeats']}), "
            f"ratio {knn['ratio']['cpu']:.3f} CPU, {knn['ratio']['wall']:.3f} wall "
            f"(target <= 1.1); peak RSS {knn['peak_rss_mb']:.0f} MB (target < 2048; {knn['rss_after_data_mb']:.0f} MB "
            f"after creating the data); top-1 {', '.join(f'k={k}: {100 * v:.1f}%' for k, v in knn['top1'].items())}"
        )
    if args.only in (None, "linear"):
        lin = linear_benchmark(args)
        print(
            f"linear grid, {lin['heads']} heads, {lin['train_samples']} images x {lin['epochs']} epochs "
            f"({lin['iterations']} steps), {lin['backbone']}, {lin['threads']} thread(s): training epochs cached "
            f"{_seconds(lin['cached_head_seconds'])} vs on-the-fly {_seconds(lin['online_seconds'], 1)}: "
            f"{lin['training_speedup']['cpu']:.0f}x CPU, {lin['training_speedup']['wall']:.0f}x wall (target >= 10); "
            f"end to end cached {_seconds(lin['cached_seconds'], 1)} (extraction {_seconds(lin['extraction_seconds'], 1)} + heads) "
            f"vs on-the-fly: {lin['speedup']['cpu']:.1f}x CPU, {lin['speedup']['wall']:.1f}x wall (one backbone pass in all vs one "
            f"per epoch: about {lin['epochs']}x at most); best head cached {lin['cached_best'][0]} "
            f"{100 * lin['cached_best'][1]:.1f}%, on-the-fly {lin['online_best'][0]} {100 * lin['online_best'][1]:.1f}%; "
            f"largest head weight difference {lin['max_head_weight_difference']:.1e}"
        )
    print("load average (1, 5, 15 min) at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
