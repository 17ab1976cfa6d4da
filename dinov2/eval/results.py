"""Writing evaluation results: a JSON file for programs and a short text summary for people."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from dinov2.utils.io import atomic_write_text

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


def format_percent(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.2f}%"
