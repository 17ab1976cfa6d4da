"""Time the SSL training step, eager and compiled side by side, and report model FLOPs utilisation (MFU).

    python scripts/benchmark_train_step.py [--config-file configs/train/quickdraw_vit_tiny.yaml]
        [--setups recipe reference] [--variants eager compiled] [--precisions fp32 bf16]
        [--threads N] [--warmup 3] [--steps 5] [--rounds 2] [--loader-steps 10] [--matmul-ceiling]
        [key=value ...]

Setups: ``recipe`` (the config file as it is) and ``reference`` (the issue's reference
configuration, :data:`REFERENCE_OVERRIDES` on top of it). Variants (:data:`VARIANTS`): ``eager``
and ``compiled`` (``train.compile=true``); one table row each, so a new optimisation is one more
entry there. Precisions: fp32, and bf16 where it runs in hardware (CUDA, or a CPU with
AVX512-BF16 / AMX); ``--precisions`` forces the list.

For each setup and precision:

1. Builds one :class:`~dinov2.train.trainer.SSLTrainer` per variant (output in a temporary folder,
   k-NN monitor off; the same seed, so the same weights) and pre-builds a few batches with the
   first one's data loader.
2. Warms each variant up (``--warmup`` steps; compiling happens here: the warm-up column).
3. Counts the FLOPs of one step with ``FlopCounterMode`` (matmuls, attention, convolutions: the
   model FLOPs; element-wise work is not counted), the same for every variant.
4. Times ``train_step`` (forward, backward, clipping, AdamW step, EMA teacher update) on the
   pre-built batches in ``--rounds`` rounds that alternate the variants, and measures this
   machine's matmul rate (three 1024 x 1024 ``torch.mm`` in fp32, and in the compute dtype, after
   every timed step), so all see the same machine load.
5. MFU = step FLOPs / median step time / median matmul rate, against the fp32 rate and against the
   rate of the dtype the step computes in.
6. With ``--matmul-ceiling``, times every counted call of one step of the first variant alone
   (:func:`dinov2_tools.step_profile.matmul_ceiling`): the share of the step they take, and the
   MFU the step would reach if nothing else took time, the ceiling for work outside the matmuls.
7. Times steps that pull their batch from the real loader (the recipe's ``train.num_workers``) for
   the first variant, and reports the overhead against its pre-built steps and whether loading
   bounds the step.

Prints one markdown table (a row per setup, precision and variant), the matmul rates, the loader
overhead and the load average. The machine may be shared: compare ratios from one run.
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

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2_tools.step_profile import flop_counter_mode, matmul_ceiling  # noqa: E402


def matmul_rate(size: int = 1024, repeats: int = 1, dtype: torch.dtype = torch.float32, device=None) -> float:
    """FLOP/s of ``size x size @ size x size`` in ``dtype`` on ``device`` (default: the default
    device); CUDA is synchronised around the products."""
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync()
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def step_flops(trainer, batch) -> int:
    counter = flop_counter_mode()
    with counter:
        trainer.train_step(batch)
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, batches, n: int, rates=None, compute_dtype: torch.dtype = torch.float32):
    """Step times; with ``rates`` (a dict dtype -> list) also the matmul rates after each step."""
    times = []
    for _ in range(n):
        batch = next(batches)
        _synchronize(trainer.device)
        start = time.perf_counter()
        trainer.train_step(batch)
        _synchronize(trainer.device)
        times.append(time.perf_counter() - start)
        if rates is not None:
            for dtype in {torch.float32, compute_dtype}:
                rates.setdefault(dtype, []).append(matmul_rate(repeats=3, dtype=dtype, device=trainer.device))
    return times


def loader_steps(trainer, data_iter, n: int):
    times = []
    for _ in range(n):
        _synchronize(trainer.device)
        start = time.perf_counter()
        batch = next(data_iter)
        trainer.train_step(batch)
        _synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return times


# The reference configuration (one the official DINOv2 code also runs on a CPU), as
# overrides of the recipe: ViT 192 wide, 6 blocks, 3 heads, patch 4; 2 x 32 px global and 4 x 16 px
# local crops; a 3-layer head with 4096 prototypes shared by DINO and iBOT; KoLeo 0.1;
# Sinkhorn-Knopp targets; batch 64.
REFERENCE_OVERRIDES = [
    "student.embed_dim=192",
    "student.depth=6",
    "student.num_heads=3",
    "student.patch_size=4",
    "student.mlp_ratio=4",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=4",
    "dino.head_n_prototypes=4096",
    "dino.head_nlayers=3",
    "dino.head_hidden_dim=2048",
    "dino.head_bottleneck_dim=256",
    "dino.head_use_bn=false",
    "dino.koleo_loss_weight=0.1",
    "ibot.loss_weight=1.0",
    "ibot.separate_head=false",
    "ibot.head_n_prototypes=4096",
    "train.centering=sinkhorn_knopp",
    "train.batch_size_per_gpu=64",
]
SETUPS = {"recipe": [], "reference": REFERENCE_OVERRIDES}

# One table row per variant: a name and the overrides that switch it on. A new optimisation adds
# a line here (and is then measured beside the others in the same run).
VARIANTS = {
    "eager": ["train.compile=false"],
    "compiled": ["train.compile=true"],
    # Packed multi-crop attention (dinov2/layers/packing.py): the device's packed kernel
    # (sdpa_split on the CPU); the same step as eager where the setup has one crop size only.
    "packed": ["train.compile=false", "train.packed_attention=packed"],
}

PRECISION_OVERRIDES = {
    "fp32": ["compute_precision.param_dtype=fp32", "compute_precision.teacher_dtype=fp32"],
    "bf16": ["compute_precision.param_dtype=bf16", "compute_precision.teacher_dtype=bf16"],
}


def _default_precisions(device: torch.device) -> list:
    from dinov2.train.trainer import cpu_has_bf16_matmul

    if device.type == "cuda" or cpu_has_bf16_matmul():
        return ["fp32", "bf16"]
    print(
        "bf16 skipped: this CPU has no AVX512-BF16 / AMX, so bf16 matmuls are emulated (tens of times slower "
        "than fp32) and its figures would not mean anything; --precisions fp32 bf16 measures it anyway"
    )
    return ["fp32"]


def measure_setup(args, setup: str, precision: str, variants: list, base_overrides: list) -> dict:
    """Build one trainer per variant (same seed, so the same weights), warm each up (compiling
    where it compiles), then time them in alternating rounds on the same pre-built batches, with
    the matmul rate sampled after every step. Returns the figures of each variant."""
    from dinov2.train.ssl_meta_arch import PRECISIONS
    from dinov2.train.trainer import SSLTrainer
    from dinov2.utils.config import load_config

    overrides = base_overrides + SETUPS[setup] + PRECISION_OVERRIDES[precision]
    compute_dtype = PRECISIONS[precision]
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        trainers, warmup_seconds = {}, {}
        for name in variants:
            cfg = load_config(args.config_file, overrides + VARIANTS[name])
            trainers[name] = SSLTrainer(cfg, output_dir=Path(tmp) / name)
        first = trainers[variants[0]]
        data_iter = iter(first.loader)
        batches = cycle([next(data_iter) for _ in range(args.prebuilt_batches)])
        for name, trainer in trainers.items():
            start = time.perf_counter()
            timed_steps(trainer, batches, args.warmup)
            warmup_seconds[name] = time.perf_counter() - start
        flops = step_flops(first, next(batches))  # the model's FLOPs: the same for every variant
        rates: dict = {}
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                times[name] += timed_steps(trainer, batches, args.steps, rates, compute_dtype)
        loader = None
        if args.loader_steps > 0:
            with_loader = statistics.median(loader_steps(first, data_iter, args.loader_steps))
            after = statistics.median(timed_steps(first, batches, args.steps, rates, compute_dtype))
            loader = (with_loader, 0.5 * (statistics.median(times[variants[0]]) + after))
        # The first variant's counted calls (matmuls, attention) timed alone: the step's ceiling.
        ceiling = matmul_ceiling(lambda: first.train_step(next(batches))) if args.matmul_ceiling else None
        cfg = first.cfg
        compiled = {name: getattr(trainer, "compiled", False) for name, trainer in trainers.items()}
    return {
        "setup": setup,
        "precision": precision,
        "cfg": cfg,
        "flops": flops,
        "rates": rates,
        "compute_dtype": compute_dtype,
        "times": times,
        "warmup": warmup_seconds,
        "compiled": compiled,
        "loader": loader,
        "ceiling": ceiling,
    }


def report(result: dict, header: bool) -> None:
    cfg, flops, rates = result["cfg"], result["flops"], result["rates"]
    batch = int(cfg.train.batch_size_per_gpu)
    fp32_rate = statistics.median(rates[torch.float32])
    own_rate = statistics.median(rates[result["compute_dtype"]])
    if header:
        print(
            "| setup | precision | variant | step (median) | / first variant | images/s | GFLOP / step | GFLOP/s "
            "| MFU of fp32 rate | MFU of own rate | warm-up |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    reference = None
    for name, times in result["times"].items():
        step = statistics.median(times)
        reference = reference or step
        achieved = flops / step
        asks_compile = "train.compile=true" in VARIANTS[name]
        note = "" if not asks_compile or result["compiled"].get(name, True) else " (fell back to eager)"
        print(
            f"| {result['setup']} | {result['precision']} | {name}{note} | {step * 1000:.0f} ms | "
            f"{step / reference:.2f} | {batch / step:.1f} | {flops / 1e9:.1f} | {achieved / 1e9:.1f} | "
            f"{100 * achieved / fp32_rate:.1f}% | {100 * achieved / own_rate:.1f}% | {result['warmup'][name]:.1f} s |"
        )


def describe(result: dict) -> None:
    cfg, rates = result["cfg"], result["rates"]
    print(
        f"{result['setup']} / {result['precision']}: batch {cfg.train.batch_size_per_gpu} images x (2 global "
        f"{cfg.crops.global_crops_size}px + {cfg.crops.local_crops_number} local {cfg.crops.local_crops_size}px), "
        f"ViT {cfg.student.embed_dim or cfg.student.arch} x {cfg.student.depth}, loader workers {cfg.train.num_workers}; "
        f"fp32 matmul rate median {statistics.median(rates[torch.float32]) / 1e9:.1f}, best "
        f"{max(rates[torch.float32]) / 1e9:.1f} GFLOP/s over {len(rates[torch.float32])} samples"
        + (
            f"; {result['precision']} rate median {statistics.median(rates[result['compute_dtype']]) / 1e9:.1f} GFLOP/s"
            if result["compute_dtype"] != torch.float32
            else ""
        )
    )
    if result["loader"] is not None:
        real, prebuilt = result["loader"]
        overhead = real / prebuilt - 1
        verdict = "loading bounds the step" if overhead > 0.05 else "loading does not bound the step"
        print(
            f"  real data loading ({next(iter(result['times']))}): median step {real * 1000:.0f} ms vs pre-built "
            f"{prebuilt * 1000:.0f} ms: {100 * overhead:+.1f}% -> {verdict} (threshold +5%)"
        )


def describe_ceiling(result: dict, top: int = 8) -> None:
    """The step's counted calls timed alone, against the step and the 1024^3 matmul rate."""
    ceiling = result["ceiling"]
    if ceiling is None:
        return
    step = statistics.median(next(iter(result["times"].values())))
    rate = statistics.median(result["rates"][result["compute_dtype"]])
    print(
        f"  matmul ceiling ({next(iter(result['times']))}): the {sum(op['calls'] for op in ceiling['ops'])} counted "
        f"calls ({len(ceiling['ops'])} distinct) take {ceiling['seconds'] * 1000:.0f} ms run alone, "
        f"{100 * ceiling['seconds'] / step:.0f}% of the {step * 1000:.0f} ms step; they run at "
        f"{100 * ceiling['flops'] / ceiling['seconds'] / rate:.1f}% of the {result['precision']} 1024^3 matmul "
        f"rate, the highest MFU this step could reach if nothing else took time"
    )
    for op in ceiling["ops"][:top]:
        total = op["calls"] * op["seconds"]
        print(
            f"    {op['op']}: {op['calls']} calls, {total * 1000:.1f} ms ({100 * total / ceiling['seconds']:.0f}%), "
            f"{100 * op['flops'] / op['seconds'] / rate:.0f}% of the rate"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/train/quickdraw_vit_tiny.yaml")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISION_OVERRIDES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiling happens here)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternating variants")
    parser.add_argument(
        "--loader-steps", type=int, default=10, help="steps with the real loader, first variant (0: skip)"
    )
    parser.add_argument("--prebuilt-batches", type=int, default=4)
    parser.add_argument(
        "--matmul-ceiling",
        action="store_true",
        help="also time the first variant's matmul and attention calls alone (dinov2_tools.step_profile)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides (every setup)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dinov2 import distributed

    overrides = [o for o in args.opts if o != "--"] + ["evaluation.knn_period_iterations=0"]
    device = distributed.get_device()
    precisions = args.precisions or _default_precisions(device)
    print(f"recipe: {args.config_file} {' '.join(overrides)}; {torch.get_num_threads()} threads, device {device}")
    load_start = os.getloadavg()
    results = [
        measure_setup(args, setup, precision, args.variants, overrides)
        for setup in args.setups
        for precision in precisions
    ]
    load_end = os.getloadavg()
    for i, result in enumerate(results):
        report(result, header=i == 0)
    for result in results:
        describe(result)
        describe_ceiling(result)
    print(
        "MFU = model FLOPs per step (FlopCounterMode: matmuls, attention, convolutions) / median step time / "
        "median matmul rate (3 x 1024^3 torch.mm after every timed step, same threads and load)"
    )
    print(
        f"load average (1, 5, 15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
