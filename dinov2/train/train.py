"""``dinov2-train`` / ``python train/train.py``: self-supervised pretraining from a config.

    python train/train.py --config-file configs/train/quickdraw_vit_tiny.yaml --output-dir OUT \
        train.batch_size_per_gpu=64 optim.epochs=50

Several processes: ``torchrun --nproc_per_node=4 train/train.py ...`` (or srun). Running the same
command again with the same ``--output-dir`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from dinov2 import distributed
from dinov2.utils.config import ConfigError, load_config

logger = logging.getLogger("dinov2")

__all__ = ["get_args_parser", "main", "setup_logging"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DINOv2 self-supervised training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are key=value pairs of configs/ssl_default_config.yaml, e.g. optim.epochs=10.",
    )
    parser.add_argument("--config-file", default="", help="experiment config (YAML) merged over the defaults")
    parser.add_argument(
        "--output-dir", default="", help="where config, metrics, checkpoints and exports go (default: train.output_dir)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser


def setup_logging(output_dir: Optional[Path], is_main: bool) -> None:
    """Console (and ``OUT/train_log.txt`` on rank 0) logging for the ``dinov2`` logger."""
    if logger.handlers:
        return
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.addHandler(console)
    if is_main and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(output_dir / "train_log.txt")
        handler.setFormatter(formatter)
        logger.addHandler(handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    overrides = [opt for opt in args.opts if opt != "--"]
    try:
        cfg = load_config(args.config_file or None, overrides)
    except ConfigError as error:  # a mistake in the file or an override: its message, not a traceback
        raise SystemExit(f"dinov2 training: {error}") from None
    output_dir = Path(args.output_dir or cfg.train.output_dir)
    distributed.enable(cfg.distributed.backend)
    setup_logging(output_dir, distributed.is_main_process())

    from dinov2.checkpoint.signals import StopSignal
    from dinov2.train.trainer import SSLTrainer  # after logging, so set-up messages are shown

    try:
        trainer = SSLTrainer(cfg, output_dir=output_dir)
        # SIGTERM / SIGUSR1: checkpoint at the next iteration boundary and exit (rerun to resume).
        with StopSignal(callback=trainer.request_stop) as stop:
            result = trainer.train()
    except BaseException:
        distributed.disable(synchronize=False)
        raise
    _log_outcome(result, stop.received)
    distributed.disable()
    return 0


def _log_outcome(result, received_signal: Optional[int]) -> None:
    """The run's last log line: finished or stopped by a signal, at which iteration, and the
    checkpoint a rerun resumes from."""
    checkpoint = result["checkpoint"]
    if result["stopped"]:
        cause = signal.Signals(received_signal).name if received_signal else "a signal received by another rank"
        outcome = f"training stopped on {cause} at iteration {result['iteration']}"
    else:
        outcome = f"training finished at iteration {result['iteration']}"
    if result["checkpoint_skipped"]:
        resumes = f"resumes from {checkpoint}" if checkpoint else "starts from iteration 0"
        logger.warning(
            "%s without a checkpoint (non-finite steps since the previous checkpoint boundary); a rerun %s",
            outcome,
            resumes,
        )
    elif result["stopped"]:
        logger.info("%s; checkpoint %s written, rerun the same command to resume", outcome, checkpoint)
    else:
        logger.info("%s; final checkpoint %s", outcome, checkpoint)


if __name__ == "__main__":
    sys.exit(main())
