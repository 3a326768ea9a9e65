#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install the bundle's dependencies.
# Source it: `source tools/env.sh`. torch is pinned first so that pip takes the CPU build, not CUDA.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.installed-$(sha1sum "$ROOT/setup.cfg" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi
source "$VENV/bin/activate"
set +e
