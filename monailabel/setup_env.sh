#!/usr/bin/env bash
# Create (once) the MONAI Label server environment, separate from the bundle's core .venv:
#
#   bash monailabel/setup_env.sh            # -> .venv-monailabel (or $MONAILABEL_VENV)
#
# Versions are pinned by monailabel/requirements-lock.txt (pip constraints; MONAILABEL_PIN_FILE overrides it, and
# `bash tools/refresh_pins.sh` rewrites it). A second run with unchanged requirements and pins returns at once
# (stamp file). Concurrent runs wait for each other.
# Exit status: 0 ready; 75 the package registry cannot be reached (nothing installed; the test suite skips its
# MONAI Label test on this status only); anything else: the installation failed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${MONAILABEL_VENV:-$ROOT/.venv-monailabel}"
MONAILABEL_VERSION="0.8.5"
PYTHON="${PYTHON:-python3}"
LOCK="${MONAILABEL_PIN_FILE:-$HERE/requirements-lock.txt}"
STAMP="$VENV/.installed-$(cat "$HERE/requirements.txt" "$LOCK" "$HERE/setup_env.sh" | sha1sum | cut -c1-12)"
EX_UNREACHABLE=75

[ -f "$STAMP" ] && exit 0

mkdir -p "$(dirname "$VENV")"
exec 9>"/tmp/monailabel-setup-$(echo -n "$VENV" | sha1sum | cut -c1-12).lock"
flock 9                                     # another run may be installing right now (outside the work tree)
[ -f "$STAMP" ] && exit 0

log() { echo "[setup_env] $*" >&2; }
start=$(date +%s)
log "creating $VENV (MONAI Label $MONAILABEL_VERSION; a few minutes and ~8 GB the first time)"
"$PYTHON" -m venv --clear "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. the registry: fetch MONAI Label's wheel first, with a short timeout, so that "unreachable" is told apart
#    from a failed installation.
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
if ! "${PIP[@]}" download -q --no-deps --timeout 20 --retries 1 -d "$WHEELS" "monailabel==$MONAILABEL_VERSION" \
    >"$WHEELS/probe.log" 2>&1; then
    cat "$WHEELS/probe.log" >&2
    if grep -qiE "connection|resolve|network|timed out|unreachable|proxy|ssl" "$WHEELS/probe.log"; then
        log "the package registry cannot be reached: MONAI Label environment not created"
        rm -rf "$VENV"
        exit $EX_UNREACHABLE
    fi
    exit 1
fi

# 2. everything MONAI Label and the bundle need (torch/torchvision first in the same resolution, see the
#    requirements file), then MONAI Label itself without its sam2 requirement.
pip_install() {  # pip's output goes to a log, shown (less the machine's local-index noise) when it fails
    if ! nice -n 5 "${PIP[@]}" install -q "$@" >"$WHEELS/pip.log" 2>&1; then
        grep -v "^WARNING: Location .* is ignored" "$WHEELS/pip.log" >&2
        log "pip install failed"
        exit 1
    fi
}
pip_install -c "$LOCK" pip
pip_install -c "$LOCK" -r "$HERE/requirements.txt"
pip_install --no-deps "$WHEELS"/monailabel-*.whl

# 3. check that the server imports and sees its sample apps (no network needed from here on)
"$VENV/bin/python" - <<'EOF'
import os, sys
import monai, monailabel, numpy, torch, torchvision
from monailabel.interfaces.app import MONAILabelApp  # the server's imports (pydicom-seg needs pydicom<3)
from monailabel.tasks.infer.bundle import BundleInferTask  # imports torchvision's operators
app = os.path.join(sys.prefix, "monailabel", "sample-apps", "monaibundle", "main.py")
assert os.path.isfile(app), app
print(f"[setup_env] monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, numpy {numpy.__version__}", file=sys.stderr)
EOF
"${PIP[@]}" freeze --all >"$VENV/freeze.txt"
rm -f "$VENV"/.installed-*
touch "$STAMP"
log "ready in $(( $(date +%s) - start )) s: $VENV"
