#!/usr/bin/env python
"""Submit the linear evaluation to SLURM with submitit (requeued and restarted on timeout).

    python run/eval/linear.py --nodes 1 --ngpus 8 --partition P --timeout 240 --output-dir OUT [linear options ...]

See docs/distributed.md.
"""

import os
import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
# The SLURM tasks unpickle the job, so they import dinov2 too: sbatch hands them this environment.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from dinov2.run.submit import EVAL_TARGETS, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(
        main(
            default_target=EVAL_TARGETS["linear"], description="Submit the linear evaluation to SLURM", stoppable=False
        )
    )
