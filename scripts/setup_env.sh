#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the pinned test stack and this package installed.
#   VENV=path/to/venv bash scripts/setup_env.sh     (default: .venv in the repository)
# Every package comes at the version pinned in constraints-test.txt (scripts/refresh_constraints.sh
# rewrites it). A venv is reused only when it was built from the same pins and setup.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$repo/.venv}
python=${PYTHON:-python3}
stamp="$venv/.dinov2-$(cat "$repo/requirements-test.txt" "$repo/constraints-test.txt" "$repo/setup.py" | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  # Only a venv this script built (it carries a .dinov2-* stamp) is ever replaced.
  if [ -e "$venv" ] && ! compgen -G "$venv/.dinov2-*" >/dev/null; then
    echo "[setup] $venv exists but was not built by scripts/setup_env.sh: not replacing it" \
         "(remove it yourself or set VENV to another path)" >&2
    exit 1
  fi
  echo "[setup] building $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet -c "$repo/constraints-test.txt" --upgrade pip
  "$venv/bin/pip" install --quiet -c "$repo/constraints-test.txt" -r "$repo/requirements-test.txt"
  "$venv/bin/pip" install --quiet -c "$repo/constraints-test.txt" -e "$repo[dev]"
  touch "$stamp"
else
  echo "[setup] reusing $venv"
fi
# The editable install points at this checkout; CI clones afresh, so point it here every time.
# (setuptools' editable-install warnings are noise here: shown only if the install fails)
if ! log=$("$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$repo" 2>&1); then
  echo "$log" >&2
  exit 1
fi
echo "$venv"
