"""scripts/gpu_check.sh --cpu: the GPU acceptance check's steps on tiny shapes, every figure in its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_run_writes_every_figure(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--output", str(output)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(output.read_text())
    assert report["cpu"] is True and report["environment"]["torch"]
    # The cuda-marked tests ran and skipped with their reason (no CUDA here).
    tests = report["tests"]
    assert tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert tests["counts"]["skipped"] == len(tests["tests"]) >= 8
    assert all(t["detail"] for t in tests["tests"])
    assert report["matmul"]["median_flops"] > 0 and report["matmul"]["dtype"] == "float32"
    assert set(report["models"]) == {"vit_small", "vit_large"}
    for name, model in report["models"].items():
        assert model["best_batch"] == max(b["batch"] for b in model["batch_search"] if b["fits"]), name
        assert model["step_flops"] > 0
        assert "compiled" in model["skipped"]  # compiling on the CPU is opt-in (--cpu-compile)
        for variant in ("eager", "packed"):
            figures = model["variants"][variant]
            assert figures["batch"] == model["best_batch"]
            for key in ("images_per_s", "step_s", "peak_memory_bytes", "mfu"):
                assert figures[key] > 0, (name, variant, key)
    assert report["anchors"]["dinov2_vitl16_a100_images_per_s"] == 93
    assert "largest batch that fits" in proc.stdout and "images/s" in proc.stdout


def test_gpu_check_without_cuda_says_so_and_names_the_cpu_run(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides any GPU
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--output", str(tmp_path / "x.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--cpu" in proc.stderr
    assert not (tmp_path / "x.json").exists()
