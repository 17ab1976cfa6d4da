#!/usr/bin/env python
"""Submit the knn evaluation to SLURM with submitit (requeued and restarted on timeout).

    python run/eval/knn.py --nodes 1 --ngpus 8 --partition P --timeout 240 --output-dir OUT [knn options ...]

See docs/distributed.md.
"""

import sys

from dinov2.run.submit import EVAL_TARGETS, main

if __name__ == "__main__":
    sys.exit(main(default_target=EVAL_TARGETS["knn"], description="Submit the knn evaluation to SLURM", stoppable=False))
