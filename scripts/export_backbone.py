#!/usr/bin/env python
"""Export a backbone for transformers, timm or ONNX Runtime (see docs/interop.md).

python scripts/export_backbone.py RUN_DIR_OR_WEIGHTS --format hf --output exported/hf
python scripts/export_backbone.py dinov2_vits14_pretrain.pth --format timm --output exported/timm
python scripts/export_backbone.py RUN_DIR --format onnx --output backbone.onnx --image-size 224 --check
"""

import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.hub.interop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
