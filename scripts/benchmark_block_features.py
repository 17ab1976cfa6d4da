"""Measure the two training-memory/speed options of the backbone side by side.

    python scripts/benchmark_block_features.py [--threads 1] [--device cpu|cuda] [--rounds 7]

1. Stochastic depth: forward + backward time of one ViT block (``--dim``, ``--tokens``,
   ``--batch``) in training mode for drop rates 0 / 0.1 / 0.4, per-sample mask
   (``train.stochastic_depth=mask``) against sample subset (``subset``). The settings are timed
   in alternation, round by round, so load from other processes falls on all of them alike;
   the median per setting and the subset/mask ratio are printed.
2. Activation checkpointing: backbone forward + backward (``--arch``, ``--img-size``,
   ``--ckpt-batch``) with ``train.activation_checkpointing`` 0 (off), 2 (every other block)
   and 1 (all), each in a fresh subprocess so that peak memory is its own: peak RSS growth over
   the process after building model and input (``resource.getrusage``, glibc's mmap threshold
   fixed so that freed activations leave the resident set) on the CPU,
   ``torch.cuda.max_memory_allocated`` on CUDA; median step time and the ratio to "off".

Prints the load average before and after: the machine may be shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.layers import Block  # noqa: E402
from dinov2.models import make_vit  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def block_times(args) -> dict:
    """Median forward + backward seconds of one block per (mode, rate), timed in alternation."""
    settings = [(mode, rate) for rate in args.rates for mode in ("mask", "subset")]
    torch.manual_seed(0)
    blocks = {}
    for mode, rate in settings:
        block = Block(dim=args.dim, num_heads=args.dim // 64, drop_path=rate, init_values=1e-5, stochastic_depth=mode)
        blocks[mode, rate] = block.to(args.device).train()
    x = torch.randn(args.batch, args.tokens, args.dim, device=args.device, requires_grad=True)
    times = {s: [] for s in settings}
    for r in range(args.warmup + args.rounds):
        for s in settings:
            _sync(args.device)
            start = time.perf_counter()
            blocks[s](x).sum().backward()
            _sync(args.device)
            if r >= args.warmup:
                times[s].append(time.perf_counter() - start)
    return {s: statistics.median(t) for s, t in times.items()}


def checkpoint_child(args) -> None:
    """One setting of activation checkpointing in this process: prints a JSON line."""
    torch.manual_seed(0)
    model = (
        make_vit(
            args.arch,
            patch_size=16,
            img_size=args.img_size,
            init_values=1e-5,
            drop_path_rate=args.ckpt_rate,
            drop_path_uniform=True,
            activation_checkpointing=args.child,
        )
        .to(args.device)
        .train()
    )
    x = torch.randn(args.ckpt_batch, 3, args.img_size, args.img_size, device=args.device)
    times = []
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(args.ckpt_warmup + args.ckpt_steps):
        model.zero_grad(set_to_none=False)
        _sync(args.device)
        start = time.perf_counter()
        out = model.forward_features(x)
        (out["x_norm_clstoken"].square().mean() + out["x_norm_patchtokens"].square().mean()).backward()
        _sync(args.device)
        if i >= args.ckpt_warmup:
            times.append(time.perf_counter() - start)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is in KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(json.dumps({"every": args.child, "step_s": statistics.median(times), "peak_bytes": peak}))


def checkpoint_results(args) -> list:
    results = []
    for every in (0, 2, 1):
        cmd = [sys.executable, __file__, f"--child={every}"] + [a for a in sys.argv[1:] if not a.startswith("--child")]
        # A fixed mmap threshold: glibc otherwise raises it after each large free and keeps freed
        # activations in its heap, so peak RSS would not fall when fewer are alive at once.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dim", type=int, default=384, help="block width (heads of 64)")
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.4])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--ckpt-batch", type=int, default=32)
    parser.add_argument("--ckpt-rate", type=float, default=0.0, help="stochastic depth of the checkpointed backbone")
    parser.add_argument("--ckpt-warmup", type=int, default=1)
    parser.add_argument("--ckpt-steps", type=int, default=3)
    parser.add_argument("--skip-blocks", action="store_true", help="only the activation checkpointing part")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child is not None:
        checkpoint_child(args)
        return 0

    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), load average {os.getloadavg()}")
    if not args.skip_blocks:
        print(
            f"\nStochastic depth: one block, dim {args.dim}, {args.tokens} tokens, batch {args.batch}, "
            f"forward + backward, median of {args.rounds} alternating rounds"
        )
        times = block_times(args)
        print(f"{'rate':>6} {'mask ms':>9} {'subset ms':>10} {'subset/mask':>12}")
        for rate in args.rates:
            mask, subset = times["mask", rate], times["subset", rate]
            print(f"{rate:>6.2f} {mask * 1e3:>9.1f} {subset * 1e3:>10.1f} {subset / mask:>12.3f}")

    print(
        f"\nActivation checkpointing: {args.arch}, {args.img_size}px, batch {args.ckpt_batch}, backbone forward + "
        f"backward, median of {args.ckpt_steps} steps; peak = growth over the built model and input"
    )
    results = checkpoint_results(args)
    off = results[0]
    print(f"{'blocks checkpointed':>20} {'step s':>8} {'/off':>6} {'peak MiB':>9} {'/off':>6}")
    for r in results:
        label = {0: "none", 1: "all", 2: "every 2nd"}[r["every"]]
        print(
            f"{label:>20} {r['step_s']:>8.3f} {r['step_s'] / off['step_s']:>6.2f} "
            f"{r['peak_bytes'] / 2**20:>9.1f} {r['peak_bytes'] / max(off['peak_bytes'], 1):>6.2f}"
        )
    print(f"\nload average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
