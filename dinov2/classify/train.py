"""Classifier training: linear probe, partial or full fine-tuning, and LP-FT with LoRA.

``python -m dinov2.classify.train [--config-file x.yaml] key=value ...`` (options:
:mod:`dinov2.classify.config`). Single process: one device, no torch.distributed.

Modes (``optim.mode``, planned by :mod:`dinov2.classify.stages`):

* ``probe``   - backbone frozen (and in eval mode), heads trained;
* ``partial`` - the last ``optim.unfreeze_last_k`` blocks and the final norm train with the heads;
* ``full``    - everything trains;
* ``lpft``    - stage 1 is a probe for ``lpft.probe_epochs`` epochs; stage 2 injects LoRA
  adapters into the attention (and with ``lpft.mlp`` the MLP) projections and trains adapters +
  heads for the remaining epochs.

Backbone parameters get ``optim.backbone_lr`` times ``layer_decay ** (depth + 1 - layer)``, heads
``optim.head_lr``; every stage has linear warm-up then cosine decay, stepped per iteration
(:mod:`dinov2.classify.optimization`, on :mod:`dinov2.optim`).

Output directory::

    config.yaml           merged options
    metrics.jsonl         one JSON object per epoch (losses, lr, validation accuracy per task)
    checkpoints/epoch_<n>.pth   resume states (weights, optimizer, scaler, best so far)
    checkpoints/epoch_<n>.pth.sha256   the SHA-256 of each, checked before a resume
    model_best.pth        classifier file of the best validation epoch (mean top-1 over tasks)
    model_final.pth       classifier file after the last epoch
    summary.json          final and best validation metrics, trainable-parameter fractions

A run restarted with the same ``output_dir`` resumes from the newest resume state
(:mod:`dinov2.classify.resume`) and drops the ``metrics.jsonl`` lines of the epochs after it;
each epoch reseeds the data order and augmentations from ``(seed, epoch)``, so the resumed run
continues the same sequence. The run itself: :class:`dinov2.classify.trainer.ClassifierTrainer`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from dinov2.utils.config import ConfigError

from .config import load_classify_config
from .trainer import train_classifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train classification heads on a DINOv2 backbone (probe, fine-tuning, LP-FT with LoRA).",
        epilog="Options are key=value overrides, e.g. output_dir=out data.train=CSV:path=labels.csv optim.mode=lpft",
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help="YAML file with options; every option and its default: configs/classify/default.yaml (docs/classify.md)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value options applied after the file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_classify_config(args.config_file, args.overrides)
    except ConfigError as error:  # a mistake in the file or an override: its message, not a traceback
        raise SystemExit(f"dinov2 classifier training: {error}") from None
    summary = train_classifier(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
