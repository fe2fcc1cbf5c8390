"""Generation speed: byteify's cached generator vs the stock ``BltForCausalLM.generate`` on the same
SmolLM2-sized BLT, at 256, 1024 and 2048 bytes of context, in one run.

The model is SmolLM2-135M converted with the auto preset (its global transformer is the real
SmolLM2).  The entropy model is untrained, so the threshold is set to the entropy quantile that
gives the source tokenizer's ~4.1 bytes per patch on the prompt: the global transformer then runs
as often as it would on a calibrated model.  transformers 5.24's ``generate`` only works with
``use_cache=False`` for BLT (with a cache it raises AttributeError), so stock recomputes the
whole prefix for every byte; both are greedy and produce the same bytes (checked below).

Usage: .venv/bin/python benchmarks/generate.py [--new-bytes 32] [--stock-bytes 6] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def converted(work: Path) -> Path:
    out = work / "smollm2-blt"
    if not (out / "config.json").exists():
        gguf = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "smollm2_path.py")], text=True).strip()
        subprocess.run([str(Path(sys.executable).with_name("byteify")), "convert", gguf, str(out), "--no-verify",
                        "--force"], check=True, stdout=subprocess.DEVNULL)
    return out


def corpus_bytes(n: int) -> bytes:
    from byteify.data.corpus import default_documents

    text = "\n\n".join(t for _, t in default_documents()).encode()
    return text[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-bytes", type=int, default=32)
    ap.add_argument("--stock-bytes", type=int, default=6)
    ap.add_argument("--work", default="/tmp/byteify-bench")
    ap.add_argument("--bytes-per-patch", type=float, default=4.1)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    from byteify.generate import generate_ids
    from byteify.tokenizer import encode_bytes

    model_dir = converted(Path(args.work))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    probe = torch.tensor([encode_bytes(corpus_bytes(2048))])
    with torch.no_grad():
        ent = model.model.patcher(probe)[0][0]
    model.config.patching_threshold = float(ent.quantile(1 - 1 / args.bytes_per_patch))
    model.generation_config.use_cache = False
    rows = []
    for ctx in (256, 1024, 2048):
        ids = encode_bytes(corpus_bytes(ctx - 1))
        t0 = time.perf_counter()
        ours = generate_ids(model, ids, args.new_bytes, suppress_special=False, stop_at_eos=False)
        t_ours = time.perf_counter() - t0
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            stock = model.generate(x, max_new_tokens=args.stock_bytes, do_sample=False, use_cache=False,
                                   eos_token_id=None, pad_token_id=3)
        t_stock = time.perf_counter() - t0
        stock_new = stock[0, len(ids):].tolist()
        same = stock_new == ours[: len(stock_new)]
        ours_bps, stock_bps = args.new_bytes / t_ours, len(stock_new) / t_stock
        rows.append((ctx, ours_bps, stock_bps, ours_bps / stock_bps, same))
        print(f"context {ctx}: byteify {ours_bps:.1f} B/s, stock {stock_bps:.2f} B/s, same bytes: {same}", flush=True)
    print()
    print(f"SmolLM2-135M BLT (auto preset), fp32, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, threshold {model.config.patching_threshold:.3f} nats "
          f"(~{args.bytes_per_patch} bytes/patch); byteify generates {args.new_bytes} bytes incl. prefill, stock "
          f"{args.stock_bytes}")
    print()
    print("| context bytes | byteify cached (bytes/s) | stock generate, no cache (bytes/s) | speed-up | same greedy bytes |")
    print("|---:|---:|---:|---:|:---:|")
    for ctx, a, b, r, same in rows:
        print(f"| {ctx} | {a:.1f} | {b:.2f} | {r:.1f}x | {'yes' if same else 'NO'} |")
    target = rows[-1][3] >= 10
    print(f"\ntarget >= 10x at 2048 bytes: {'MET' if target else 'NOT MET'} ({rows[-1][3]:.1f}x)")


if __name__ == "__main__":
    main()
