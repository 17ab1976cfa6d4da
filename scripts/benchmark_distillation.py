"""Measure distillation on Quick, Draw!: teacher pretraining, distillation into a half-width
student, the same student shape pretrained from scratch for the same time, k-NN of all three, and
feature-extraction speed student vs teacher.

    python scripts/benchmark_distillation.py [--output-dir runs/bench_distill] [--teacher-iterations 8000]
        [--distill-iterations 4000] [--teacher-run DIR] [--threads 2] [key=value ...]

1. Teacher: ``configs/train/quickdraw_vit_tiny.yaml`` for ``--teacher-iterations`` (its schedule,
   warm-up and prototype freeze scaled to that length), timed. An existing teacher run in
   ``OUT/teacher`` is reused when it has reached that length (its recorded time is then reused too).
   ``--teacher-run DIR`` uses a finished training output of the recipe instead (for example
   ``scripts/quickdraw_pretrain_eval.sh``'s), timed by the step times in its metrics log.
2. Distillation: ``configs/train/quickdraw_distill.yaml`` from that teacher for
   ``--distill-iterations``, timed.
3. Scratch: the student's shape (``configs/train/quickdraw_vit_tiny.yaml`` with the student's width)
   pretrained from scratch with a schedule sized to the distillation's wall time (its step time
   calibrated on 20 steps after 10 warm-up steps first), stopped at that time at the latest.
4. k-NN (``eval/knn.py``: the first ``--knn-bank-per-class`` (80) train drawings per category as
   the bank, the last ``--knn-queries-per-class`` (20) test drawings as queries, k=20, T=0.07) of the teacher's, the distilled
   student's and the scratch student's exports.
5. Feature extraction: teacher and student backbones alternately on the same 512 test-size
   drawings (inference mode, median of 7 timings each), side by side in one process.

Prints a JSON summary (also written to ``OUT/summary.json``): iterations, wall times, k-NN top-1,
step times from each run's metrics log (the median step, and iterations x median step: the run's
length on a quiet machine, which a run paused or slowed by other jobs does not show in its wall
time), the ratios the issue asks for, images/s of extraction and the FLOPs of one forward per image.
``key=value`` overrides apply to all three trainings (``compute_precision.param_dtype=fp32``
is the default here: bf16 is emulated on CPUs without AVX512-BF16 / AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
TEACHER_RECIPE = REPO / "configs" / "train" / "quickdraw_vit_tiny.yaml"
DISTILL_RECIPE = REPO / "configs" / "train" / "quickdraw_distill.yaml"
FP32 = ["compute_precision.param_dtype=fp32", "compute_precision.teacher_dtype=fp32"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/bench_distill")
    parser.add_argument("--teacher-iterations", type=int, default=8000)
    parser.add_argument("--distill-iterations", type=int, default=4000)
    parser.add_argument(
        "--teacher-run",
        default=None,
        help="a finished training output of the teacher recipe to distil from instead of training one in OUT/teacher",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every step (2 on this machine)")
    parser.add_argument(
        "--knn-bank-per-class", type=int, default=80, help="k-NN bank: the first N training drawings of each category"
    )
    parser.add_argument(
        "--knn-queries-per-class", type=int, default=20, help="k-NN queries: the last N (<= 20) test drawings of each"
    )
    parser.add_argument("opts", nargs="*", help="key=value overrides for the three trainings")
    return parser


def scaled_schedule(iterations: int) -> list:
    """The recipes' warm-up (100 of 8000) and prototype freeze (25) shortened with the schedule."""
    return [
        f"optim.total_iterations={iterations}",
        f"optim.warmup_iterations={max(1, round(iterations * 100 / 8000))}",
        f"optim.freeze_last_layer_iterations={max(1, round(iterations * 25 / 8000))}",
        f"checkpointing.period_iterations={iterations}",
        f"evaluation.export_period_iterations={iterations}",
        "evaluation.knn_period_iterations=0",
    ]


def train(recipe: Path, output_dir: Path, overrides: list, stop_after_seconds: float = 0.0) -> dict:
    """Train in this process; returns iterations done and the loop's wall time (set-up excluded)."""
    from dinov2.train.trainer import SSLTrainer
    from dinov2.utils.config import load_config

    cfg = load_config(str(recipe), overrides)
    trainer = SSLTrainer(cfg, output_dir=output_dir)
    start = time.perf_counter()
    if stop_after_seconds > 0:
        step = trainer.train_step

        def timed_step(batch):
            result = step(batch)
            if time.perf_counter() - start >= stop_after_seconds:
                trainer.request_stop()
            return result

        trainer.train_step = timed_step
    result = trainer.train()
    seconds = time.perf_counter() - start
    if result["stopped"]:
        trainer.export_teacher()  # stopped by time between two export boundaries
    return {"iterations": int(result["iteration"]), "seconds": seconds}


def logged_step_times(run_dir: Path) -> dict:
    """Step times of a run from its metrics log: the logged windows' total, their median per step,
    and iterations x median. Each window's step time is its ``eta_seconds`` over the iterations
    left; a resumed run logs the iterations after its checkpoint again, and the last logging wins."""
    from omegaconf import OmegaConf

    from dinov2.train.metrics import read_metrics

    total = int(OmegaConf.load(run_dir / "config.yaml").optim.total_iterations)
    by_iteration = {int(record["iteration"]): record for record in read_metrics(run_dir)}
    seconds, per_step, previous = 0.0, [], 0
    for iteration in sorted(by_iteration):
        if iteration < total:  # the last window's eta is 0: it says nothing about its steps
            step = by_iteration[iteration]["eta_seconds"] / (total - iteration)
            seconds += step * (iteration - previous)
            per_step.append(step)
        previous = iteration
    if not per_step:
        raise ValueError(f"{run_dir}: its metrics log has no window before iteration {total}")
    median = statistics.median(per_step)
    return {"logged_step_seconds": seconds, "median_step_seconds": median, "quiet_seconds": median * previous}


def calibrate_step_seconds(recipe: Path, overrides: list, steps: int = 20, warmup: int = 10) -> float:
    """Median seconds of one training step (loader included) of ``recipe``, after ``warmup`` steps.
    With 3 warm-up steps the estimate came out 26% above the run's median step (0.637 s against
    0.504 s), probably because the first steps wait on freshly started loader workers."""
    import tempfile

    from dinov2.train.trainer import SSLTrainer
    from dinov2.utils.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        trainer = SSLTrainer(load_config(str(recipe), overrides), output_dir=tmp)
        batches = iter(trainer.loader)
        times = []
        for index in range(steps + warmup):
            start = time.perf_counter()
            batch = next(batches)
            batch.pop("skipped_images", None)
            trainer.train_step(batch)
            trainer.iteration += 1
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def knn_top1(
    weights: Path, data_root: Path, output_dir: Path, bank_per_class: int = 80, queries_per_class: int = 20
) -> float:
    # split=test holds the drawings after the first train_per_class of each category (80-99).
    spec = f"QuickDraw:root={data_root}:train_per_class={100 - queries_per_class}"
    bank = f"QuickDraw:root={data_root}:train_per_class={bank_per_class}"
    command = [
        sys.executable,
        str(REPO / "eval" / "knn.py"),
        "--pretrained-weights",
        str(weights),
        "--train-dataset",
        f"{bank}:split=train",
        "--test-dataset",
        f"{spec}:split=test",
        "--resize-size",
        "28",
        "--nb-knn",
        "20",
        "--temperature",
        "0.07",
        "--output-dir",
        str(output_dir),
    ]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((output_dir / "results.json").read_text())
    return float(results["runs"][0]["splits"]["test"]["k=20"]["top1"])


def extraction_speed(teacher_dir: Path, student_dir: Path, repeats: int = 7, batch: int = 512) -> dict:
    """Images/s of teacher and student backbone forwards, timed alternately on the same batch."""
    from dinov2.hub.sources import load_backbone
    from dinov2_tools.step_profile import flop_counter_mode

    models = {
        name: load_backbone(str(path))[0].eval() for name, path in (("teacher", teacher_dir), ("student", student_dir))
    }
    images = torch.randn(batch, 3, 28, 28)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(images)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
        flops = {}
        for name, model in models.items():
            counter = flop_counter_mode()  # CPU attention included
            with counter:
                model(images[:1])
            flops[name] = counter.get_total_flops()
    speed = {name: batch / statistics.median(t) for name, t in times.items()}
    return {
        "images_per_second": speed,
        "forward_flops_per_image": flops,
        "student_speedup": speed["student"] / speed["teacher"],
    }


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not 0 < args.knn_queries_per_class <= 20 or not 0 < args.knn_bank_per_class <= 100 - args.knn_queries_per_class:
        parser.error(
            f"--knn-bank-per-class {args.knn_bank_per_class} and --knn-queries-per-class {args.knn_queries_per_class}: "
            "the bank (the first drawings of each category) and the queries (the last ones, at most 20) must not overlap"
        )
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from dinov2.train.train import setup_logging
    from dinov2.utils.io import atomic_write_text

    root = (
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "fetch_quickdraw.py")], check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    data_root = Path(root)
    os.environ.setdefault("DINOV2_DATA", str(data_root.parent.parent))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, True)
    extra = FP32 + list(args.opts)
    summary: dict = {
        "teacher_iterations": args.teacher_iterations,
        "distill_iterations": args.distill_iterations,
        "knn_bank_per_class": args.knn_bank_per_class,
        "knn_queries_per_class": args.knn_queries_per_class,
        "overrides": extra,
    }

    teacher_dir = Path(args.teacher_run) if args.teacher_run else out / "teacher"
    timing_file = teacher_dir / "benchmark_time.json"
    if args.teacher_run:
        from dinov2.train.metrics import read_metrics

        done = max((int(record["iteration"]) for record in read_metrics(teacher_dir)), default=0)
        if done < args.teacher_iterations:
            parser.error(
                f"--teacher-run {teacher_dir}: trained {done} iterations, not --teacher-iterations {args.teacher_iterations}"
            )
        teacher = {"iterations": done, "seconds": logged_step_times(teacher_dir)["logged_step_seconds"]}
    elif timing_file.is_file() and json.loads(timing_file.read_text())["iterations"] >= args.teacher_iterations:
        teacher = json.loads(timing_file.read_text())
    else:
        teacher = train(TEACHER_RECIPE, teacher_dir, scaled_schedule(args.teacher_iterations) + extra)
        atomic_write_text(timing_file, json.dumps(teacher))
    summary["teacher"] = teacher

    distill_overrides = scaled_schedule(args.distill_iterations) + [f"distillation.teacher={teacher_dir}"] + extra
    summary["distill"] = train(DISTILL_RECIPE, out / "distill", distill_overrides)

    # The student's shape from scratch, on the teacher recipe, for the distillation's wall time.
    shape = ["student.embed_dim=96", "student.num_heads=3"]
    probe = scaled_schedule(args.distill_iterations) + shape + extra
    step_seconds = calibrate_step_seconds(TEACHER_RECIPE, probe)
    scratch_iterations = max(10, int(summary["distill"]["seconds"] / step_seconds))
    summary["scratch"] = train(
        TEACHER_RECIPE,
        out / "scratch",
        scaled_schedule(scratch_iterations) + shape + extra,
        stop_after_seconds=summary["distill"]["seconds"],
    )
    summary["scratch"]["planned_iterations"] = scratch_iterations
    summary["scratch"]["calibrated_step_seconds"] = step_seconds

    run_dirs = {"teacher": teacher_dir, "distill": out / "distill", "scratch": out / "scratch"}
    for name, run_dir in run_dirs.items():
        summary[name].update(logged_step_times(run_dir))
        summary[name]["knn_top1"] = knn_top1(
            run_dir, data_root, out / name / "eval" / "knn", args.knn_bank_per_class, args.knn_queries_per_class
        )
    summary["speed"] = extraction_speed(teacher_dir, out / "distill")
    summary["ratios"] = {
        "student_knn_vs_teacher": summary["distill"]["knn_top1"] / summary["teacher"]["knn_top1"],
        "distill_time_vs_teacher_time": summary["distill"]["seconds"] / summary["teacher"]["seconds"],
        "distill_quiet_time_vs_teacher_quiet_time": summary["distill"]["quiet_seconds"]
        / summary["teacher"]["quiet_seconds"],
        "student_knn_minus_scratch_knn": summary["distill"]["knn_top1"] - summary["scratch"]["knn_top1"],
        "student_extraction_speedup": summary["speed"]["student_speedup"],
    }
    summary["load_average"] = os.getloadavg()
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
