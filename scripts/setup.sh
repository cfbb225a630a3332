#!/usr/bin/env bash
# Create .venv and install nufilt with its test tools. Safe to run again.
# torch goes first and pinned: on this kind of host 2.13.0 (CPU) is on disk; a GPU host may
# install its own CUDA build first, and the range in pyproject.toml keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${NUFILT_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -e '.[dev]'
