#!/usr/bin/env python
"""Submit training to SLURM with submitit (checkpoint, requeue and resume on timeout).

    python run/train.py --nodes 2 --ngpus 8 --partition P --timeout 2880 \
        --config-file configs/train/vitl16_short.yaml --output-dir OUT [key=value ...]

See docs/distributed.md.
"""

import sys

from dinov2.run.submit import main

if __name__ == "__main__":
    sys.exit(main())
