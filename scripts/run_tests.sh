#!/usr/bin/env bash
# Set up the environment, fetch the small public test data, and run the whole test suite.
#   bash scripts/run_tests.sh [extra pytest arguments]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh" | tail -n 1)
export PATH="$venv/bin:$PATH"
if [ -f "$repo/scripts/fetch_quickdraw.sh" ]; then
  bash "$repo/scripts/fetch_quickdraw.sh" || echo "[tests] Quick, Draw! data not fetched: its tests will skip"
fi
cd "$repo"
exec "$venv/bin/python" -m pytest -q "$@"
