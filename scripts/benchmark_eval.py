#!/usr/bin/env python
"""Benchmarks of evaluation on frozen features; prints the figures quoted in docs/evaluation.md.

1. k-NN: 10,000 queries against a 100,000 x 384 bank (1,000 classes, k in {10, 20, 100, 200}),
   timed against the bare similarity matmuls of the same chunks in the same process, with the
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

Timings on a shared machine are noisy: compare the ratios, not the absolute seconds.
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


def knn_worker(args) -> dict:
    import torch

    from dinov2.eval.knn import knn_classify, normalize_features

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

    def bare_matmuls() -> float:
        # the similarity matmuls of the same (query chunk x bank chunk) blocks, on normalised features
        bank_n = normalize_features(bank)
        start = time.perf_counter()
        for q in range(0, args.queries, args.query_chunk_size):
            chunk = normalize_features(queries[q : q + args.query_chunk_size])
            for b in range(0, args.bank, args.bank_chunk_size):
                sims = chunk @ bank_n[b : b + args.bank_chunk_size].T
                del sims
        return time.perf_counter() - start

    def full_knn():
        start = time.perf_counter()
        scores = knn_classify(
            queries, bank, bank_labels, ks=(10, 20, 100, 200), temperature=0.07, num_classes=num_classes,
            query_chunk_size=args.query_chunk_size, bank_chunk_size=args.bank_chunk_size,
        )
        return time.perf_counter() - start, scores

    # Alternate the two and keep each one's fastest run: other users' load on a shared machine
    # then inflates both alike instead of skewing the ratio.
    matmul_runs, knn_runs = [], []
    for _ in range(args.repeats):
        matmul_runs.append(bare_matmuls())
        seconds, scores = full_knn()
        knn_runs.append(seconds)
    matmul_seconds, knn_seconds = min(matmul_runs), min(knn_runs)
    top1 = {k: float((s.argmax(dim=1) == query_labels).float().mean()) for k, s in scores.items()}
    return {
        "bank": args.bank, "queries": args.queries, "dim": dim, "threads": args.threads,
        "repeats": args.repeats, "matmul_runs": matmul_runs, "knn_runs": knn_runs,
        "query_chunk_size": args.query_chunk_size, "bank_chunk_size": args.bank_chunk_size,
        "matmul_seconds": matmul_seconds, "knn_seconds": knn_seconds, "ratio": knn_seconds / matmul_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_data_mb": rss_before, "top1": top1,
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
            patterns = torch.randn(num_classes, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(99))
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

    start = time.perf_counter()
    cached = extract_features(model, train, feature_fn=BlockFeatures(4), batch_size=128, num_workers=0)
    extraction_seconds = time.perf_counter() - start
    cached_result = train_linear_grid(CachedTrainSource(cached), val_features, 10, configs, model.embed_dim, **options)
    cached_seconds = time.perf_counter() - start

    start = time.perf_counter()
    online = OnlineTrainSource(model, train, range(len(train)), 4, "cpu", num_workers=0)
    online_result = train_linear_grid(online, val_features, 10, configs, model.embed_dim, **options)
    online_seconds = time.perf_counter() - start
    max_weight_diff = max(
        float((cached_result.grid.head(i).weight - online_result.grid.head(i).weight).abs().max().detach()) for i in range(len(configs))
    )
    return {
        "heads": len(configs), "train_samples": args.train_samples, "epochs": args.epochs,
        "iterations": cached_result.iterations, "backbone": f"ViT-S/8 depth {args.depth} at {args.image_size}px",
        "threads": args.threads, "cached_seconds": cached_seconds, "online_seconds": online_seconds,
        "extraction_seconds": extraction_seconds,
        "cached_head_seconds": cached_result.train_seconds, "online_head_seconds": online_result.train_seconds,
        "training_speedup": online_result.train_seconds / cached_result.train_seconds,
        "speedup": online_seconds / cached_seconds,
        "cached_best": [configs[cached_result.best_head].name, cached_result.val_accuracy[cached_result.best_head]],
        "online_best": [configs[online_result.best_head].name, online_result.val_accuracy[online_result.best_head]],
        "max_head_weight_difference": max_weight_diff,
    }


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
        argv = [sys.executable, __file__, "--knn-worker", "--threads", str(args.threads), "--bank", str(args.bank),
                "--queries", str(args.queries), "--query-chunk-size", str(args.query_chunk_size),
                "--bank-chunk-size", str(args.bank_chunk_size), "--repeats", str(args.repeats)]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        knn = json.loads(out.strip().splitlines()[-1])
        print(
            f"k-NN {knn['queries']} queries x {knn['bank']} x {knn['dim']} bank, k in 10/20/100/200, {knn['threads']} thread(s): "
            f"bare matmuls {knn['matmul_seconds']:.2f} s, k-NN {knn['knn_seconds']:.2f} s (fastest of {knn['repeats']}), "
            f"ratio {knn['ratio']:.2f} "
            f"(target < 2); peak RSS {knn['peak_rss_mb']:.0f} MB (target < 2048; {knn['rss_after_data_mb']:.0f} MB "
            f"after creating the data); top-1 {', '.join(f'k={k}: {100 * v:.1f}%' for k, v in knn['top1'].items())}"
        )
    if args.only in (None, "linear"):
        lin = linear_benchmark(args)
        print(
            f"linear grid, {lin['heads']} heads, {lin['train_samples']} images x {lin['epochs']} epochs "
            f"({lin['iterations']} steps), {lin['backbone']}, {lin['threads']} thread(s): training epochs cached "
            f"{lin['cached_head_seconds']:.2f} s vs on-the-fly {lin['online_head_seconds']:.1f} s "
            f"({lin['training_speedup']:.0f}x, target >= 10); end to end cached {lin['cached_seconds']:.1f} s "
            f"(extraction {lin['extraction_seconds']:.1f} s + heads) vs on-the-fly {lin['online_seconds']:.1f} s "
            f"({lin['speedup']:.1f}x, at most about {lin['epochs']}x: one backbone pass in all vs one per epoch); "
            f"best head cached {lin['cached_best'][0]} "
            f"{100 * lin['cached_best'][1]:.1f}%, on-the-fly {lin['online_best'][0]} {100 * lin['online_best'][1]:.1f}%; "
            f"largest head weight difference {lin['max_head_weight_difference']:.1e}"
        )
    print("load average (1, 5, 15 min) at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
