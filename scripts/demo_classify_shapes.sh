#!/usr/bin/env bash
# Multi-head demo: render the hand-drawn shapes dataset, fine-tune a small ViT on its three tasks
# (presence / closure / circularity, with missing labels) from random initialisation, and predict.
#   bash scripts/demo_classify_shapes.sh [OUT_DIR] [extra key=value training options]
# Per-task validation accuracy ends up in OUT_DIR/run/summary.json.
set -euo pipefail
out=${1:-runs/shapes_demo}
shift || true
python=${PYTHON:-python}
"$python" scripts/make_shapes_dataset.py "$out/data" --count 2000 --size 48 --seed 0
"$python" -m dinov2.classify.train output_dir="$out/run" \
  data.train=CSV:path="$out/data/train.csv" data.val=CSV:path="$out/data/val.csv" \
  data.crop_size=48 data.resize_size=48 data.min_scale=0.7 data.batch_size=64 data.num_workers=1 \
  data.mean=[0.5,0.5,0.5] data.std=[0.5,0.5,0.5] \
  backbone.arch=vit_tiny backbone.patch_size=6 backbone.embed_dim=128 backbone.depth=4 backbone.num_heads=4 \
  heads.pooling=cls+mean optim.mode=full optim.epochs=20 optim.head_lr=1e-3 optim.backbone_lr=5e-4 \
  optim.layer_decay=0.9 optim.warmup_epochs=2 logging.log_period_iterations=0 "$@"
"$python" -m dinov2.classify.predict --model "$out/run" --images "$out/data/images" --output "$out/predictions.csv"
