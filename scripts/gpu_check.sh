#!/usr/bin/env bash
# GPU acceptance check (about 5 minutes on one CUDA GPU): the cuda-marked tests, then the
# training-step speed, peak memory and MFU of ViT-S/14 and ViT-L/14; every figure in one JSON file.
#   scripts/gpu_check.sh                      # on a CUDA machine -> gpu_check.json
#   scripts/gpu_check.sh --cpu                # tiny shapes on the CPU (what CI runs)
# Options are those of scripts/gpu_check.py (--output FILE, --budget-s S, --skip-tests, --models).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
