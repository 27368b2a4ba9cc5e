#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch and qat installed in editable mode.
# Safe to run repeatedly; called by scripts/run.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  # A bare `torch` requirement pulls a multi-GB CUDA build: install the CPU build first.
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
if [ ! -f .venv/.qat-installed ] || [ pyproject.toml -nt .venv/.qat-installed ]; then
  "$VPY" -m pip install -q -e ".[dev,eval]"
  touch .venv/.qat-installed
fi
