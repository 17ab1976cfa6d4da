#!/usr/bin/env bash
# The Quick, Draw! recipe, then a Gram-anchoring phase appended, with a control phase of the same
# length without the Gram term; k-NN on CLS tokens and on mean-pooled patch tokens after each.
#
#   scripts/quickdraw_gram_anchoring.sh [OUT] [key=value ...]
#
# OUT defaults to runs/quickdraw_gram. Lengths: PRETRAIN_ITERS (default 3300, the recipe) and
# GRAM_ITERS (default 2000) iterations; GRAM_WEIGHT (default 2.0, as DINOv3) is gram.loss_weight.
# key=value pairs override all three trainings (e.g. gram.resolution_scale=2.0). KNN_BANK and
# KNN_QUERIES (default 80 and 20: the recipe's whole split) are the drawings per category of the
# k-NN bank and queries. PRETRAIN_RUN=DIR continues a finished recipe run instead of training
# OUT/pretrain (for example scripts/quickdraw_pretrain_eval.sh's output; it must hold the
# checkpoint of iteration PRETRAIN_ITERS).
#   OUT/pretrain   the recipe for PRETRAIN_ITERS iterations (or PRETRAIN_RUN)
#   OUT/gram       PRETRAIN_ITERS + GRAM_ITERS: continued from OUT/pretrain's last checkpoint
#                  (train.init_from_checkpoint) with gram.use_loss=true; the Gram teacher is the
#                  pretrained EMA teacher, taken at the phase's iteration 0
#   OUT/control    the same continuation without the Gram term
# Both continuations restart the recipe's cosine schedule over GRAM_ITERS iterations without
# warm-up. The recipe runs in fp32 where the CPU has no bf16 matmuls (see scripts/demo.sh).
# Prints one JSON line per run (knn_cls_top1, knn_patch_mean_top1) and writes OUT/results.json.
# Measured figures: docs/gram_anchoring.md. PYTHON selects the interpreter.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/quickdraw_gram
if [[ $# -gt 0 && "$1" != *=* ]]; then
    OUT=$1
    shift
fi
PRETRAIN_ITERS=${PRETRAIN_ITERS:-3300}
GRAM_ITERS=${GRAM_ITERS:-2000}
GRAM_WEIGHT=${GRAM_WEIGHT:-2.0}

ROOT=$("$PYTHON" scripts/fetch_quickdraw.py | tail -n 1)
if [[ ! -d "$ROOT" ]]; then
    echo "scripts/fetch_quickdraw.py did not give a data folder (got '$ROOT')" >&2
    exit 1
fi
export DINOV2_DATA=${DINOV2_DATA:-$(dirname "$(dirname "$ROOT")")}

common=(evaluation.knn_period_iterations=0 evaluation.export_period_iterations=0)
if ! "$PYTHON" -c "import sys, torch; sys.exit(not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))"; then
    common+=(compute_precision.param_dtype=fp32 compute_precision.teacher_dtype=fp32)
fi

train() {  # train OUTPUT_DIR key=value ...
    local start=$(date +%s)
    "$PYTHON" train/train.py --config-file configs/train/quickdraw_vit_tiny.yaml --output-dir "$@" > /dev/null
    echo "[gram] $1: $(( $(date +%s) - start )) s" >&2
}

PRETRAIN=${PRETRAIN_RUN:-$OUT/pretrain}
if [[ -z "${PRETRAIN_RUN:-}" ]]; then
    train "$PRETRAIN" optim.total_iterations="$PRETRAIN_ITERS" "${common[@]}" "$@"
fi
checkpoint=$(printf '%s/checkpoints/ckpt_%08d' "$PRETRAIN" "$PRETRAIN_ITERS")
if [[ ! -d "$checkpoint" ]]; then
    echo "no checkpoint of iteration $PRETRAIN_ITERS in $PRETRAIN: expected $checkpoint" >&2
    exit 1
fi
continued=(
    train.init_from_checkpoint="$checkpoint"
    optim.total_iterations="$GRAM_ITERS" optim.warmup_iterations=0 optim.freeze_last_layer_iterations=0
    "${common[@]}"
)
train "$OUT/gram" "${continued[@]}" gram.use_loss=true gram.loss_weight="$GRAM_WEIGHT" "$@"
train "$OUT/control" "${continued[@]}" "$@"

"$PYTHON" scripts/quickdraw_cls_patch_knn.py "$PRETRAIN" "$OUT/gram" "$OUT/control" \
    --root "$ROOT" --bank-per-class "${KNN_BANK:-80}" --queries-per-class "${KNN_QUERIES:-20}" --json "$OUT/results.json"
