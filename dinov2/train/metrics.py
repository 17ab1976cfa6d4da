"""Training metrics: one JSON object per logged iteration in ``training_metrics.jsonl``.

Each line holds ``iteration`` (completed optimizer iterations), ``epoch``, every loss term (mean
over the iterations since the previous line, non-finite steps excluded), the scheduled ``lr``,
``last_layer_lr``, ``wd``, ``momentum`` and ``teacher_temp``, ``grad_norm`` (mean, when gradients
are clipped), ``images_per_sec`` (global), ``eta_seconds``, ``skipped_images`` and
``nonfinite_steps`` (counts since the previous line) and, on iterations where the online monitor
ran, ``knn_top1``.

With ``logging.tensorboard`` / ``logging.wandb.project`` set, every record also goes to TensorBoard
and Weights & Biases under the same names (:mod:`dinov2.utils.tracking`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from dinov2.utils.tracking import Tracker, tracking_options

logger = logging.getLogger("dinov2")

__all__ = ["METRICS_FILE_NAME", "MetricsLogger", "WindowAverager", "read_metrics"]

METRICS_FILE_NAME = "training_metrics.jsonl"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLogger:
    """Appends metric lines (main process only) and mirrors a short human line to ``logging``.

    ``file_name``, ``step_key`` (the field that orders the lines) and ``describe`` (record ->
    log line) default to SSL training's; classifier training logs ``metrics.jsonl`` by ``epoch``.

    ``tracking`` (a ``logging`` config section, see :mod:`dinov2.utils.tracking`) adds the
    TensorBoard / W&B sinks: :meth:`start` opens them once the run's starting step is known,
    :meth:`close` finishes them. ``run_config`` and ``job_type`` describe the run to W&B.
    """

    def __init__(
        self,
        output_dir,
        enabled: bool = True,
        file_name: str = METRICS_FILE_NAME,
        step_key: str = "iteration",
        describe: Optional[Callable[[Dict], str]] = None,
        tracking: Any = None,
        run_config: Optional[Mapping] = None,
        job_type: str = "train",
    ):
        self.path = Path(output_dir) / file_name
        self.enabled = enabled
        self.step_key = step_key
        self.describe = describe if describe is not None else self.format
        self.tracking = tracking_options(tracking)
        self._run_config = run_config
        self._job_type = job_type
        self.tracker: Optional[Tracker] = None

    def start(self, step: int) -> None:
        """The run continues after step ``step`` (0: a fresh run): lines logged after it are
        dropped (:meth:`truncate_after`) and the tracking sinks open there (TensorBoard hides
        its events after ``step``; W&B continues the run whose id the output directory holds)."""
        self.truncate_after(step)
        if self.enabled and self.tracking.enabled and self.tracker is None:
            self.tracker = Tracker(
                self.path.parent,
                self.tracking,
                step_key=self.step_key,
                start_step=step,
                run_config=self._run_config,
                job_type=self._job_type,
            )

    def log_image(self, tag: str, image, step: int, caption: str = "") -> None:
        """An (H, W, 3) image to the tracking sinks (the JSONL file holds numbers only)."""
        if self.tracker is not None:
            self.tracker.log_image(tag, image, step, caption)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def truncate_after(self, iteration: int) -> None:
        """Drop lines logged after step ``iteration`` (a resumed run redoes those steps; on a fresh
        start, 0 drops the lines of an attempt killed before its first checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record.get(self.step_key, 0) <= iteration]
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        if self.tracker is not None:
            self.tracker.log(record)
        record = {key: _jsonable(value) for key, value in record.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        logger.info(self.describe(record))

    @staticmethod
    def format(record: Dict) -> str:
        parts = [f"it {record['iteration']}"]
        for key in ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "infonce_loss", "knn_top1"):
            if key in record and isinstance(record[key], (int, float)):
                parts.append(f"{key} {record[key]:.4f}")
        for key in ("lr", "teacher_temp", "momentum"):
            if key in record:
                parts.append(f"{key} {record[key]:.3g}")
        if "images_per_sec" in record:
            parts.append(f"{record['images_per_sec']:.1f} img/s")
        if "eta_seconds" in record:
            parts.append(f"eta {_format_seconds(record['eta_seconds'])}")
        if record.get("nonfinite_steps"):
            parts.append(f"non-finite steps {record['nonfinite_steps']}")
        if record.get("skipped_images"):
            parts.append(f"skipped images {record['skipped_images']}")
        return "  ".join(parts)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class WindowAverager:
    """Means of scalar values since the last :meth:`reset`."""

    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)

    def add(self, values: Dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)
            self.counts[key] += 1

    def means(self) -> Dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums if self.counts[key]}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def read_metrics(path) -> List[Dict]:
    """All records of a metrics file (or of ``<output_dir>/training_metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == sum(1 for _ in open(path, encoding="utf-8")):
                    logger.warning("%s: ignoring a truncated last line (%s)", path, error)
                    continue
                raise ValueError(f"{path}:{number}: not a JSON line: {error}") from None
    return records


def optional_float(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
