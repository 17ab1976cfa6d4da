"""Pictures of evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Above this many classes, per-cell numbers and tick labels are unreadable: draw the matrix only.
_MAX_ANNOTATED_CLASSES = 30
_MAX_LABELLED_CLASSES = 60


def save_figure(fig: Figure, path: os.PathLike | str, dpi: int = 100) -> Path:
    """Write a figure atomically (PNG by default; the format follows the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    path: os.PathLike | str,
    class_names: Optional[Sequence[str]] = None,
    title: str = "Confusion matrix",
    normalize: bool = True,
) -> Path:
    """Rows = true class, columns = predicted; colour = share of the row when ``normalize``."""
    counts = np.asarray(matrix, dtype=np.float64)
    num_classes = counts.shape[0]
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix must be square, got shape {counts.shape}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    row_sums = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0) if normalize else counts

    side = min(4 + 0.45 * num_classes, 30)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class" if normalize else "count")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if num_classes <= _MAX_LABELLED_CLASSES:
        ax.set_xticks(range(num_classes))
        ax.set_yticks(range(num_classes))
        ax.set_xticklabels(names, rotation=90)
        ax.set_yticklabels(names)
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        for i in range(num_classes):
            for j in range(num_classes):
                if counts[i, j]:
                    colour = "white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black"
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    return save_figure(fig, path)
