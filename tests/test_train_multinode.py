"""Two torchrun "nodes" on loopback (c10d rendezvous, one gloo rank each), resumed on one node.

Each node is its own ``torchrun --nnodes=2 --nproc-per-node=1`` launcher, as on two machines
sharing the output directory; only the addresses are loopback. The run's 2-rank FSDP checkpoint
is then resumed by a single process (world size 1, twice the per-rank batch, so the same global
batch) and continues with the same losses as the uninterrupted 2-node run.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_helpers import (
    REPO,
    TORCHRUN,
    free_port,
    make_image_folder,
    read_metrics,
    run,
    subprocess_env,
    train_command,
    training_overrides,
)

from dinov2.checkpoint import CheckpointManager, read_checkpoint_info

pytestmark = pytest.mark.slow

ITERATIONS = 6  # checkpoints at 3 and 6 (training_overrides: every 3 iterations)
LOSS_KEYS = ("total_loss", "dino_loss", "dino_global_crops_loss", "dino_local_crops_loss")
LAUNCH_TIMEOUT = 240  # seconds for both nodes together: start-up, rendezvous and 6 iterations


def node_command(output_dir: Path, overrides, endpoint: str, run_id: str, hosts_store: bool):
    """One node's torchrun: c10d rendezvous at ``endpoint``; the node ranks are assigned by it.

    ``is_host`` says which launcher serves the rendezvous store. torchrun would otherwise infer it
    from whether the endpoint names this machine, which on loopback is true for both nodes (the
    second one then falls back to being a client; explicit is clearer). ``join_timeout`` bounds
    the wait for a node that never comes (default 600 s). ``--local-addr`` is what the other node
    is told to reach this one at (the workers' ``MASTER_ADDR`` when this node gets rank 0);
    without it torchrun uses this machine's FQDN.
    """
    return (
        TORCHRUN
        + [
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={str(hosts_store).lower()},join_timeout=120",
            "--local-addr=127.0.0.1",
            "--max-restarts=0",
            str(REPO / "train" / "train.py"),
            "--output-dir",
            str(output_dir),
        ]
        + list(overrides)
    )


def run_two_nodes(output_dir: Path, overrides, logs_dir: Path):
    """Start both nodes, wait for both (bounded), kill both process groups on any failure."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"dinov2-test-{uuid.uuid4().hex[:8]}"
    processes, logs, handles = [], [], []
    try:
        for node in range(2):
            logs.append(logs_dir / f"node{node}.log")
            handles.append(open(logs[-1], "w"))  # noqa: SIM115 (closed below, after both nodes ended)
            processes.append(
                subprocess.Popen(
                    node_command(output_dir, overrides, endpoint, run_id, hosts_store=node == 0),
                    cwd=REPO,
                    env=subprocess_env(),
                    stdout=handles[-1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # torchrun and its worker share a group: killed together
                )
            )
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while any(p.poll() is None for p in processes):
            failed = [i for i, p in enumerate(processes) if p.poll() not in (None, 0)]
            assert not failed, (
                f"node {failed[0]} exited with {processes[failed[0]].returncode}:\n"
                + logs[failed[0]].read_text()[-3000:]
            )
            assert time.monotonic() < deadline, (
                f"the two nodes did not finish within {LAUNCH_TIMEOUT} s:\n"
                + "\n".join(log.read_text()[-1500:] for log in logs)
            )
            time.sleep(0.2)
        for node, process in enumerate(processes):
            assert process.returncode == 0, (
                f"node {node} exited with {process.returncode}:\n" + logs[node].read_text()[-3000:]
            )
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for handle in handles:
            handle.close()
    return [log.read_text() for log in logs]


def test_two_nodes_c10d_then_resume_on_one_node(tmp_path):
    dataset_root = make_image_folder(tmp_path / "images")
    two_nodes = tmp_path / "two_nodes"
    node_logs = run_two_nodes(two_nodes, training_overrides(dataset_root, ITERATIONS), tmp_path)

    # One process group of two ranks spanning both launchers: each node ran one worker, and the
    # checkpoints hold one shard per rank.
    reference = read_metrics(two_nodes)
    assert sorted(reference) == list(range(1, ITERATIONS + 1))
    checkpoints = CheckpointManager(two_nodes / "checkpoints").complete_checkpoints()
    assert [iteration for iteration, _ in checkpoints] == [3, 6]
    info = read_checkpoint_info(checkpoints[0][1])
    assert info["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(info["files"])
    # Rank 0 (the only rank that logs) ran under exactly one of the launchers: which one is the
    # rendezvous' choice (it orders the nodes by address and process id), not the launch order.
    assert sum("INFO rank 0/2 on cpu" in log for log in node_logs) == 1, node_logs

    # Resume the 2-node checkpoint of iteration 3 on one node: a single process with twice the
    # per-rank batch (the same global batch of 4, so the same learning rate and samples).
    one_node = tmp_path / "one_node"
    shutil.copytree(two_nodes, one_node)
    shutil.rmtree(one_node / "checkpoints" / "ckpt_00000006")
    overrides = training_overrides(dataset_root, ITERATIONS, batch_size=4)
    result = run(train_command(one_node, overrides, nproc=1, port=0), tmp_path / "one_node.log", timeout=180)
    log = (tmp_path / "one_node.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert f"resumed from {one_node / 'checkpoints' / 'ckpt_00000003'}" in log, log[-3000:]
    resumed = read_metrics(one_node)
    assert sorted(resumed) == list(range(1, ITERATIONS + 1))
    # Same tolerance as the single-node 2 -> 1 resharding test (tests/test_distributed_training.py):
    # the only difference is the order of float32 reductions.
    for iteration in range(4, ITERATIONS + 1):
        for key in LOSS_KEYS:
            expected, actual = reference[iteration][key], resumed[iteration][key]
            assert abs(actual - expected) <= 1e-5, f"iteration {iteration} {key}: {actual} vs {expected}"
    assert read_checkpoint_info(one_node / "checkpoints" / "ckpt_00000006")["world_size"] == 1
