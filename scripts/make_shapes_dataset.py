"""Render the multi-head hand-drawn shapes demo dataset (see dinov2/classify/shapes.py).

    python scripts/make_shapes_dataset.py /data/shapes --count 2000 --size 64
"""

import sys

from dinov2.classify.shapes import main

if __name__ == "__main__":
    sys.exit(main())
