#!/usr/bin/env python
"""Render the PCA of a backbone's patch features as RGB maps beside the input images.

    python scripts/pca_patch_features.py --pretrained-weights RUN --images photos/ --output pca.png
    python scripts/pca_patch_features.py --arch dinov2_vits14 --pretrained-weights dinov2_vits14_pretrain.pth \
        --images a.jpg b.jpg --image-size 448 --foreground-threshold 0.5 --output pca.png

See docs/evaluation.md.
"""

import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.eval.pca import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
