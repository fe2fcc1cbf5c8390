"""Benchmark entropy patching on CPU, and calibrate a briefly trained SmolLM2-sized entropy model.

1. Throughput (MB/s of bytes patched) of :class:`byteify.patching.EntropyPatcher` with the default
   entropy model size (the one ``byteify convert`` gives SmolLM2 with the auto preset: hidden 256,
   4 layers; random weights), at a few batch sizes, and of the threshold rules alone.
2. Training path: patch lengths for N training batches computed on the fly (entropy model
   forward, what ``TrainModule.forward`` does) vs loaded from an on-disk entropy cache (fp32
   ``.npy`` per batch) and thresholded; both put next to one training step of the SmolLM2 BLT.
3. Calibration on the demo corpus (``byteify.corpus.default_documents``): the ``entropy-model``
   recipe at a small step count on a converted SmolLM2 directory (its calibration section
   calibrates to the source tokenizer's bytes/token on the held-out split), then the achieved
   bytes/patch on the held-out split and on unseen training windows, next to the source
   tokenizer's bytes/token and the other patchers.

Setup: .venv/bin/byteify convert $(.venv/bin/python scripts/smollm2_path.py) /tmp/smol_blt --no-verify
Usage: .venv/bin/python benchmarks/patching.py --model /tmp/smol_blt [--steps 120] [--work DIR]
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_entropy_model(seed: int = 0):
    """A random BltPatcher of the auto preset's entropy size (what SmolLM2 converts with)."""
    from transformers import BltConfig
    from transformers.models.blt.modeling_blt import BltPatcher

    from byteify.convert.presets import EntropySpec, _round_up

    e = EntropySpec()
    cfg = BltConfig(patcher_config={
        "hidden_size": e.hidden_size, "num_hidden_layers": e.num_hidden_layers, "num_attention_heads": e.num_attention_heads,
        "intermediate_size": e.intermediate_size or _round_up(8 * e.hidden_size / 3, 32), "sliding_window": e.sliding_window,
        "max_position_embeddings": e.max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_theta}})
    torch.manual_seed(seed)
    return BltPatcher(cfg.patcher_config).float().eval(), e


def timed(fn, repeat: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def random_ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (b, t), generator=g)
    ids[:, 0] = 1
    return ids


def bench_throughput(seq_len: int, batch_sizes: list[int], threads: list[int]) -> tuple[str, object]:
    from byteify.patching.patchers import EntropyPatcher

    model, e = default_entropy_model()
    n_params = sum(p.numel() for p in model.parameters())
    before = torch.get_num_threads()
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for bs in batch_sizes:
            ids = random_ids(bs, seq_len)
            p = EntropyPatcher(model, 2.0, batch_size=bs)
            dt = timed(lambda: p(ids))
            ent = p.entropies(ids)
            dt_rules = timed(lambda: p.starts_from_entropies(ids, ent), repeat=5)
            rows.append((n, bs, seq_len, bs * seq_len / dt / 1e6, bs * seq_len / dt_rules / 1e6))
    torch.set_num_threads(before)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"### Entropy patching throughput (CPU, fp32; entropy model hidden {e.hidden_size}, {e.num_hidden_layers} "
             f"layers, {n_params / 1e6:.2f}M parameters, ~{2 * n_params / 1e6:.1f} MFLOP per byte; random weights; "
             f"{os.cpu_count()} CPUs, load average {load:.1f})", "",
             "| threads | batch size | seq len | entropy model + rules (MB/s) | rules alone (MB/s) |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {bs} | {t} | {mbs:.4f} | {rules:.1f} |" for n, bs, t, mbs, rules in rows]
    return "\n".join(lines), model


def bench_cache(model, model_dir: Path | None, n_batches: int, micro: int, seq_len: int, work: Path) -> str:
    """On the fly vs cached entropies for the same N training batches (+ one training step)."""
    from byteify.data.streams import ByteBatches
    from byteify.patching.patchers import EntropyPatcher, lengths_from_starts

    it = iter(ByteBatches(["default"], seq_len, micro, seed=0))
    batches = [next(it)["input_ids"] for _ in range(n_batches)]
    # a threshold in the bulk of the entropies, so that boundaries are non-trivial
    p = EntropyPatcher(model, float(EntropyPatcher(model, 0.0).entropies(batches[0][:1]).median()), batch_size=micro)

    t = time.perf_counter()
    fly = [p(ids) for ids in batches]
    t_fly = time.perf_counter() - t

    cache = work / "entropy-cache"
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i, ids in enumerate(batches):
        np.save(cache / f"{i:06d}.npy", p.entropies(ids).numpy())  # fp32: fp16 rounding moves boundaries
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    cached = []
    for i, ids in enumerate(batches):
        ent = torch.from_numpy(np.load(cache / f"{i:06d}.npy"))
        s = p.starts_from_entropies(ids, ent)
        cached.append(lengths_from_starts(s[:, :-1], s[:, -1]))
    t_cached = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in cache.iterdir())
    same = sum(torch.equal(a, b) for a, b in zip(fly, cached))

    step = None
    if model_dir is not None:
        from byteify.tokenizer import IGNORE_INDEX as IGNORE
        from byteify.train.model import TrainModule, load_model

        blt = load_model(model_dir, "cpu")
        for name, prm in blt.named_parameters():
            prm.requires_grad_("patcher" not in name)
        module = TrainModule(blt)
        ids = batches[0]
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], 1)
        lengths = fly[0]

        def train_step():
            logits = module.model(input_ids=ids, patch_lengths=lengths, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE).backward()

        t = time.perf_counter()
        train_step()  # once: it is the expensive part of this benchmark
        step = time.perf_counter() - t
        del blt, module
    nbytes = n_batches * micro * seq_len
    lines = [f"### Training path: patch lengths for {n_batches} training batches of {micro} x {seq_len} bytes "
             f"({nbytes:,} bytes)", "",
             "| method | time (s) | per batch (s) | extra disk |", "|---|---:|---:|---:|",
             f"| on the fly (entropy model forward, no grad) | {t_fly:.2f} | {t_fly / n_batches:.3f} | 0 |",
             f"| cached: load fp32 entropies + threshold rules | {t_cached:.3f} | {t_cached / n_batches:.4f} | "
             f"{disk / 1e3:.0f} kB ({disk / nbytes:.1f} B/byte) |",
             f"| (building that cache) | {t_write:.2f} | {t_write / n_batches:.3f} | |"]
    if step is not None:
        lines.append(f"| one SmolLM2-BLT training step on one such batch (fwd+bwd, fp32) | {step:.2f} | {step:.2f} | |")
    lines.append("")
    lines.append(f"cached lengths identical to on-the-fly lengths for {same}/{n_batches} batches (an fp16 cache halves "
                 f"the disk but its rounding moves boundaries near the threshold)")
    if step is not None:
        share = (t_fly / n_batches) / (t_fly / n_batches + step)
        lines.append(f"on-the-fly entropy patching is {100 * share:.1f}% of a training step "
                     f"(caching would save at most that, for {disk / nbytes:.1f} extra bytes of disk per byte of data)")
    return "\n".join(lines)


def bench_calibration(model_dir: Path, steps: int, work: Path, max_bytes: int) -> str:
    from byteify.data.streams import ByteBatches, validation_rows
    from byteify.patching.calibration import calibrate, compute_entropies, limit_windows, patch_stats
    from byteify.patching.patchers import (EntropyPatcher, SourceTokenPatcher, SpacePatcher, StaticPatcher,
                                           load_entropy_model)
    from byteify.resolve import load_source_tokenizer
    from byteify.train.recipe import load_recipe
    from byteify.train.trainer import Trainer

    seq_len = 512
    out = work / "entropy-run"
    shutil.rmtree(out, ignore_errors=True)
    recipe, raw = load_recipe("entropy-model", [
        f"model={model_dir}", f"output_dir={out}", f"data.seq_len={seq_len}", f"stages.0.steps={steps}",
        f"stages.0.warmup_steps={max(1, steps // 10)}", "stages.0.batch_bytes=2048", f"run.eval_every={steps}",
        "run.eval_batches=4", "run.progress=false", "run.log_every=10", f"run.save_every={steps}",
        f"calibration.max_bytes={max_bytes}", "run.device=cpu", f"run.threads={torch.get_num_threads()}"])
    t = time.perf_counter()
    summary = Trainer(recipe, raw, log=lambda m: print(f"  [train] {m}", file=sys.stderr)).run()
    t_train = time.perf_counter() - t
    cal = summary["calibration"]
    trained = Path(summary["checkpoint"]) / "model"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_bpb = next(r["bpb"] for r in rows if "step" in r)

    # the same held-out windows again (entropies once) for the monotonic rule, then unseen training windows
    val_rows, holdout = validation_rows(recipe.data.sources, seq_len, recipe.data.val_fraction, recipe.seed,
                                        max_rows=max_bytes // seq_len + 1)
    val_ids = limit_windows(torch.from_numpy(val_rows[:, :-1].astype(np.int64)), max_bytes)
    ent_model, _ = load_entropy_model(trained)
    tok = load_source_tokenizer(trained)
    val_ent = compute_entropies(ent_model, val_ids)
    mono = calibrate(ent_model, val_ids, tokenizer=tok, monotonic=True, entropies=val_ent)
    # training windows of another shuffle than the run's (seed + 1): mostly text the short run never saw
    unseen = ByteBatches(recipe.data.sources, seq_len, 8, seed=recipe.seed + 1, holdout=holdout)
    tr_ids = torch.cat([next(unseen)["input_ids"] for _ in range(max(1, max_bytes // 2 // seq_len // 8))])
    tr_ent = compute_entropies(ent_model, tr_ids)
    from byteify.patching.calibration import tokenizer_bytes_per_token

    def stats(ids, starts):
        b, n, per = patch_stats(ids, starts)
        return b / n, float(per.std(unbiased=False))

    lines = [f"### Calibration on the demo corpus (entropy-model recipe, {steps} steps x 2048 bytes, seq_len {seq_len}, "
             f"{t_train:.0f} s incl. calibration; entropy model bits/byte {first_bpb:.2f} -> val {summary['final_val_bpb']:.2f})",
             "", "| rule | threshold (nats) | target bytes/patch | achieved mean (held-out) | std over windows | "
             "source tokenizer bytes/token | windows x bytes |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| global (written to config.json) | {cal['threshold']:.4f} | {cal['target_bytes_per_patch']:.3f} | "
             f"{cal['mean_bytes_per_patch']:.3f} | {cal['std_bytes_per_patch']:.3f} | {cal['source_bytes_per_token']:.3f} | "
             f"{cal['windows']} x {seq_len} |",
             f"| monotonic (byteify only) | {mono.threshold:.4f} | {mono.target_bytes_per_patch:.3f} | "
             f"{mono.mean_bytes_per_patch:.3f} | {mono.std_bytes_per_patch:.3f} | {mono.source_bytes_per_token:.3f} | "
             f"{mono.windows} x {seq_len} |", ""]
    g = EntropyPatcher(ent_model, cal["threshold"])
    m = EntropyPatcher(ent_model, mono.threshold, monotonic=True)
    table = [("entropy, global, calibrated", lambda ids, ent: g.starts_from_entropies(ids, ent)),
             ("entropy, monotonic, calibrated", lambda ids, ent: m.starts_from_entropies(ids, ent)),
             ("static, 4 bytes", lambda ids, ent: StaticPatcher(4).starts_with_next(ids)),
             ("space (BLT rule)", lambda ids, ent: SpacePatcher().starts_with_next(ids)),
             ("source tokens (SmolLM2 tokenizer)", lambda ids, ent: SourceTokenPatcher(tok).starts_with_next(ids))]
    bpt_val, bpt_tr = tokenizer_bytes_per_token(tok, val_ids), tokenizer_bytes_per_token(tok, tr_ids)
    lines += ["### Achieved bytes/patch on the demo corpus at the calibrated thresholds", "",
              "| patcher | held-out split: mean (std) | unseen training windows: mean (std) |", "|---|---:|---:|"]
    for name, fn in table:
        a, sa = stats(val_ids, fn(val_ids, val_ent))
        b, sb = stats(tr_ids, fn(tr_ids, tr_ent))
        lines.append(f"| {name} | {a:.3f} ({sa:.3f}) | {b:.3f} ({sb:.3f}) |")
    lines.append(f"| *source tokenizer bytes/token* | {bpt_val:.3f} | {bpt_tr:.3f} |")
    lines.append("")
    lines.append(f"held-out: {val_ids.shape[0]} windows ({val_ids.numel():,} bytes); unseen training windows: "
                 f"{tr_ids.shape[0]} ({tr_ids.numel():,} bytes); trained model: {trained}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/smol_blt"), help="converted SmolLM2 BLT directory")
    ap.add_argument("--steps", type=int, default=100, help="entropy-model training steps (2048 bytes each)")
    ap.add_argument("--max-bytes", type=int, default=49152, help="held-out bytes to calibrate on")
    ap.add_argument("--cache-batches", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-training", action="store_true", help="only the throughput and cache tables")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the cache, training and calibration parts (1: on a shared machine two "
                         "OpenMP threads can be many times slower than one)")
    args = ap.parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    work = args.work or Path(tempfile.mkdtemp(prefix="byteify-patching-bench-"))
    have_model = (args.model / "config.json").exists()
    if not have_model:
        print(f"(no converted model at {args.model}: skipping the training step and calibration; see the docstring)",
              file=sys.stderr)
    t0 = time.perf_counter()
    table, model = bench_throughput(1024, [1, 8], sorted({1, os.cpu_count() or 1}))
    torch.set_num_threads(args.threads)
    print(table + "\n", flush=True)
    print(bench_cache(model, args.model if have_model else None, args.cache_batches, 4, 1024, work) + "\n", flush=True)
    if have_model and not args.skip_training:
        print(bench_calibration(args.model, args.steps, work, args.max_bytes) + "\n", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
