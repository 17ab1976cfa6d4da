#!/usr/bin/env bash
# The main job on a small default, from a fresh machine: set up the environment, fetch the real
# Quick, Draw! sketches, pretrain the tiny ViT recipe for a few minutes on the CPU, then k-NN-evaluate
# its teacher on the held-out drawings.
#   bash scripts/demo.sh [OUT] [key=value ...]      (default OUT: runs/demo)
# optim.epochs=24 is 600 iterations of the recipe (an epoch override replaces its
# optim.total_iterations; its epoch is 25 iterations), 3-8 minutes on 2 CPU cores; extra
# key=value pairs override the recipe (the full recipe, 3,300 iterations, takes about 26 minutes).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh" | tail -n 1)
out=runs/demo
if [[ $# -gt 0 && "$1" != *=* ]]; then
  out=$1
  shift
fi
cd "$repo"
# The recipe computes in bf16, which needs AVX512-BF16 or AMX; elsewhere bf16 matmuls are emulated
# (80x the fp32 time measured on an AVX2-only CPU), so there the demo runs in fp32.
precision=()
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))"; then
  echo "[demo] this CPU has no bf16 matmuls (AVX512-BF16 / AMX): running the recipe in fp32"
  precision=(compute_precision.param_dtype=fp32 compute_precision.teacher_dtype=fp32)
fi
# ${a[@]+"${a[@]}"}: an empty array is "unbound" under set -u in bash before 4.4 (macOS ships 3.2)
PYTHON="$venv/bin/python" exec bash scripts/quickdraw_pretrain_eval.sh "$out" optim.epochs=24 ${precision[@]+"${precision[@]}"} "$@"
