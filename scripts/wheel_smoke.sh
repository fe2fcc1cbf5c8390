#!/usr/bin/env bash
# What a user installs is the wheel, not the checkout: build it, install it into a fresh venv and,
# from another directory, list the shipped recipes and run the tiny pipeline
# (convert -> train tiny-cpu -> export -> generate).  CI runs this after the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
"$WORK/venv/bin/pip" wheel -q --no-deps -w "$WORK/dist" "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
WHEEL=$(ls "$WORK"/dist/byteify-*.whl)
"$WORK/venv/bin/pip" install -q "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
export PATH="$WORK/venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$WORK"
echo "== wheel $(basename "$WHEEL"): top-level modules: $(unzip -Z1 "$WHEEL" | cut -d/ -f1 | grep -v dist-info | sort -u | tr '\n' ' ')"
if python -c "import cli" 2>/dev/null; then echo "FAIL: a generic top-level 'cli' module is installed"; exit 1; fi
python -m byteify --help >/dev/null
byteify --version
listing=$(byteify recipes ls)  # (not `tee /dev/stderr`: opening it truncates a log that stderr goes to)
echo "$listing"
n=$(printf '%s\n' "$listing" | wc -l)
want=$(ls "$ROOT"/recipes/*.yaml | wc -l)
[ "$n" -eq "$want" ] || { echo "FAIL: 'byteify recipes ls' listed $n recipes, the checkout ships $want"; exit 1; }
python - <<'PY'
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=96, max_position_embeddings=256)
LlamaForCausalLM(cfg).save_pretrained("src")
PY
byteify convert src blt --preset tiny
byteify train tiny-cpu model=blt output_dir=run stages.0.steps=2 run.eval_every=2 run.save_every=2 run.progress=false
byteify export run exported
byteify generate exported "The if" --max-bytes 16
echo "== wheel smoke test passed"
