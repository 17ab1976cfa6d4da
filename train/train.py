"""Thin entry: ``python train/train.py --config-file configs/train/<recipe>.yaml --output-dir OUT key=value ...``

Also installed as the ``dinov2-train`` console script; see docs/training.md.
"""

import sys

from dinov2.train.train import main

if __name__ == "__main__":
    sys.exit(main())
