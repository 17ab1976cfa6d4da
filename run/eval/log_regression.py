#!/usr/bin/env python
"""Submit the log_regression evaluation to SLURM with submitit (requeued and restarted on timeout).

    python run/eval/log_regression.py --nodes 1 --ngpus 8 --partition P --timeout 240 --output-dir OUT [log_regression options ...]

See docs/distributed.md.
"""

import sys

from dinov2.run.submit import EVAL_TARGETS, main

if __name__ == "__main__":
    sys.exit(main(default_target=EVAL_TARGETS["log_regression"], description="Submit the log_regression evaluation to SLURM", stoppable=False))
