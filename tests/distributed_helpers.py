"""Shared pieces of the distributed tests: a tiny model config, a tiny image folder, launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]

# A 2-block ViT with 32-dim tokens on 16 px images, patch 4; small heads.
TINY_MODEL = [
    "student.arch=vit_small",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "student.layerscale=0.1",
    "student.drop_path_rate=0.0",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_bottleneck_dim=16",
    "dino.head_hidden_dim=32",
    "ibot.head_n_prototypes=64",
    "ibot.head_bottleneck_dim=16",
    "ibot.head_hidden_dim=32",
]

TINY_FACTORY_KWARGS = dict(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2, init_values=0.1)


def training_overrides(dataset_root: Path, max_iterations: int, batch_size: int = 2) -> List[str]:
    """Trainer runs: DINO loss only (iBOT masks and KoLeo neighbourhoods are drawn per rank batch,
    so only the DINO term is independent of how a global batch is split), fp32, no workers."""
    return TINY_MODEL + [
        "ibot.loss_weight=0.0",
        "dino.koleo_loss_weight=0.0",
        f"train.dataset_path=ImageFolder:root={dataset_root}",
        f"train.batch_size_per_gpu={batch_size}",
        "train.num_workers=0",
        "train.OFFICIAL_EPOCH_LENGTH=10",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1",
        f"train.max_iterations={max_iterations}",
        "checkpointing.period_iterations=3",
        "checkpointing.keep_last=10",
        "logging.log_period_iterations=1",
        "evaluation.export_period_iterations=3",
    ]


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 24) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun_command(nproc: int, script: str, args: List[str], port: int) -> List[str]:
    return (
        TORCHRUN
        + [
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            script,
        ]
        + list(args)
    )


def train_command(output_dir: Path, overrides: List[str], nproc: int, port: int) -> List[str]:
    args = ["--output-dir", str(output_dir)] + overrides
    if nproc == 1:
        return [PYTHON, str(REPO / "train" / "train.py")] + args
    return torchrun_command(nproc, str(REPO / "train" / "train.py"), args, port)


def run(command: List[str], log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    with open(log, "w") as handle:
        result = subprocess.run(
            command, cwd=REPO, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        )
    return result


def read_metrics(output_dir: Path) -> Dict[int, dict]:
    path = output_dir / "training_metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["iteration"]: record for record in records}


def logged_iteration(output_dir: Path) -> int:
    path = output_dir / "training_metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return 0
    try:
        return int(json.loads(lines[-1])["iteration"])
    except (ValueError, KeyError):
        return 0  # a line being written


def wait_for_iteration(process: subprocess.Popen, output_dir: Path, iteration: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = logged_iteration(output_dir)
        if current >= iteration:
            return current
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode} before iteration {iteration}")
        time.sleep(0.02)
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")


def _children(pid: int) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_pids(launcher_pid: int) -> List[int]:
    """The training processes under a torchrun launcher (descendants running train.py)."""
    pids, frontier = [], [launcher_pid]
    while frontier:
        children = [child for pid in frontier for child in _children(pid)]
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "train.py" in cmdline:
                pids.append(child)
        frontier = children
    return sorted(pids)


def free_port() -> int:
    from dinov2.distributed import free_port as _free_port

    return _free_port()
