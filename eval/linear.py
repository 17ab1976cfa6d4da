"""Thin entry: a grid of linear probes on frozen features.

    python eval/linear.py --config-file RUN/config.yaml --pretrained-weights RUN \
        --train-dataset SPEC --val-dataset SPEC --test-dataset SPEC --output-dir OUT
    torchrun --nproc_per_node=4 eval/linear.py ...

Also installed as the ``dinov2-linear`` console script; options: ``--help`` and docs/evaluation.md.
"""

import sys

from dinov2.eval.linear import main

if __name__ == "__main__":
    sys.exit(main())
