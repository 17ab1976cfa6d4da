"""Plot every loss term and the online k-NN top-1 of a training run against the iteration.

    python scripts/plot_training_metrics.py OUT [--output OUT/training_metrics.png] [--export-knn FILE]

Reads ``OUT/training_metrics.jsonl`` (written by ``train/train.py``) and writes one PNG with a
panel per loss term (``*_loss``), one for ``knn_top1`` when the monitor ran, and one for the
learning rates and one for the teacher temperature. ``--export-knn`` adds the full-protocol k-NN
of each export to the k-NN panel: the JSON list that
``scripts/quickdraw_cls_patch_knn.py OUT --every-export --json FILE`` writes (``iterations`` and
``knn_cls_top1`` / ``knn_patch_mean_top1`` per export).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.train.metrics import METRICS_FILE_NAME, optional_float, read_metrics  # noqa: E402


def series(records, key):
    points = [(r["iteration"], optional_float(r.get(key))) for r in records if key in r]
    return [(x, y) for x, y in points if y is not None and math.isfinite(y)]


EXPORT_KNN_SERIES = {
    "knn_cls_top1": "full protocol, CLS (exports)",
    "knn_patch_mean_top1": "full protocol, mean patch (exports)",
}


def read_export_knn(path) -> dict:
    """{series name: [(iteration, top-1)]} from a ``quickdraw_cls_patch_knn.py --json`` file of one run."""
    try:
        rows = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "iterations" in r for r in rows):
        raise ValueError(
            f"{path}: expected a JSON list of objects with 'iterations' (quickdraw_cls_patch_knn.py --json)"
        )
    runs = sorted({str(r.get("run")) for r in rows})
    if len(runs) > 1:
        raise ValueError(f"{path}: rows of {len(runs)} runs ({runs}); plot one run's exports at a time")
    return {
        label: sorted((int(r["iterations"]), float(r[key])) for r in rows if key in r)
        for key, label in EXPORT_KNN_SERIES.items()
        if any(key in r for r in rows)
    }


def plot_training_metrics(output_dir, output=None, export_knn=None) -> Path:
    output_dir = Path(output_dir)
    records = read_metrics(output_dir / METRICS_FILE_NAME if output_dir.is_dir() else output_dir)
    if not records:
        raise ValueError(f"{output_dir}: no metrics lines to plot")
    extra = read_export_knn(export_knn) if export_knn else {}
    keys = sorted({k for r in records for k in r if k.endswith("_loss")}, key=lambda k: (k != "total_loss", k))
    panels = [(k, [k]) for k in keys]
    if any("knn_top1" in r for r in records) or extra:
        panels.append(("k-NN top-1 (teacher)", ["knn_top1", *extra]))
    panels.append(("learning rate", ["lr", "last_layer_lr"]))
    panels.append(("teacher temperature", ["teacher_temp"]))
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            points = extra[name] if name in extra else series(records, name)
            if points:
                xs, ys = zip(*points)
                marker = "o" if name == "knn_top1" or name in extra else None
                label = "online monitor" if name == "knn_top1" and extra else name
                ax.plot(xs, ys, marker=marker, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(names) > 1 and ax.lines:
            ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    output = (
        Path(output) if output else (output_dir if output_dir.is_dir() else output_dir.parent) / "training_metrics.png"
    )
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="training output directory (or a training_metrics.jsonl file)")
    parser.add_argument("--output", default=None, help="PNG to write (default: OUT/training_metrics.png)")
    parser.add_argument("--export-knn", default=None, help="JSON of quickdraw_cls_patch_knn.py --every-export --json")
    args = parser.parse_args(argv)
    print(plot_training_metrics(args.output_dir, args.output, args.export_knn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
