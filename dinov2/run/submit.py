"""Submit training and evaluation to SLURM with submitit; checkpoint, requeue and resume on timeout.

``python run/train.py --nodes 2 --ngpus 8 --partition P --timeout 2880 --config-file ... --output-dir OUT``
sends one job of ``nodes x tasks-per-node`` tasks (one per GPU; ``--ngpus 0`` runs CPU tasks with
gloo). Every task runs the same entry point (``dinov2.train.train:main`` by default) with the
process group set from submitit's job environment.

Timeout and preemption: SLURM sends submitit's signal (SIGUSR2) ``--signal-delay`` seconds before
the time limit. :class:`JobRunner` routes it into the training loop's stop flag, so every rank
finishes its step, the run writes a checkpoint together and leaves the loop; then task 0 hands
over to submitit's own handler, which calls :meth:`JobRunner.checkpoint` (returning the same
job) and requeues it. The requeued job resumes from the newest complete checkpoint in the output
directory. Evaluation entry points are run the same way; on timeout they are requeued and start
over (they do not checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

logger = logging.getLogger("dinov2")

TRAIN_TARGET = "dinov2.train.train:main"
EVAL_TARGETS = {
    "knn": "dinov2.eval.knn:main",
    "linear": "dinov2.eval.linear:main",
    "log_regression": "dinov2.eval.log_regression:main",
}


def resolve_target(target: str) -> Callable:
    """``"package.module:function"`` -> the function."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module_name), attribute)


def preemption_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit (``SUBMITIT_PREEMPT_SIGNAL``)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    value = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if value is None:
        raise ValueError(f"unknown signal in SUBMITIT_PREEMPT_SIGNAL={name!r}")
    return value


def export_distributed_environment(job_env) -> None:
    """torchrun-style variables from submitit's ``JobEnvironment`` (read by ``dinov2.distributed``)."""
    from dinov2.distributed import slurm_master_port

    hostnames = list(job_env.hostnames)
    master = "127.0.0.1" if job_env.num_nodes <= 1 else hostnames[0]
    os.environ.setdefault("MASTER_ADDR", master)
    os.environ.setdefault("MASTER_PORT", str(slurm_master_port(str(job_env.job_id).split("_")[0])))
    os.environ["RANK"] = str(job_env.global_rank)
    os.environ["WORLD_SIZE"] = str(job_env.num_tasks)
    os.environ["LOCAL_RANK"] = str(job_env.local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(job_env.num_tasks // max(job_env.num_nodes, 1))


class JobRunner:
    """The submitit callable: run ``target(argv)`` in every task; requeue on timeout/preemption.

    The preemption signal is forwarded to the training loop's stop handler (the SIGUSR1 handler
    that ``dinov2.train.train.main`` installs with :class:`~dinov2.checkpoint.signals.StopSignal`),
    so the loop checkpoints at the next step boundary and returns; task 0 then calls submitit's
    handler, which requeues the job. When no stop handler is listening (start-up, evaluation),
    submitit's handler runs at once: the job is requeued and restarts from the newest complete
    checkpoint (training) or from scratch (evaluation).
    """

    def __init__(self, target: str, argv: Sequence[str], stoppable: bool = True):
        self.target = target
        self.argv = list(argv)
        self.stoppable = stoppable
        self.preempted = False

    def __call__(self):
        import submitit

        job_env = submitit.JobEnvironment()
        export_distributed_environment(job_env)
        function = resolve_target(self.target)
        preempt = preemption_signal()
        submitit_handler = signal.getsignal(preempt)
        self.preempted = False

        def on_preemption(signum, frame):
            self.preempted = True
            stop_handler = signal.getsignal(signal.SIGUSR1)
            if self.stoppable and callable(stop_handler):
                # Only sets the loop's stop flag; given the real signal, so that the run's last
                # line says "stopped on SIGUSR2" (SLURM's notice), not SIGUSR1.
                stop_handler(signum, frame)
            elif callable(submitit_handler):
                submitit_handler(signum, frame)  # checkpoint() + requeue + exit (task 0)

        signal.signal(preempt, on_preemption)
        result = function(self.argv)
        if self.preempted and callable(submitit_handler):
            # The loop has written its checkpoint; task 0 requeues (and exits), the others end.
            logger.info("preempted or timed out: checkpoint written, requeueing")
            submitit_handler(preempt, None)
        return result

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before requeueing: the state is already on disk (or the latest
        complete checkpoint is used), so the same job is resubmitted unchanged."""
        import submitit

        return submitit.helpers.DelayedSubmission(JobRunner(self.target, self.argv, self.stoppable))


def get_args_parser(description: str, default_target: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Every other argument (--config-file, --output-dir, key=value ...) is passed to the entry point.",
    )
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    slurm.add_argument("--ngpus", type=int, default=8, help="GPUs per node; 0 runs CPU tasks with gloo (default 8)")
    slurm.add_argument(
        "--ntasks-per-node", type=int, default=None, help="tasks per node (default: --ngpus, or 1 with --ngpus 0)"
    )
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: SLURM's)")
    slurm.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: SLURM's)")
    slurm.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    slurm.add_argument("--timeout", type=int, default=2800, help="time limit of one job in minutes (default 2800)")
    slurm.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which the job checkpoints and requeues (default 120)",
    )
    slurm.add_argument("--max-requeues", type=int, default=20, help="how many timeouts may be requeued (default 20)")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--qos", default=None)
    slurm.add_argument("--comment", default=None)
    slurm.add_argument("--exclude", default=None, help="nodes to avoid")
    slurm.add_argument("--job-name", default=None)
    slurm.add_argument("--submitit-dir", default=None, help="where submitit logs go (default: OUTPUT_DIR/submitit)")
    slurm.add_argument("--wait", action="store_true", help="wait for the job to finish and report its result")
    slurm.add_argument("--target", default=default_target, help=argparse.SUPPRESS)
    return parser


def _output_dir(args, rest: List[str]) -> Optional[Path]:
    """--output-dir from the forwarded arguments (it is also the entry point's own option)."""
    for index, item in enumerate(rest):
        if item == "--output-dir" and index + 1 < len(rest):
            return Path(rest[index + 1])
        if item.startswith("--output-dir="):
            return Path(item.split("=", 1)[1])
    if args.submitit_dir:
        return None
    raise SystemExit("error: --output-dir (or --submitit-dir) is required when submitting to SLURM")


def build_executor(args, folder: Path):
    import submitit

    tasks_per_node = args.ntasks_per_node or (args.ngpus if args.ngpus > 0 else 1)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    parameters = dict(
        nodes=args.nodes,
        tasks_per_node=tasks_per_node,
        timeout_min=args.timeout,
        slurm_signal_delay_s=args.signal_delay,
        name=args.job_name or "dinov2",
    )
    if args.ngpus > 0:
        parameters["gpus_per_node"] = args.ngpus
    if args.cpus_per_task:
        parameters["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        parameters["mem_gb"] = args.mem_gb
    if args.partition:
        parameters["slurm_partition"] = args.partition
    additional = {
        k: v
        for k, v in (("account", args.account), ("qos", args.qos), ("comment", args.comment), ("exclude", args.exclude))
        if v
    }
    if additional:
        parameters["slurm_additional_parameters"] = additional
    executor.update_parameters(**parameters)
    return executor


def submit(target: str, argv: Sequence[str], args, stoppable: bool):
    """Submit ``target(argv)`` with the SLURM options in ``args``; returns the submitit job."""
    output_dir = _output_dir(args, list(argv))
    folder = Path(args.submitit_dir) if args.submitit_dir else output_dir / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    executor = build_executor(args, folder / "%j")
    job = executor.submit(JobRunner(target, argv, stoppable=stoppable))
    return job


def main(
    argv: Optional[Sequence[str]] = None,
    default_target: str = TRAIN_TARGET,
    description: str = "Submit DINOv2 training to SLURM (submitit)",
    stoppable: bool = True,
) -> int:
    """Parse SLURM options; every other argument goes to the target unchanged."""
    parser = get_args_parser(description, default_target)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    job = submit(args.target, rest, args, stoppable)
    print(f"submitted job {job.job_id}; logs in {job.paths.folder}")
    if args.wait:
        result = job.result()
        print(f"job {job.job_id} finished: {result}")
    return 0
