"""Writing evaluation results: a JSON file for programs and a short text summary for people."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

import numpy as np
import torch
from omegaconf import OmegaConf

from dinov2.utils.io import atomic_write_text
from dinov2.utils.tracking import Tracker, flatten_scalars, tracking_options

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.txt"


def to_jsonable(value: Any) -> Any:
    """Plain Python types for numpy / torch scalars and arrays; NaN and inf become None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads as "undefined" (e.g. ROC-AUC with one class)
    if isinstance(value, Path):
        return str(value)
    return value


def prepare_output_dir(output_dir: os.PathLike | str) -> Path:
    """Create ``output_dir`` and check that files can be written in it; ``OSError`` naming it and why.

    Called before the backbone is loaded: an evaluation computes for minutes or hours before it
    writes anything, and a mistyped path or a read-only mount must not cost that.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output directory {output_dir} is a file, not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((p for p in output_dir.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file" if blocking else (error.strerror or str(error))
        raise OSError(f"cannot create output directory {output_dir}: {why}") from error
    # A real write, not os.access: that says yes to root and knows nothing of read-only mounts.
    probe = output_dir / f".write_test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as error:
        raise PermissionError(f"output directory {output_dir} is not writable: {error.strerror or error}") from error
    finally:
        probe.unlink(missing_ok=True)
    return output_dir


def write_json(path: os.PathLike | str, data: Mapping) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")


def write_results(output_dir: os.PathLike | str, results: Mapping, summary_lines: Iterable[str]) -> Path:
    """``results.json`` and ``summary.txt`` in ``output_dir``; returns the JSON path."""
    output_dir = Path(output_dir)
    path = write_json(output_dir / RESULTS_FILE, results)
    atomic_write_text(output_dir / SUMMARY_FILE, "\n".join(summary_lines).rstrip() + "\n")
    return path


# Sections of results.json that describe the run rather than measure it: not tracked.
_UNTRACKED_SECTIONS = ("method", "backbone", "datasets", "settings", "class_names", "heads", "history", "runs")


def tracked_metrics(results: Mapping) -> Dict[str, float]:
    """The numbers of an evaluation's results by ``/``-joined name (``test/top1``,
    ``best_head/val_top1``; k-NN: ``test/k=20/top1``, few-shot banks prefixed by their name)."""
    metrics = flatten_scalars({key: value for key, value in results.items() if key not in _UNTRACKED_SECTIONS})
    runs = results.get("runs", [])
    for run in runs:
        metrics.update(flatten_scalars(run["splits"], "" if len(runs) == 1 else f"{run['bank']}/"))
    return metrics


def track_results(output_dir: os.PathLike | str, cfg: Any, results: Mapping, method: str) -> None:
    """Send an evaluation's results to the tracking sinks its config's ``logging`` section switches
    on (see :mod:`dinov2.utils.tracking`; nothing is imported when none is): the linear heads' validation
    history at its iterations (``val_top1/<head>``), then :func:`tracked_metrics` at the last
    iteration (0 for k-NN and logistic regression). A rerun in the same directory replaces the
    TensorBoard points and continues the W&B run. Main process only."""
    options = tracking_options(cfg.get("logging"))
    if not options.enabled:
        return
    run_config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    tracker = Tracker(
        output_dir, options, step_key="iteration", start_step=None, run_config=run_config, job_type=f"eval-{method}"
    )
    try:
        names = [head["name"] for head in results.get("heads", [])]
        for entry in results.get("history", []):
            tracker.log(
                {f"val_top1/{name}": value for name, value in zip(names, entry["val_top1"])}, entry["iteration"]
            )
        tracker.log(tracked_metrics(results), step=results.get("settings", {}).get("iterations", 0))
    finally:
        tracker.close()


def format_percent(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.2f}%"
