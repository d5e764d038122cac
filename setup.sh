#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0 (installed first, never replaced) and evomerge.
#   bash setup.sh         the library and the `evomerge` command
#   bash setup.sh --dev   also pytest and mergekit 0.1.5 (the test oracle)
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || pip install "torch==2.13.0"
pip install -e ".${extra}"
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
