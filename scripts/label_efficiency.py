#!/usr/bin/env python
"""Label-efficiency table for a pretrained backbone on a dataset (see dinov2_tools.label_efficiency).

    python scripts/label_efficiency.py --backbone runs/qd_tiny \
        --train-dataset "QuickDraw:root=$ROOT:train_per_class=80:split=train" \
        --test-dataset "QuickDraw:root=$ROOT:train_per_class=80:split=test" \
        --labels-per-class 1 5 10 --output-dir runs/label_efficiency [--classifiers none|label-only|fine-tuned|all]

``--backbone`` is a training output directory (its config gives the shape and the normalisation)
or any evaluation backbone source with ``--config-file``. Rows, for each number of labels per
class: logistic regression on CLS and on CLS + average patch token, on each ``--pixel-baselines``
feature, and (``--classifiers``) dinov2.classify from a random initialisation of the same ViT and
fine-tuned from the backbone, best of the sweep. Prints the table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.data.loaders import make_dataset  # noqa: E402
from dinov2.data.transforms import make_classification_eval_transform  # noqa: E402
from dinov2.eval.cli import check_same_classes  # noqa: E402
from dinov2.eval.setup import build_model_for_eval  # noqa: E402
from dinov2.utils.io import atomic_write_text  # noqa: E402
from dinov2_tools import label_efficiency as le  # noqa: E402
from dinov2_tools.trivial_baselines import ink_images, pixel_baseline  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="training output directory or weights file")
    parser.add_argument("--config-file", default=None, help="training config for a bare weights file")
    parser.add_argument("--train-dataset", required=True, help="dataset spec of the training split")
    parser.add_argument("--test-dataset", required=True, help="dataset spec of the test split")
    parser.add_argument("--labels-per-class", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seed", type=int, default=0, help="seed of the labelled choice")
    parser.add_argument("--pixel-baselines", nargs="*", default=["raw", "blur:1.5"])
    parser.add_argument("--c-values", type=float, nargs="+", default=list(le.DEFAULT_C_VALUES))
    parser.add_argument(
        "--classifiers",
        choices=["none", "label-only", "fine-tuned", "all"],
        default="all",
        help="dinov2.classify rows: from a random init of the same ViT, fine-tuned from the backbone, or both",
    )
    parser.add_argument("--classifier-lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="head lr sweep")
    parser.add_argument(
        "--classifier-min-scales", type=float, nargs="+", default=[0.6, 1.0], help="crop-area sweep (1 = no crops)"
    )
    parser.add_argument("--classifier-steps", type=int, default=300, help="optimiser steps per classifier run")
    parser.add_argument("--classifier-batch-size", type=int, default=64)
    parser.add_argument("--output-dir", type=Path, required=True)
    return parser.parse_args(argv)


def classifier_rows(args, backbone, n: int, train_pil, chosen, class_names, random_file: Path) -> list:
    from dinov2.classify.config import load_classify_config
    from dinov2.classify.trainer import train_classifier

    labels_csv = le.write_labelled_subset(
        train_pil, chosen, class_names, args.output_dir / f"labelled_{n}_seed{args.seed}"
    )
    epochs = le.classifier_epochs(args.classifier_steps, args.classifier_batch_size, len(chosen))
    heads = backbone.model.num_heads
    inits = []
    if args.classifiers in ("label-only", "all"):
        inits.append(("label-only ViT (random init)", random_file))
    if args.classifiers in ("fine-tuned", "all"):
        inits.append(("fine-tuned from backbone", args.backbone))
    rows = []
    for name, source in inits:
        best = None
        for recipe in le.sweep(args.classifier_lrs, args.classifier_min_scales):
            init = "random" if source == random_file else "finetune"
            run_dir = args.output_dir / f"n{n}_seed{args.seed}_{init}_{recipe.name}"
            cfg = load_classify_config(
                None,
                [
                    f"output_dir={run_dir}",
                    f"data.train=CSV:path={labels_csv}",
                    f"data.val={args.test_dataset}",
                    f"backbone.source={source}",
                    f"backbone.num_heads={heads}",
                    f"seed={args.seed}",
                    *le.classifier_overrides(recipe, backbone.image_size, epochs, args.classifier_batch_size),
                ],
            )
            top1 = train_classifier(cfg)["final"]["tasks"]["category"]["top1"]
            logging.info("n=%d %s %s: test top-1 %.2f%%", n, name, recipe.name, 100 * top1)
            if best is None or top1 > best["top1"]:
                best = {"top1": top1, "recipe": recipe.name}
        rows.append({"labels_per_class": n, "method": name, **best})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    backbone = build_model_for_eval(args.config_file, args.backbone)
    size = backbone.image_size
    transform = make_classification_eval_transform(size, size, mean=backbone.mean, std=backbone.std)
    train_pil, test_pil = make_dataset(args.train_dataset), make_dataset(args.test_dataset)
    class_names = list(train_pil.classes)
    check_same_classes(class_names, list(test_pil.classes), "test")  # the probes compare integer labels
    train_t = make_dataset(args.train_dataset, transform=transform)
    test_t = make_dataset(args.test_dataset, transform=transform)

    start = time.perf_counter()
    (train_kinds, train_y), (test_kinds, test_y) = (
        le.backbone_features(backbone.model, train_t),
        le.backbone_features(backbone.model, test_t),
    )
    features = {kind: ((train_kinds[kind], train_y), (test_kinds[kind], test_y)) for kind in le.FEATURE_KINDS}
    train_ink, test_ink = ink_images(train_pil), ink_images(test_pil)
    for name in args.pixel_baselines:
        features[f"pixels {name}"] = (
            (pixel_baseline(train_ink, name).numpy(), train_y),
            (pixel_baseline(test_ink, name).numpy(), test_y),
        )
    logging.info("features in %.1f s", time.perf_counter() - start)

    random_file = args.output_dir / "random_init_backbone.pth"
    if args.classifiers in ("label-only", "all"):
        from dinov2.hub.sources import backbone_spec, build_backbone_from_spec
        from dinov2.hub.weights import save_state_dict

        # The label-only rows start from this file: the backbone's shape (DINOv2 or DINOv3), seeded.
        torch.manual_seed(args.seed)
        save_state_dict(build_backbone_from_spec(backbone_spec(backbone.model)).state_dict(), random_file)

    rows = []
    num_classes = len(class_names)
    train_labels = train_y
    for n in args.labels_per_class:
        chosen = le.labelled_indices(train_labels, n, args.seed)
        for name, ((train_x, train_y), (test_x, test_y)) in features.items():
            fit = le.probe_top1(train_x[chosen], train_y[chosen], test_x, test_y, num_classes, args.c_values)
            method = name if name.startswith("pixels") else f"probe {name}"
            rows.append({"labels_per_class": n, "method": method, **fit})
            print(f"n={n:>3} {method:<32} top-1 {100 * fit['top1']:6.2f}%  (C={fit['C']:g})", flush=True)
        if args.classifiers != "none":
            for row in classifier_rows(args, backbone, n, train_pil, chosen, class_names, random_file):
                rows.append(row)
                print(f"n={n:>3} {row['method']:<32} top-1 {100 * row['top1']:6.2f}%  ({row['recipe']})", flush=True)
    atomic_write_text(args.output_dir / "results.json", json.dumps({"seed": args.seed, "rows": rows}, indent=2))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    print("\n| method | " + " | ".join(f"{n} / class" for n in args.labels_per_class) + " |")
    print("| --- |" + " --- |" * len(args.labels_per_class))
    for method in methods:
        cells = {row["labels_per_class"]: row["top1"] for row in rows if row["method"] == method}
        print(f"| {method} | " + " | ".join(f"{100 * cells[n]:.2f}%" for n in args.labels_per_class) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
