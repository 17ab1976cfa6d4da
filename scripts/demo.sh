#!/usr/bin/env bash
# The main job on a small default, from a fresh machine: set up the environment, fetch the real
# Quick, Draw! sketches, pretrain the tiny ViT recipe for a few minutes on the CPU, then k-NN-evaluate
# its teacher on the held-out drawings.
#   bash scripts/demo.sh [OUT] [key=value ...]      (default OUT: runs/demo)
# optim.epochs=24 is 600 iterations of the recipe (an epoch override replaces its
# optim.total_iterations; its epoch is 25 iterations), about 3 minutes on 2 CPU cores; extra
# key=value pairs override the recipe (the full recipe, 8,000 iterations, takes about 26 minutes).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh" | tail -n 1)
out=runs/demo
if [[ $# -gt 0 && "$1" != *=* ]]; then
  out=$1
  shift
fi
cd "$repo"
PYTHON="$venv/bin/python" exec bash scripts/quickdraw_pretrain_eval.sh "$out" optim.epochs=24 "$@"
