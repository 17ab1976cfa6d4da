"""Thin entry: logistic regression on frozen features.

    python eval/log_regression.py --config-file RUN/config.yaml --pretrained-weights RUN \
        --train-dataset SPEC --val-dataset SPEC --test-dataset SPEC --output-dir OUT
    torchrun --nproc_per_node=4 eval/log_regression.py ...

Also installed as the ``dinov2-logreg`` console script; options: ``--help`` and docs/evaluation.md.
"""

import sys
from pathlib import Path

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.eval.log_regression import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
