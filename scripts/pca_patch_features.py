#!/usr/bin/env python
"""Render the PCA of a backbone's patch features as RGB maps beside the input images.

    python scripts/pca_patch_features.py --pretrained-weights RUN --images photos/ --output pca.png
    python scripts/pca_patch_features.py --arch dinov2_vits14 --pretrained-weights dinov2_vits14_pretrain.pth \
        --images a.jpg b.jpg --image-size 448 --foreground-threshold 0.5 --output pca.png

See docs/evaluation.md.
"""

import sys

from dinov2.eval.pca import main

if __name__ == "__main__":
    sys.exit(main())
