"""Training-step throughput: byteify's training step vs the stock ``BltForCausalLM`` forward/backward
on the same configuration and batch, each in a fresh subprocess (so peak memory is its own).

Model: SmolLM2-135M converted with the auto preset (global = the real SmolLM2, 145M parameters in
all); batch 4 x 1024 bytes of the embedded corpus; static patches of 4 bytes; everything trainable;
AdamW.  byteify: ``TrainModule`` (patch lengths, byte loss over the batch) + clip + AdamW.  Stock:
``model(input_ids, patch_lengths=..., labels=...)`` (transformers' own loss) + the same optimizer.

Usage: .venv/bin/python benchmarks/train_throughput.py [--steps 4] [--batch 4] [--seq-len 1024]
On a GPU machine it also runs a ~1B-sized BLT and reports MFU (add --device cuda).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from transformers import AutoModelForCausalLM, BltConfig, BltForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
from byteify.data.streams import ByteBatches
from byteify.patching.patchers import StaticPatcher
from byteify.train.model import TrainModule
mode, model_dir, steps, batch, seq_len, device = {mode!r}, {model_dir!r}, {steps}, {batch}, {seq_len}, {device!r}
torch.manual_seed(0)
if model_dir.startswith("config:"):
    model = BltForCausalLM(BltConfig.from_pretrained(model_dir[7:]))
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = model.to(device).train()
for p in model.model.patcher.parameters():
    p.requires_grad_(False)
it = iter(ByteBatches(["default"], seq_len, batch, seed=0))
patcher = StaticPatcher(4)
module = TrainModule(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
def step():
    b = next(it)
    ids, labels = b["input_ids"].to(device), b["labels"].to(device)
    with amp:
        if mode == "byteify":
            nats = module(ids, labels, patcher).blt
            loss = nats / (labels != -100).sum()
        else:
            lengths = patcher(ids)
            # stock loss shifts labels itself: give it the inputs as labels
            loss = model(input_ids=ids, patch_lengths=lengths, labels=ids, use_cache=False).loss
    loss.backward()
    if mode == "byteify":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    return float(loss)
step()  # warm-up
if device == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
for _ in range(steps): step()
if device == "cuda": torch.cuda.synchronize()
dt = (time.perf_counter() - t) / steps
peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_params = sum(p.numel() for p in model.parameters())
print(json.dumps({{"bytes_per_s": batch * seq_len / dt, "step_s": dt, "peak_mb": peak, "params": n_params}}))
"""


def run(mode, model_dir, args):
    code = CHILD.format(root=str(ROOT), mode=mode, model_dir=model_dir, steps=args.steps, batch=args.batch,
                        seq_len=args.seq_len, device=args.device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="/tmp/byteify-bench")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.generate import converted

    model_dir = str(converted(Path(args.work)))
    rows = []
    for mode in ("byteify", "stock"):
        r = run(mode, model_dir, args)
        rows.append((mode, r))
        print(mode, r, flush=True)
    print(f"\nSmolLM2-sized BLT ({rows[0][1]['params'] / 1e6:.0f}M parameters), batch {args.batch} x {args.seq_len} bytes, "
          f"static 4-byte patches, fp32 AdamW, {args.device}: {platform.machine()}, {os.cpu_count()} cores\n")
    print("| training step | bytes/s | s/step | peak memory MB |")
    print("|---|---:|---:|---:|")
    for mode, r in rows:
        name = "byteify (TrainModule)" if mode == "byteify" else "stock BltForCausalLM fwd/bwd"
        print(f"| {name} | {r['bytes_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_mb']:.0f} |")
    ratio = rows[0][1]["bytes_per_s"] / rows[1][1]["bytes_per_s"]
    print(f"\ntarget: byteify at least as fast as stock: {'MET' if ratio >= 0.97 else 'NOT MET'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
