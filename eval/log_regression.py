"""Thin entry: logistic regression on frozen features.

    python eval/log_regression.py --config-file RUN/config.yaml --pretrained-weights RUN \
        --train-dataset SPEC --val-dataset SPEC --test-dataset SPEC --output-dir OUT
    torchrun --nproc_per_node=4 eval/log_regression.py ...

Also installed as the ``dinov2-logreg`` console script; options: ``--help`` and docs/evaluation.md.
"""

import sys

from dinov2.eval.log_regression import main

if __name__ == "__main__":
    sys.exit(main())
