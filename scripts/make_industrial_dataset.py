#!/usr/bin/env python
"""Write a small synthetic dataset in the industrial inspection layout.

python scripts/make_industrial_dataset.py --out /tmp/bbu --groups 24 --images-per-group 4
then: Industrial:root=/tmp/bbu:split=train
"""

import argparse
import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2_tools.synthetic_industrial import make_industrial_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--groups", type=int, default=24, help="number of parts (groups)")
    parser.add_argument("--images-per-group", type=int, default=4, help="photos per part")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = make_industrial_dataset(args.out, args.groups, args.images_per_group, args.size, args.seed)
    print(f"wrote {sum(counts.values())} images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
