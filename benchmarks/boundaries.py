"""Causal patchers against the source tokenizer's token boundaries (issue 12, item 2).

Usage: .venv/bin/python benchmarks/boundaries.py [--steps 100] [--work DIR] [--max-bytes 65536] [--shipped-only]

On the real SmolLM2-135M (converted once into --work): trains the entropy model with the
``entropy-model`` recipe without its ``boundaries`` objective (a byte LM, then its threshold
calibrated to SmolLM2's bytes per token) and as shipped (its entropy also pushed across a
threshold where SmolLM2 starts a token, then calibrated the same way), and scores on the held-out split of
the embedded corpus: precision / recall / F1 of patch starts against SmolLM2's token starts, and
bytes per patch; next to a count table over the previous K bytes ("does the next byte start a
token?", fitted on the training split: the reference's non-neural baseline) and static 4-byte
patches.  Prints a markdown table.  ``--shipped-only`` trains and scores only the shipped recipe's
patcher (for a curve over ``--steps``); each step count trains in its own run directory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BYTEIFY = str(Path(sys.executable).with_name("byteify"))


def sh(*args: str) -> None:
    subprocess.run([BYTEIFY, *args], check=True, stdout=subprocess.DEVNULL)


def count_table_starts(train_ids: torch.Tensor, ids: torch.Tensor, truth_train: torch.Tensor, k: int) -> torch.Tensor:
    """Starts predicted from the previous k ids by majority vote on the training windows."""
    votes: dict[tuple, Counter] = {}
    for row, t_row in zip(train_ids.tolist(), truth_train.tolist()):
        for t in range(k, len(row)):
            votes.setdefault(tuple(row[t - k:t]), Counter())[bool(t_row[t])] += 1
    out = torch.zeros_like(ids, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        for t in range(k, len(row)):
            c = votes.get(tuple(row[t - k:t]))
            out[r, t] = bool(c) and c[True] > c[False]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", default="/tmp/byteify-boundaries")
    ap.add_argument("--max-bytes", type=int, default=65536)
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--weight", type=float, default=4.0)
    ap.add_argument("--shipped-only", action="store_true", help="only the shipped recipe's patcher, no baselines")
    args = ap.parse_args()
    from byteify.convert.sources import bundled_smollm2
    from byteify.patching.calibration import boundary_agreement, held_out_windows, patch_stats
    from byteify.patching.patchers import EntropyPatcher, SourceTokenPatcher, load_entropy_model
    from byteify.resolve import load_source_tokenizer

    work = Path(args.work)
    blt = work / "blt"
    if not (blt / "config.json").exists():
        sh("convert", str(bundled_smollm2()), str(blt), "--force", "--no-verify")
    ids = held_out_windows(["default"], 512, 0.05, 0, max_bytes=args.max_bytes)
    tok = load_source_tokenizer(blt)
    rows = []
    patchers = [("entropy model, byte LM only (the recipe before)", "lm", ["stages.0.boundaries=null"]),
                ("entropy model + boundary objective (the shipped recipe)", "boundaries",
                 [f"stages.0.boundaries={{threshold: {args.threshold}, weight: {args.weight}}}"])]
    for name, key, extra in patchers[1:] if args.shipped_only else patchers:
        out = work / (key if args.steps == 100 else f"{key}-{args.steps}")  # a schedule per step count
        t = time.perf_counter()
        sh("train", "entropy-model", f"model={blt}", f"output_dir={out}", f"stages.0.steps={args.steps}",
           "run.progress=false", "--resume", "auto", *extra)
        model, cfg = load_entropy_model(out)
        starts = torch.cat([EntropyPatcher(model, cfg.patching_threshold).starts(c) for c in ids.split(8)])
        rows.append((f"{name}, calibrated (threshold {cfg.patching_threshold:.2f})", starts, time.perf_counter() - t))
    source = SourceTokenPatcher(tok)
    rows += [] if args.shipped_only else baselines(ids, source)
    n_bytes, n_tokens = patch_stats(ids, source.starts(ids))[:2]
    print(f"Causal patchers vs SmolLM2's token starts on {ids.numel() // 1024} KB of held-out text "
          f"({n_bytes / n_tokens:.2f} bytes/token), entropy models trained {args.steps} steps x 8 KB:\n")
    print("| patcher | precision | recall | F1 | bytes/patch | train+calibrate (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, starts, secs in rows:
        a = boundary_agreement(ids, starts, tok)
        b, p, _ = patch_stats(ids, starts)
        print(f"| {name} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | {b / max(p, 1):.2f} | "
              + (f"{secs:.0f} |" if secs is not None else "- |"))


def baselines(ids: torch.Tensor, source) -> list:
    """The non-neural patchers: count tables over the previous 3 and 4 bytes (fitted to
    ``source``'s token starts), static 4-byte patches."""
    from byteify.data.streams import ByteBatches, decide_holdout
    from byteify.patching.patchers import StaticPatcher

    rows = []
    holdout = decide_holdout(["default"], 0.05, 0)
    train = ByteBatches(["default"], 512, 8, seed=7, holdout=holdout)
    train_ids = torch.cat([next(train)["input_ids"] for _ in range(32)])
    truth_train = torch.cat([source.starts(c) for c in train_ids.split(64)])
    for k in (3, 4):
        rows.append((f"count table over the previous {k} bytes (fitted on {train_ids.numel() // 1024} KB)",
                     count_table_starts(train_ids, ids, truth_train, k), None))
    rows.append(("static, 4 bytes", StaticPatcher(4).starts(ids), None))
    return rows


if __name__ == "__main__":
    main()
