"""Training through submitit on a real single-node SLURM cluster (CPU, gloo).

The cluster is ``scripts/slurm_test_cluster.sh`` (munge, MariaDB + slurmdbd, slurmctld, slurmd).
``.ci/run`` starts it before the suite; otherwise, when these tests run as root and the cluster is
not answering, the session starts it (installing the Debian packages if needed) and stops it again
at the end. ``DINOV2_SLURM_AUTOSTART=0`` turns that off. The tests skip, naming what is missing, only
where the cluster cannot run: not root, or no Debian packages and no apt-get.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_helpers import REPO, make_image_folder, read_metrics, training_overrides  # noqa: E402

from dinov2.checkpoint import CheckpointManager, read_checkpoint_info  # noqa: E402
from dinov2.checkpoint.consolidate import read_teacher_state  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ITERATIONS = 300  # ~20 s of training on a quiet machine, ~60 s beside the other test worker
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_test_cluster.sh"
START_COMMAND = f"sudo bash {CLUSTER_SCRIPT.relative_to(REPO)} start"
# A cold start installs six Debian packages (about 30 s here); a warm one takes seconds.
START_TIMEOUT_S = 420
CANNOT_RUN_HERE = 2  # the script's exit status for "not root" / "packages missing and no apt-get"


def _cluster_problem():
    """None when jobs can be submitted, else what is missing."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "the SLURM client tools (sbatch, sinfo) are not installed"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%a %T"], check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    if result.returncode != 0:
        return f"no SLURM controller answers ({result.stderr.strip()[:200]})"
    if "up" not in result.stdout:
        return f"no SLURM partition is up: {result.stdout.strip()!r}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """A cluster that accepts jobs: the running one, or one this session starts and stops."""
    problem = _cluster_problem()
    if problem is None:
        yield
        return
    if os.environ.get("DINOV2_SLURM_AUTOSTART", "1") == "0":
        pytest.skip(f"{problem}; DINOV2_SLURM_AUTOSTART=0, so the test cluster is not started: {START_COMMAND}")
    try:
        started = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "start"], check=False, capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{CLUSTER_SCRIPT.name} start took over {START_TIMEOUT_S} s:\n{error.stdout}\n{error.stderr}")
    output = (started.stdout + started.stderr).strip()
    if started.returncode == CANNOT_RUN_HERE:
        reason = output.splitlines()[-1].removeprefix("[slurm-test-cluster] error: ")
        pytest.skip(f"{problem}, and the test cluster cannot be started here: {reason}")
    if started.returncode != 0 or _cluster_problem() is not None:
        pytest.fail(f"{CLUSTER_SCRIPT.name} start failed (exit {started.returncode}):\n{output[-3000:]}")
    yield
    stopped = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "stop"], check=False, capture_output=True, text=True, timeout=120
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm_images"))


@pytest.fixture(autouse=True)
def _job_environment(monkeypatch):
    # sbatch exports the submitting environment: the jobs import this checkout, one thread each.
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)


def _submit(output_dir: Path, overrides, timeout_min: int, signal_delay: int):
    from dinov2.run.submit import get_args_parser, submit

    argv = [
        "--nodes",
        "1",
        "--ngpus",
        "0",
        "--ntasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--timeout",
        str(timeout_min),
        "--signal-delay",
        str(signal_delay),
        "--job-name",
        "dinov2-test",
        "--output-dir",
        str(output_dir),
    ] + list(overrides)
    args, rest = get_args_parser("test", "dinov2.train.train:main").parse_known_args(argv)
    assert rest[:2] == ["--output-dir", str(output_dir)]
    return submit(args.target, rest, args, stoppable=True)


def _job_log(job) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(Path(job.paths.folder).glob("*_log.*")))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory, dataset_root):
    import pytest as _pytest

    out = tmp_path_factory.mktemp("slurm_full") / "out"
    job = _submit(
        out,
        training_overrides(dataset_root, ITERATIONS)
        + ["checkpointing.period_iterations=100", "evaluation.export_period_iterations=100"],
        10,
        60,
    )
    try:
        assert job.results() == [0, 0]  # one result per task
    except Exception as error:  # the job's own traceback is in its log
        _pytest.fail(f"SLURM training job failed: {error}\n{_job_log(job)[-4000:]}")
    return out, job


def test_two_task_training_job_runs_to_completion(uninterrupted):
    out, job = uninterrupted
    complete = CheckpointManager(out / "checkpoints").complete_checkpoints()
    assert complete[-1][0] == ITERATIONS
    assert read_checkpoint_info(complete[-1][1])["world_size"] == 2  # both tasks formed one process group
    assert max(read_metrics(out)) == ITERATIONS
    assert "Job completed successfully" in _job_log(job)


@pytest.mark.timeout(900)
def test_time_limit_checkpoints_requeues_and_matches(uninterrupted, dataset_root, tmp_path):
    """A 1-minute limit: SLURM signals (SIGUSR2, 15 s before the limit, at the controller's next
    check), the run checkpoints at a step boundary and requeues until it is done. Each cycle costs
    a minute: the requeued job starts ~25 s after the signal (cred_expire=20) and is signalled ~35 s later."""
    reference_out, _ = uninterrupted
    out = tmp_path / "out"
    # A checkpoint every 4 iterations (disk-bound: 111 iterations in the 33 s of a first attempt in
    # CI) makes the 300 iterations take well over a minute, so SLURM's signal (17-45 s into an
    # attempt) cuts the first attempt; each requeue cycle then costs a minute however little is
    # left (docs/distributed.md). 400 iterations took eight attempts (7.5 minutes of the suite, with
    # cred_expire=30) where two or three prove the same thing. Checkpoint frequency does
    # not change the result (resume is exact). On a heavily loaded machine job start-up (18-29 s
    # seen at load 5) can eat most of an attempt; CI runs on a quiet one.
    overrides = [
        "checkpointing.period_iterations=4",
        "checkpointing.keep_last=2",
        "evaluation.export_period_iterations=100",
    ]
    job = _submit(out, training_overrides(dataset_root, ITERATIONS) + overrides, 1, 15)
    try:
        assert job.results() == [0, 0]
    except Exception as error:
        pytest.fail(f"time-limited job failed: {error}\n{_job_log(job)[-4000:]}")
    log = _job_log(job)
    if "resumed from" not in log:
        pytest.skip("this machine finished the run before SLURM's time-limit signal arrived: nothing was requeued")
    assert "training stopped on " in log  # the signal path (checkpoint and exit), not only periodic saves
    assert max(read_metrics(out)) == ITERATIONS

    # Same rank count throughout: the final teacher equals the uninterrupted run's exactly.
    reference_backbone, _ = read_teacher_state(
        CheckpointManager(reference_out / "checkpoints").complete_checkpoints()[-1][1]
    )
    backbone, _ = read_teacher_state(CheckpointManager(out / "checkpoints").complete_checkpoints()[-1][1])
    for key, value in reference_backbone.items():
        assert torch.equal(backbone[key], value), key
    reference, metrics = read_metrics(reference_out), read_metrics(out)
    for iteration in (ITERATIONS - 1, ITERATIONS):
        assert metrics[iteration]["total_loss"] == reference[iteration]["total_loss"]
