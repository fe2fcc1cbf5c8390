"""Attention memory at 8 KB sequences: stock transformers BLT attention (``sdpa``, dense masks) vs
``byteify.attention.MEMORY_EFFICIENT``.

(i) What the dense masks cost at ``--seq-len`` (8192): each mask BltModel/BltPatcher builds, made
    with transformers' own functions for batch 1 in a fresh subprocess (bytes kept, and the
    transient peak RSS of building it); batch 8 is 8x that (the masks are per row).
(ii) Peak memory of ONE training step (forward + backward of the LM loss, no optimizer) at
    ``--seq-len``, each configuration in a fresh subprocess: on CPU the peak RSS of the step over
    the RSS just before it (Linux ``/proc/self/clear_refs`` resets the high-water mark; the
    process's lifetime ``ru_maxrss`` is reported too); on CUDA ``torch.cuda.max_memory_allocated``
    over the memory allocated before the step, under bf16 autocast as the recipes train.

Model: the 1B recipe's local sizes (``blt-1b`` preset: encoder 1 layer, decoder 9 layers, hidden
1024, 16 heads, FFN 2816, cross_attn_k 2, cross-attention in every decoder layer, local window
512, hash n-grams 3..8), the global transformer reduced to fit this machine (default 2 layers of
Llama 3.2 1B's shape: hidden 2048, 32 heads, 8 KV heads, FFN 8192), hash vocab reduced to 4096
per n-gram size (BLT-1B: 500,002 -> 12 GB of fp32 tables), no entropy model inside the BLT
(``patch_in_forward`` off; static patches are passed in); static 4-byte patches in byteify's
convention (a 1-byte patch, then 4-byte patches; lengths sum to seq_len + 1).  ``--models
entropy`` measures one training step of the ``blt-1b`` entropy model instead (14 layers, hidden
768, 12 heads, FFN 2048, window 512; next-byte loss).

Usage: .venv/bin/python benchmarks/attention_memory.py [--seq-len 8192] [--batch 1 2]
       [--checkpointing on off] [--models blt entropy] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
STOCK = "sdpa"


# ---- child side ------------------------------------------------------------------------------
def _status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def static_patch_lengths(batch: int, seq_len: int, size: int = 4):
    """byteify's static patches: [1, size, size, ..., rest], summing to seq_len + 1."""
    import torch

    rest = seq_len
    lengths = [1]
    while rest > 0:
        lengths.append(min(size, rest))
        rest -= lengths[-1]
    return torch.tensor([lengths] * batch, dtype=torch.long)


def blt_config(a):
    from transformers import BltConfig

    local = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=2816, cross_attn_k=2,
                 hidden_size_global=a["global_hidden"], max_position_embeddings=24576,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return BltConfig(
        vocab_size=260, max_position_embeddings=a["seq_len"], patch_in_forward=False, patching_mode="static",
        local_attention_window_len=512, cross_attn_k=2, encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
        encoder_hash_byte_group_vocab=a["hash_vocab"], encoder_hash_byte_group_nb_functions=1,
        encoder_config=dict(local, num_hidden_layers=1, cross_attn_all_layers=False),
        decoder_config=dict(local, num_hidden_layers=9, cross_attn_all_layers=True),
        global_config=dict(hidden_size=a["global_hidden"], num_attention_heads=a["global_hidden"] // 64,
                           num_key_value_heads=8, num_hidden_layers=a["global_layers"],
                           intermediate_size=4 * a["global_hidden"], max_position_embeddings=8192,
                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        patcher_config=entropy_config(a), use_cache=False)


def entropy_config(a):
    return dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12, intermediate_size=2048,
                sliding_window=512, max_position_embeddings=max(8192, a["seq_len"]), rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def child_masks(a) -> dict:
    """Every mask a stock training step builds, for batch 1, with transformers' functions."""
    import torch
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.blt.modeling_blt import BltModel, _prepare_patch_cross_attention_mask

    sys.path.insert(0, str(ROOT))
    import byteify.attention  # noqa: F401  (registers the implementation)

    torch.set_num_threads(2)
    cfg = blt_config(a)
    S = a["seq_len"]
    emb = torch.empty(1, S, 1)
    pos = torch.arange(S)[None]
    lengths = static_patch_lengths(1, S)
    P, k = lengths.shape[1], cfg.cross_attn_k
    pid = BltModel._patch_ids_from_lengths(None, lengths, S)
    dpid = BltModel._patch_ids_from_lengths(None, lengths[:, 1:], S)
    from transformers.models.blt.configuration_blt import BltPatcherConfig

    pcfg = BltPatcherConfig(**entropy_config(a))
    builds = {
        "local self-attn (encoder + 9 decoder layers share it)": lambda: create_sliding_window_causal_mask(
            config=cfg.encoder_config, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos),
        "entropy model self-attn": lambda: create_sliding_window_causal_mask(
            config=pcfg, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos),
        "encoder cross-attn (patches query bytes)": lambda: _prepare_patch_cross_attention_mask(
            pid, P, S, True, k, emb.dtype),
        "decoder cross-attn (bytes query patches)": lambda: _prepare_patch_cross_attention_mask(
            dpid, P, S, False, k, emb.dtype),
    }
    rows = []
    for name, build in builds.items():
        for impl in (STOCK, a["impl"]):
            for c in (cfg.encoder_config, pcfg):
                c._attn_implementation = impl
            gc.collect()
            base = _status("VmRSS")
            _reset_hwm()
            mask = build()
            transient = _status("VmHWM") - base
            if isinstance(mask, torch.Tensor):
                rows.append(dict(mask=name, impl=impl, shape=list(mask.shape), dtype=str(mask.dtype).replace("torch.", ""),
                                 bytes=mask.numel() * mask.element_size(), build_peak=transient))
            else:
                rows.append(dict(mask=name, impl=impl, shape=None, dtype=type(mask).__name__, bytes=0,
                                 build_peak=transient))
            del mask
    return dict(rows=rows, num_patches=P)


def child_step(a) -> dict:
    """One forward + backward at (impl, batch, checkpointing); peak memory of the step."""
    import torch
    from transformers.utils import logging

    sys.path.insert(0, str(ROOT))
    logging.set_verbosity_error()
    from byteify.attention import use_attention

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    device = torch.device(a["device"])
    cuda = device.type == "cuda"
    B, S = a["batch"], a["seq_len"]
    if a["what"] == "entropy":
        from transformers.models.blt.configuration_blt import BltPatcherConfig
        from transformers.models.blt.modeling_blt import BltPatcher

        with device:
            model = BltPatcher(BltPatcherConfig(**entropy_config(a)))
    else:
        from transformers import BltForCausalLM

        with device:
            model = BltForCausalLM(blt_config(a))
    use_attention(model, a["impl"])
    model.train()
    if a["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (B, S), generator=g).to(device)
    lengths = static_patch_lengths(B, S).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        with ctx:
            if a["what"] == "entropy":
                _, _, logits = model(ids)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            else:
                loss = model(input_ids=ids, patch_lengths=lengths, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss)

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status("VmRSS")
        if not _reset_hwm():
            raise SystemExit("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status("VmHWM")
    seconds = time.perf_counter() - t0
    return dict(loss=loss, base=base, peak=peak, step_peak=peak - base, seconds=seconds, params=n_params,
                maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ---- parent side -----------------------------------------------------------------------------
def run_child(payload: dict, timeout: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)]
    # A fixed glibc mmap threshold: every tensor over 64 KiB is its own mapping, returned to the
    # system when freed, so RSS follows live memory (glibc's default threshold grows to 32 MiB
    # after the first frees, and freed blocks below it stay resident and get reused unseen).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    return json.loads(r.stdout.strip().splitlines()[-1])


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fmt_mib(x) -> str:
    return f"{x / MiB:,.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 on CPU; 1 2 4 8 on CUDA")
    ap.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--models", nargs="+", choices=["blt", "entropy"], default=["blt"],
                    help="blt: the BLT step; entropy: one step of the blt-1b entropy model (14 layers)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--global-layers", type=int, default=2)
    ap.add_argument("--global-hidden", type=int, default=2048)
    ap.add_argument("--hash-vocab", type=int, default=4096)
    ap.add_argument("--timeout", type=int, default=1800, help="per configuration, seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        a = json.loads(args.child)
        out = child_masks(a) if a["what"] == "masks" else child_step(a)
        print(json.dumps(out))
        return 0

    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from byteify.attention import MEMORY_EFFICIENT

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = args.batch or ([1, 2, 4, 8] if device == "cuda" else [1])
    common = dict(seq_len=args.seq_len, global_layers=args.global_layers, global_hidden=args.global_hidden,
                  hash_vocab=args.hash_vocab, device=device, impl=MEMORY_EFFICIENT)
    print(f"# Attention memory at seq_len {args.seq_len} — torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {platform.machine()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {os.cpu_count()} CPUs"))
    print(f"Model: encoder 1 x 1024, decoder 9 x 1024 (16 heads, FFN 2816, cross-attn in every decoder layer), "
          f"cross_attn_k 2, window 512, global {args.global_layers} x {args.global_hidden}, hash vocab "
          f"{args.hash_vocab} x 6 n-gram sizes; static 4-byte patches.\n")

    results = {"config": {**common, "batches": batches, "checkpointing": args.checkpointing}}
    t0 = time.time()
    masks = run_child({**common, "what": "masks"}, args.timeout)
    results["masks"] = masks
    print("## (i) Dense masks per stock training step (built once per forward; B=8 = 8 x B=1)\n")
    if "error" in masks:
        print(f"mask measurement failed: {masks['error']}\n")
    else:
        print(f"P = {masks['num_patches']} patches (x cross_attn_k 2 = {2 * masks['num_patches']} patch slots).\n")
        print("| mask | impl | shape (B=1) | dtype | kept, B=1 (MiB) | kept, B=8 (MiB) | build peak RSS, B=1 (MiB) |")
        print("|---|---|---|---|---:|---:|---:|")
        for r in masks["rows"]:
            shape = "x".join(map(str, r["shape"])) if r["shape"] else "—"
            print(f"| {r['mask']} | {r['impl']} | {shape} | {r['dtype']} | {fmt_mib(r['bytes'])} | "
                  f"{fmt_mib(8 * r['bytes'])} | {fmt_mib(r['build_peak'])} |")
        print("\n(eager instead of sdpa would make the local masks fp32: 4x the bool sizes; the cross masks "
              "are fp32 whatever the attention implementation or autocast, because the byte embeddings are.)\n")

    print("## (ii) One training step (forward + backward), peak memory\n")
    unit = "CUDA max_memory_allocated" if device == "cuda" else "peak RSS"
    print(f"| model | batch | act. checkpointing | impl | step peak over before-step, MiB ({unit}) | "
          f"before step, MiB | step time, s | saving vs stock |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    runs = []
    for what in args.models:
        for ckpt in args.checkpointing:
            for b in batches:
                stock_peak = None
                for impl in (STOCK, MEMORY_EFFICIENT):
                    payload = {**common, "what": what, "impl": impl, "batch": b, "checkpointing": ckpt == "on"}
                    avail = mem_available()
                    r = run_child(payload, args.timeout)
                    r.update(payload, mem_available_before=avail)
                    runs.append(r)
                    label = "BLT (1B local sizes)" if what == "blt" else "entropy model (blt-1b)"
                    if "error" in r:
                        print(f"| {label} | {b} | {ckpt} | {impl} | failed: {r['error']} | | | |")
                        continue
                    saving = ""
                    if impl == STOCK:
                        stock_peak = r["step_peak"]
                    elif stock_peak:
                        saving = f"{fmt_mib(stock_peak - r['step_peak'])} MiB ({1 - r['step_peak'] / stock_peak:.0%})"
                    print(f"| {label} | {b} | {ckpt} | {impl} | {fmt_mib(r['step_peak'])} | {fmt_mib(r['base'])} | "
                          f"{r['seconds']:.1f} | {saving} |", flush=True)
    results["steps"] = runs
    print(f"\n(total wall time {time.time() - t0:.0f} s; each configuration in a fresh process)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
