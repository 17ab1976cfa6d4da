"""Thin entry: ``python train/train.py --config-file configs/train/<recipe>.yaml --output-dir OUT key=value ...``

Also installed as the ``dinov2-train`` console script; see docs/training.md.
"""

import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.train.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
