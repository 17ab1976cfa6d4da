"""Thin entry: k-NN classification on frozen CLS features.

    python eval/knn.py --config-file RUN/config.yaml --pretrained-weights RUN \
        --train-dataset SPEC --val-dataset SPEC --test-dataset SPEC --output-dir OUT
    torchrun --nproc_per_node=4 eval/knn.py ...

Also installed as the ``dinov2-knn`` console script; options: ``--help`` and docs/evaluation.md.
"""

import sys

from dinov2.eval.knn import main

if __name__ == "__main__":
    sys.exit(main())
