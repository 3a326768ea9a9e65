#!/usr/bin/env bash
# Serve the bundle to 3D Slicer through MONAI Label's stock monaibundle app, with no network access at run time:
#
#   bash monailabel/start.sh STUDIES_DIR [PORT]
#
# STUDIES_DIR: a folder of images (PNG/JPG, single-slice NIfTI/NRRD); MONAI Label keeps the saved labels in
# STUDIES_DIR/labels/final. PORT: default 8000. The first run creates .venv-monailabel (a few minutes, ~8 GB),
# then the app in runs/monailabel/monaibundle with a copy of bundle/ (see monailabel/prepare_app.py).
# Environment: MONAILABEL_HOST (default 127.0.0.1: this machine only; 0.0.0.0 serves other machines),
# MONAILABEL_APP (app folder), MONAILABEL_VENV (environment folder), MONAILABEL_BUNDLE (bundle folder to serve,
# default bundle/), MONAILABEL_FRESH=1 (replace the bundle copy, fine-tuned weights included).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [ $# -lt 1 ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
STUDIES="$(mkdir -p "$1" && cd "$1" && pwd)"
PORT="${2:-8000}"
HOST="${MONAILABEL_HOST:-127.0.0.1}"
APP="${MONAILABEL_APP:-$ROOT/runs/monailabel/monaibundle}"
VENV="${MONAILABEL_VENV:-$ROOT/.venv-monailabel}"
BUNDLE="${MONAILABEL_BUNDLE:-$ROOT/bundle}"
export MONAILABEL_VENV="$VENV"
NAME="breast_ultrasound_segmentation_classification"

bash "$HERE/setup_env.sh"
FRESH=()
[ "${MONAILABEL_FRESH:-0}" = "1" ] && FRESH=(--fresh)
"$VENV/bin/python" "$HERE/prepare_app.py" --app "$APP" --bundle "$BUNDLE" "${FRESH[@]}"

cd "$APP"  # MONAI Label reads an optional .env settings file from the working folder
exec "$VENV/bin/python" -m monailabel.main start_server \
    --app "$APP" --studies "$STUDIES" --host "$HOST" --port "$PORT" \
    --conf models "$NAME" --conf zoo_source github --conf sam2 false --conf preload false
