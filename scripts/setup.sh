#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with the CPU build of torch 2.13.0, then this package.
# torch goes first and pinned: a plain `torch` requirement would otherwise pull a multi-GB CUDA build.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
