"""Training through submitit on the single-node SLURM cluster of ../shared/slurm (CPU, gloo).

CI starts the cluster with ``start_slurm.sh``; without ``sinfo`` or a responding controller the
tests skip and say why.
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

ITERATIONS = 400  # ~25 s of training on a quiet machine, ~60 s under load


def _slurm_problem():
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools (sinfo, sbatch) are not installed; start ../shared/slurm/start_slurm.sh"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    if result.returncode != 0:
        return f"slurmctld is not answering: {result.stderr.strip()[:200]}"
    if "up" not in result.stdout:
        return f"no partition is up: {result.stdout.strip()!r}"
    return None


_PROBLEM = _slurm_problem()
if _PROBLEM:
    pytestmark.append(pytest.mark.skip(reason=_PROBLEM))


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
        "--nodes", "1", "--ngpus", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1",
        "--timeout", str(timeout_min), "--signal-delay", str(signal_delay), "--job-name", "dinov2-test",
        "--output-dir", str(output_dir),
    ] + list(overrides)
    args, rest = get_args_parser("test", "dinov2.train.train:main").parse_known_args(argv)
    assert rest[:2] == ["--output-dir", str(output_dir)]
    return submit(args.target, rest, args, stoppable=True)


def _job_log(job) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(Path(job.paths.folder).glob("*_log.*")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset_root):
    import pytest as _pytest

    out = tmp_path_factory.mktemp("slurm_full") / "out"
    job = _submit(out, training_overrides(dataset_root, ITERATIONS) + ["checkpointing.period_iterations=100", "evaluation.eval_period_iterations=100"], 10, 60)
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
    about a minute (the requeued job waits ~30 s before it starts again)."""
    reference_out, _ = uninterrupted
    out = tmp_path / "out"
    # A checkpoint every 2 iterations costs 0.2-1 s each, disk-bound: the 400 iterations take well
    # over a minute on any machine, so SLURM's signal (17-45 s into an attempt) always cuts the
    # first attempt. Checkpoint frequency does not change the result (resume is exact).
    overrides = ["checkpointing.period_iterations=2", "checkpointing.keep_last=2", "evaluation.eval_period_iterations=100"]
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
    reference_backbone, _ = read_teacher_state(CheckpointManager(reference_out / "checkpoints").complete_checkpoints()[-1][1])
    backbone, _ = read_teacher_state(CheckpointManager(out / "checkpoints").complete_checkpoints()[-1][1])
    for key, value in reference_backbone.items():
        assert torch.equal(backbone[key], value), key
    reference, metrics = read_metrics(reference_out), read_metrics(out)
    for iteration in (ITERATIONS - 1, ITERATIONS):
        assert metrics[iteration]["total_loss"] == reference[iteration]["total_loss"]
