"""Experiment tracking: metric records mirrored to TensorBoard and Weights & Biases.

Training, evaluation and classifier training write their metrics as JSON records (see
:class:`dinov2.train.metrics.MetricsLogger`); a :class:`Tracker` sends the same records, under
the same names, to the sinks the ``logging`` options switch on. Both sinks are off by default and
their packages (``pip install 'dinov2[tracking]'``) are imported only when switched on, on the
main process only.

Options (``logging.*`` of a config section, a dataclass or a mapping):

* ``tensorboard`` (bool): event files in ``<output_dir>/tensorboard``;
* ``wandb.project`` (str, '' = off), ``wandb.entity``, ``wandb.name`` (default: the output
  directory's name), ``wandb.group``, ``wandb.tags`` (list), ``wandb.mode`` (online | offline |
  disabled; ``$WANDB_MODE``, when set, wins). W&B files go to ``<output_dir>/wandb``.

Resuming: a run that continues from step ``s`` writes to the same TensorBoard directory with
``purge_step=s + 1``, so TensorBoard hides the events a killed attempt wrote after ``s`` (the
steps that are done again) instead of drawing them twice. The W&B run id is stored in
``<output_dir>/wandb_run_id.txt`` and reused with ``resume="allow"``, so a resumed run continues
the same W&B run; W&B plots every record against its step key (``define_metric``), so records
arrive in any order, but its history is append-only: steps done again appear twice there.

Record names: nested mappings are flattened with ``/`` (``val/mean_top1``); numbers and booleans
are logged, strings and lists are not (they stay in the JSON files).
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from dinov2.utils.io import atomic_write_text

logger = logging.getLogger("dinov2")

__all__ = [
    "TENSORBOARD_DIR",
    "WANDB_ID_FILE",
    "Tracker",
    "TrackingOptions",
    "flatten_scalars",
    "tracking_options",
]

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_MODES = ("online", "offline", "disabled")
INSTALL_HINT = "pip install 'dinov2[tracking]'"


@dataclass(frozen=True)
class TrackingOptions:
    tensorboard: bool = False
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_name: str = ""
    wandb_group: str = ""
    wandb_tags: List[str] = field(default_factory=list)
    wandb_mode: str = "online"

    @property
    def enabled(self) -> bool:
        return self.tensorboard or bool(self.wandb_project)


def _get(section: Any, key: str, default: Any) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping):  # dict or DictConfig (read-only configs answer .get too)
        value = section.get(key, default)
    else:
        value = getattr(section, key, default)
    return default if value is None else value


def tracking_options(section: Any) -> TrackingOptions:
    """:class:`TrackingOptions` from a ``logging`` section (DictConfig, dataclass, mapping or
    None: tracking off). Missing keys take their defaults; a bad ``wandb.mode`` is an error."""
    wandb = _get(section, "wandb", None)
    mode = str(_get(wandb, "mode", "online"))
    if mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb.mode must be one of {WANDB_MODES}, got {mode!r}")
    tags = _get(wandb, "tags", [])
    if isinstance(tags, str):
        tags = [tags] if tags else []
    return TrackingOptions(
        tensorboard=bool(_get(section, "tensorboard", False)),
        wandb_project=str(_get(wandb, "project", "")),
        wandb_entity=str(_get(wandb, "entity", "")),
        wandb_name=str(_get(wandb, "name", "")),
        wandb_group=str(_get(wandb, "group", "")),
        wandb_tags=[str(tag) for tag in tags],
        wandb_mode=mode,
    )


def flatten_scalars(record: Mapping, prefix: str = "") -> Dict[str, float]:
    """The numbers of a (nested) record keyed by ``/``-joined names; strings, lists and None
    are left out (booleans become 0 / 1; NaN and inf are kept: the sinks draw them as gaps)."""
    scalars: Dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            scalars.update(flatten_scalars(value, name + "/"))
        elif isinstance(value, (bool, np.bool_)):
            scalars[name] = float(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            scalars[name] = float(value)
    return scalars


def _import_error(package: str, option: str, error: ImportError) -> ImportError:
    return ImportError(f"{option} needs the {package} package ({error}); install it with {INSTALL_HINT}")


class Tracker:
    """The TensorBoard writer and W&B run of one output directory (main process only).

    Args:
        output_dir: the run's output directory (``tensorboard/``, ``wandb/`` and the run id go there).
        options: :class:`TrackingOptions` (or a ``logging`` section for :func:`tracking_options`).
        step_key: the record field that orders the records (``iteration``, ``epoch``); W&B plots
            against it.
        start_step: the step the run continues from (0 for a fresh run); TensorBoard hides
            events of later steps written by an earlier attempt. ``None``: hide everything
            written before (a run that replaces its predecessor, e.g. an evaluation).
        run_config: the run's config, shown by W&B.
        job_type: W&B job type (train, classify, eval-knn, ...).
        enabled: False on non-main processes: nothing is imported or written.
    """

    def __init__(
        self,
        output_dir,
        options: Any,
        step_key: str = "iteration",
        start_step: Optional[int] = 0,
        run_config: Optional[Mapping] = None,
        job_type: str = "train",
        enabled: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.options = options if isinstance(options, TrackingOptions) else tracking_options(options)
        self.step_key = step_key
        self._writer = None
        self._wandb_run = None
        self._wandb = None
        if not enabled or not self.options.enabled:
            return
        if self.options.tensorboard:
            self._writer = self._open_tensorboard(start_step)
        if self.options.wandb_project:
            self._wandb_run = self._open_wandb(run_config, job_type)

    @property
    def active(self) -> bool:
        return self._writer is not None or self._wandb_run is not None

    @property
    def wandb_run(self):
        return self._wandb_run

    # ------------------------------------------------------------------ set-up
    def _open_tensorboard(self, start_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise _import_error("tensorboard", "logging.tensorboard=true", error) from None
        log_dir = self.output_dir / TENSORBOARD_DIR
        # purge_step: TensorBoard drops earlier events at steps >= it (a START marker in the new
        # event file), so steps done again after a resume are drawn once.
        purge_step = 0 if start_step is None else int(start_step) + 1
        logger.info("TensorBoard event files: %s (tensorboard --logdir %s)", log_dir, log_dir)
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def _open_wandb(self, run_config: Optional[Mapping], job_type: str):
        try:
            import wandb
        except ImportError as error:
            raise _import_error("wandb", "logging.wandb.project", error) from None
        self._wandb = wandb
        options = self.options
        self.output_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.output_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
            if not run_id:
                raise ValueError(f"{id_file} is empty: delete it to start a new W&B run")
        else:
            # W&B run ids: letters and digits; 8 random ones, as W&B itself draws them.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            atomic_write_text(id_file, run_id + "\n")
        run = wandb.init(
            project=options.wandb_project,
            entity=options.wandb_entity or None,
            name=options.wandb_name or self.output_dir.resolve().name,
            group=options.wandb_group or None,
            tags=list(options.wandb_tags) or None,
            job_type=job_type,
            mode=os.environ.get("WANDB_MODE") or options.wandb_mode,
            dir=str(self.output_dir),
            id=run_id,
            resume="allow",
            config=dict(run_config) if run_config is not None else None,
        )
        # Every metric is plotted against the step key, not W&B's own counter: a resumed run
        # starts that counter again in offline mode, and online it would refuse smaller steps.
        run.define_metric(self.step_key)
        run.define_metric("*", step_metric=self.step_key)
        logger.info("W&B run %s (project %s, id in %s)", run.name, options.wandb_project, id_file)
        return run

    # ----------------------------------------------------------------- logging
    def log(self, record: Mapping, step: Optional[int] = None) -> None:
        """The numbers of ``record`` at ``step`` (default: ``record[step_key]``)."""
        if not self.active:
            return
        if step is None:
            step = record[self.step_key]
        step = int(step)
        scalars = flatten_scalars(record)
        scalars.pop(self.step_key, None)
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, global_step=step)
            self._writer.flush()  # a killed run keeps what it logged
        if self._wandb_run is not None:
            self._wandb_run.log({**scalars, self.step_key: step})

    def log_image(self, tag: str, image: np.ndarray, step: int, caption: str = "") -> None:
        """An (H, W, 3) image (uint8, or float in [0, 1]) at ``step``."""
        if not self.active:
            return
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        if self._writer is not None:
            self._writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
            self._writer.flush()
        if self._wandb_run is not None:
            picture = self._wandb.Image(image, caption=caption or None)
            self._wandb_run.log({tag: picture, self.step_key: int(step)})

    def close(self) -> None:
        """Flush and close the sinks (finishes the W&B run); later calls do nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
