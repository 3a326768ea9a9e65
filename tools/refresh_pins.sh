#!/usr/bin/env bash
# Refresh the pinned environments on purpose: resolve the requirements afresh (setup.cfg for the core environment,
# monailabel/requirements.txt for MONAI Label) in new temporary environments, write both lock files, copy the core
# versions into bundle/configs/metadata.json, rebuild .venv and .venv-monailabel from the new pins and run the
# test suite. Review `git diff` (and the model card numbers, if a version that touches them moved) before committing.
#
#   bash tools/refresh_pins.sh [TORCH_VERSION]      # default 2.13.0, the CPU build on this machine's disk
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_VERSION="${1:-2.13.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "torch==$TORCH_VERSION" >"$WORK/seed.txt"

VENV="$WORK/core" PIN_FILE="$WORK/seed.txt" bash -c 'source tools/env.sh && pip freeze --all --exclude-editable' \
    >"$WORK/core-freeze.txt"
"$WORK/core/bin/python" tools/pins.py lock "$WORK/core-freeze.txt" requirements-lock.txt \
    --title "Core environment (.venv: tools/env.sh): the bundle, its tests and tools; Python 3.11, CPU torch"
"$WORK/core/bin/python" tools/pins.py metadata

MONAILABEL_VENV="$WORK/monailabel" MONAILABEL_PIN_FILE=/dev/null bash monailabel/setup_env.sh
"$WORK/core/bin/python" tools/pins.py lock "$WORK/monailabel/freeze.txt" monailabel/requirements-lock.txt \
    --title "MONAI Label environment (.venv-monailabel: monailabel/setup_env.sh); Python 3.11, registry torch"

rm -f .venv/.installed-* .venv-monailabel/.installed-*   # both rebuild from the new pins in the test run
bash tools/test.sh
git status --short requirements-lock.txt monailabel/requirements-lock.txt bundle/configs/metadata.json
