#!/usr/bin/env bash
# One-command setup on a fresh machine:   ./setup.sh
# Creates .venv/ with ecomtrain (editable) and its stack. torch is pinned first:
# torch==2.13.0 is a CPU wheel on CPU-only machines of this kind (a local file)
# and the CUDA build from PyPI elsewhere; an unpinned torch would pull several
# GB of CUDA packages onto a CPU-only laptop.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/ecomtrain --help >/dev/null
echo "ecomtrain is set up: run '.venv/bin/ecomtrain train recipes/quickstart.yaml'"
