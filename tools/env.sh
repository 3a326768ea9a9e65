#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install the bundle's dependencies at the versions
# pinned in requirements-lock.txt (pip constraints; refresh them with `bash tools/refresh_pins.sh`).
# Source it: `source tools/env.sh`. torch is installed first so that pip takes the CPU build, not CUDA.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
LOCK="${PIN_FILE:-$ROOT/requirements-lock.txt}"
STAMP="$VENV/.installed-$(cat "$ROOT/setup.cfg" "$LOCK" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -c "$LOCK" pip
    "$VENV/bin/python" -m pip install -q -c "$LOCK" torch
    "$VENV/bin/python" -m pip install -q -c "$LOCK" -e "$ROOT[test]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi
source "$VENV/bin/activate"
set +e
