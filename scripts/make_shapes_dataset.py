"""Render the multi-head hand-drawn shapes demo dataset (see dinov2_tools/shapes.py).

python scripts/make_shapes_dataset.py /data/shapes --count 2000 --size 64
"""

import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2_tools.shapes import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
