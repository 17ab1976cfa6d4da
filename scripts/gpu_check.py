"""GPU acceptance check: the CUDA tests, then training-step speed and memory of ViT-S/14 and ViT-L/14.

    scripts/gpu_check.sh [--cpu] [--output gpu_check.json] [--budget-s 300] [--skip-tests]
    python scripts/gpu_check.py ...            (the same; gpu_check.sh only wraps this)

Meant to be run once on the first machine with a CUDA GPU, in about 5 minutes on one GPU:

1. runs the tests marked ``cuda`` (tests/test_cuda.py: NCCL process group of one rank, bf16
   autocast and FSDP2 mixed precision, the xformers path when installed, packed attention
   kernels, a compiled step, a train / kill / resume cycle, k-NN on CUDA) and records each
   outcome, with the reason of each skip;
2. measures the GPU's bf16 matmul rate (8192^3 ``torch.mm``), then for ViT-S/14 and ViT-L/14 at
   224 px with 2 x 224 + 8 x 98 px crops (bf16 autocast, the default heads and losses) finds the
   largest batch that fits (doubling until CUDA runs out of memory, caught) and times the training
   step there: images/s, peak memory (``torch.cuda.max_memory_allocated``), model FLOPs
   (``benchmark_train_step.step_flops``) and MFU against the measured bf16 rate; eager, then
   packed multi-crop attention (``train.packed_attention=packed``) and compiled blocks
   (``train.compile=true``) at the same batch;
3. writes every figure to one JSON file (``--output``) and prints a summary beside the anchors
   (upstream DINOv2 ViT-L/16: about 93 images/s per A100; DINOv3 ViT-L/16: 112-159 per H100).

``--cpu`` runs the same steps on tiny shapes on the CPU in fp32 (about a minute; the CUDA tests
skip with their reason; the compiled step only with ``--cpu-compile``, as compiling on a CPU takes
minutes): what CI runs (tests/test_gpu_check.py) so that the script stays working.
The budget (``--budget-s``) bounds the timing part: what no longer fits is recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmark_train_step import matmul_rate, step_flops  # noqa: E402 (this script's folder)

ANCHORS = {
    "dinov2_vitl16_a100_images_per_s": 93,  # upstream fast setup: 125k it x batch 2048 in ~24 h on 32 A100
    "dinov3_vitl16_h100_images_per_s": [112, 159],
}

# name: (overrides, candidate batch sizes) for the GPU and for --cpu.
GPU_SHAPES = {
    "vit_small": ["student.arch=vit_small", "student.patch_size=14"],
    "vit_large": ["student.arch=vit_large", "student.patch_size=14"],
}
GPU_CROPS = ["crops.global_crops_size=224", "crops.local_crops_size=98", "crops.local_crops_number=8"]
CPU_SHAPES = {
    "vit_small": [
        "student.arch=vit_small",
        "student.embed_dim=32",
        "student.depth=2",
        "student.num_heads=2",
        "student.patch_size=4",
    ],
    "vit_large": [
        "student.arch=vit_large",
        "student.embed_dim=64",
        "student.depth=2",
        "student.num_heads=4",
        "student.patch_size=4",
    ],
}
CPU_CROPS = [
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=256",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=256",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
]


def _config(shape: list, crops: list, precision: str, extra=()):
    from dinov2.utils.config import load_config

    return load_config(
        None,
        shape
        + crops
        + [
            f"compute_precision.param_dtype={precision}",
            f"compute_precision.teacher_dtype={precision}",
            "train.num_workers=0",
            "evaluation.knn_period_iterations=0",
            # A short schedule (never run): the steps are timed, not trained for long.
            "train.OFFICIAL_EPOCH_LENGTH=10",
            "optim.epochs=10",
            "optim.warmup_epochs=1",
            "teacher.warmup_teacher_temp_epochs=1",
            *extra,
        ],
    )


def has_config_key(dotted: str) -> bool:
    from dinov2.utils.config import load_config

    node = load_config(None, [])
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def synthetic_batch(cfg, batch_size: int, seed: int = 0):
    """A collated batch of random crops with the config's real iBOT masks."""
    import random

    from dinov2.data.collate import build_collate_fn_from_config

    g = torch.Generator().manual_seed(seed)
    gs, ls = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    samples = [
        (
            {
                "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(cfg.crops.local_crops_number)],
            },
            0,
        )
        for _ in range(batch_size)
    ]
    return build_collate_fn_from_config(cfg, cfg.student.patch_size)(samples, generator=random.Random(seed))


class Device:
    """Synchronisation, peak memory and out-of-memory detection for CUDA or the CPU."""

    def __init__(self, cpu: bool):
        self.type = "cpu" if cpu else "cuda"
        self.device = torch.device(self.type)

    def sync(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int:
        if self.type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS of the process

    def free(self) -> None:
        gc.collect()
        if self.type == "cuda":
            torch.cuda.empty_cache()

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_tests(cpu: bool) -> dict:
    """pytest -m cuda tests/test_cuda.py in a subprocess; outcome and skip reason of each test."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_tests_") as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
        command += ["tests/test_cuda.py", f"--junitxml={report}"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if not report.exists():
            return dict(
                returncode=proc.returncode, seconds=seconds, error=(proc.stdout + proc.stderr)[-2000:], tests=[]
            )
        tests = []
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    detail = (node.get("message") or "")[:500]
            tests.append(dict(name=case.get("name"), outcome=outcome, detail=detail))
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return dict(returncode=proc.returncode, seconds=seconds, counts=counts, tests=tests)


def measure_matmul(device: Device) -> dict:
    if device.type == "cuda":
        dtype, size, repeats = torch.bfloat16, 8192, 20
        matmul_rate(size, repeats=3, dtype=dtype, device=device.device)  # warm-up (cuBLAS heuristics, clocks)
    else:
        dtype, size, repeats = torch.float32, 1024, 3
    rates = [matmul_rate(size, repeats=repeats, dtype=dtype, device=device.device) for _ in range(5)]
    return dict(
        dtype=str(dtype).removeprefix("torch."), size=size, median_flops=statistics.median(rates), best_flops=max(rates)
    )


def time_steps(trainer, batch, device: Device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        trainer.train_step(batch)
    device.sync()
    device.reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batch)
        device.sync()
        times.append(time.perf_counter() - start)
    return dict(step_s=statistics.median(times), samples_s=times, peak_memory_bytes=device.peak_bytes())


class _BlankImages(torch.utils.data.Dataset):
    """White images, made only if read: the trainer builds a loader, which the synthetic batches
    never use (its length only has to exceed any batch size)."""

    transform = None

    def __len__(self) -> int:
        return 1 << 16

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.new("RGB", (32, 32), "white")
        return (self.transform(image) if self.transform is not None else image), 0


def build_trainer(cfg, device: Device, tmp: str):
    from dinov2.train.trainer import SSLTrainer

    return SSLTrainer(cfg, output_dir=tmp, dataset=_BlankImages(), device=device.device)


def measure_model(
    name, cfg_for, batches, device: Device, rate: float, deadline: float, warmup: int, steps: int, compile_step: bool
):
    """Largest batch that fits (eager), then packed and compiled at that batch."""
    result = dict(batch_search=[], skipped={})
    best = None
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        trainer = build_trainer(cfg_for(), device, tmp)
        for batch_size in batches:
            if time.perf_counter() > deadline:
                result["skipped"][f"batch {batch_size}"] = "time budget spent"
                break
            try:
                batch = synthetic_batch(trainer.cfg, batch_size)
                figures = time_steps(trainer, batch, device, warmup, steps)
            except (RuntimeError, MemoryError) as error:  # CUDA out of memory
                if not device.is_oom(error):
                    raise
                del error
                trainer.model.zero_grad(set_to_none=True)
                device.free()
                result["batch_search"].append(dict(batch=batch_size, fits=False))
                break
            figures.update(batch=batch_size, fits=True, images_per_s=batch_size / figures["step_s"])
            result["batch_search"].append(figures)
            best = (batch_size, figures)
        if best is None:
            spent = result["batch_search"] == []
            result["error"] = (
                "time budget spent before the first batch" if spent else f"not even batch {batches[0]} fits"
            )
            return result
        batch_size, eager = best
        flops = step_flops(trainer, synthetic_batch(trainer.cfg, batch_size))
        del trainer
        device.free()
    result["best_batch"] = batch_size
    result["step_flops"] = flops
    result["variants"] = {"eager": _with_mfu(dict(eager), flops, rate)}
    variants = [("packed", ["train.packed_attention=packed"])]
    if not has_config_key("train.compile"):
        result["skipped"]["compiled"] = "train.compile is not a key of this checkout's configs/ssl_default_config.yaml"
    elif not compile_step:
        result["skipped"]["compiled"] = "--cpu: compiling on the CPU takes minutes (--cpu-compile includes it)"
    else:
        variants.append(("compiled", ["train.compile=true"]))
    for variant, extra in variants:
        if time.perf_counter() > deadline:
            result["skipped"][variant] = "time budget spent"
            continue
        with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_{variant}_") as tmp:
            trainer = build_trainer(cfg_for(*extra), device, tmp)
            start = time.perf_counter()
            batch = synthetic_batch(trainer.cfg, batch_size)
            trainer.train_step(batch)  # the first step compiles
            device.sync()
            first = time.perf_counter() - start
            try:
                figures = time_steps(trainer, batch, device, warmup, steps)
            except (RuntimeError, MemoryError) as error:
                if not device.is_oom(error):
                    raise
                result["skipped"][variant] = f"out of memory at batch {batch_size}"
                del trainer
                device.free()
                continue
            figures.update(batch=batch_size, first_step_s=first, images_per_s=batch_size / figures["step_s"])
            result["variants"][variant] = _with_mfu(figures, flops, rate)
            del trainer
            device.free()
    return result


def _with_mfu(figures: dict, flops: int, rate: float) -> dict:
    figures["mfu"] = flops / figures["step_s"] / rate
    return figures


def environment(device: Device) -> dict:
    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_runtime=torch.version.cuda,
        device_type=device.type,
        threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
    else:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        info["xformers"] = None
    return info


def summary(report: dict) -> str:
    lines = [f"GPU check on {report['environment'].get('gpu', 'CPU (--cpu: tiny shapes, fp32)')}"]
    tests = report.get("tests", {})
    if tests:
        lines.append(f"cuda tests: {tests.get('counts', tests.get('error', ''))} in {tests['seconds']:.0f} s")
        for test in tests.get("tests", []):
            if test["outcome"] != "passed":
                lines.append(f"  {test['outcome']}: {test['name']}: {test['detail'][:160]}")
    mm = report["matmul"]
    lines.append(f"{mm['dtype']} matmul ({mm['size']}^3): median {mm['median_flops'] / 1e9:.1f} GFLOP/s")
    for name, model in report["models"].items():
        if "variants" not in model:
            lines.append(f"{name}: {model.get('error', model)}")
            continue
        lines.append(
            f"{name}: largest batch that fits {model['best_batch']}, {model['step_flops'] / 1e9:.1f} GFLOP per step"
        )
        for variant, fig in model["variants"].items():
            lines.append(
                f"  {variant:<9} {fig['images_per_s']:8.1f} images/s, step {fig['step_s'] * 1000:7.1f} ms, "
                f"peak {fig['peak_memory_bytes'] / 2**30:6.2f} GiB, MFU {100 * fig['mfu']:5.1f}%"
            )
        for what, why in model["skipped"].items():
            lines.append(f"  skipped {what}: {why}")
    lines.append(f"anchors: {ANCHORS}")
    lines.append(f"total {report['elapsed_s']:.0f} s; figures in {report['output']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU in fp32 (what CI runs)")
    parser.add_argument("--output", default="gpu_check.json", help="JSON file for every figure")
    parser.add_argument("--budget-s", type=float, default=None, help="time for the timing part (default 240; --cpu 60)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the cuda-marked tests")
    parser.add_argument("--models", default="vit_small,vit_large")
    parser.add_argument("--cpu-compile", action="store_true", help="with --cpu, also time the compiled step")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (use --cpu for the CPU run on tiny shapes)", file=sys.stderr)
        return 2
    device = Device(args.cpu)
    if args.cpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    shapes, crops = (CPU_SHAPES, CPU_CROPS) if args.cpu else (GPU_SHAPES, GPU_CROPS)
    precision = "fp32" if args.cpu else "bf16"
    batches = [2, 4, 8] if args.cpu else [16, 32, 64, 128, 256, 512, 1024]
    warmup, steps = (1, 2) if args.cpu else (2, 5)
    budget = args.budget_s if args.budget_s is not None else (60.0 if args.cpu else 240.0)

    report = dict(environment=environment(device), anchors=ANCHORS, output=str(args.output), cpu=args.cpu)
    report["tests"] = {} if args.skip_tests else run_tests(args.cpu)
    deadline = time.perf_counter() + budget
    report["matmul"] = measure_matmul(device)
    rate = report["matmul"]["median_flops"]
    report["models"] = {}
    for name in [m for m in args.models.split(",") if m]:
        if name not in shapes:
            raise SystemExit(f"gpu_check: unknown model {name!r}; valid: {sorted(shapes)}")

        def cfg_for(*extra, _shape=shapes[name]):
            return _config(_shape, crops, precision, extra)

        compile_step = not args.cpu or args.cpu_compile
        report["models"][name] = measure_model(
            name, cfg_for, batches, device, rate, deadline, warmup, steps, compile_step
        )
    report["elapsed_s"] = time.perf_counter() - start
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(summary(report))
    failed = report["tests"].get("counts", {}).get("failed", 0) + report["tests"].get("counts", {}).get("error", 0)
    return 1 if failed or report["tests"].get("returncode") not in (None, 0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
