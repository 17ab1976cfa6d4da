#!/usr/bin/env python
"""Consolidate a sharded training checkpoint into one teacher-backbone file.

    python scripts/consolidate_checkpoint.py OUTPUT_DIR_OR_CKPT_DIR --output teacher.pth [--with-heads] [--safetensors]
"""

import sys

from dinov2.checkpoint.consolidate import main

if __name__ == "__main__":
    sys.exit(main())
