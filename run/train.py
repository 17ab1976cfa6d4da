#!/usr/bin/env python
"""Submit training to SLURM with submitit (checkpoint, requeue and resume on timeout).

    python run/train.py --nodes 2 --ngpus 8 --partition P --timeout 2880 \
        --config-file configs/train/<recipe>.yaml --output-dir OUT [key=value ...]

See docs/distributed.md.
"""

import os
import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The SLURM tasks unpickle the job, so they import dinov2 too: sbatch hands them this environment.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from dinov2.run.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
