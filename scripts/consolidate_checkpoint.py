#!/usr/bin/env python
"""Consolidate a sharded training checkpoint into one teacher-backbone file.

python scripts/consolidate_checkpoint.py OUTPUT_DIR_OR_CKPT_DIR --output teacher.pth [--with-heads] [--safetensors]
"""

import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.checkpoint.consolidate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
