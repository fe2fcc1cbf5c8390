"""Does byte-ifying work?  Transplant-vs-scratch on the real SmolLM2-135M, in one run with the same
seed, data and bytes seen:

1. the source model's bits per byte (token loss converted to bits per byte);
2. BLT with the transplanted global, the issue's proposed recipe: a source-aligned distillation
   stage, then end to end (entropy patching calibrated to the source's bytes/token, global at 0.1x lr);
3. the same without the distillation stage (BLT-paper style: everything trains, global at 0.1x;
   the shipped default, since distillation did not beat it here);
4. the same architecture with a randomly initialised global transformer, same recipe as 3.

Held-out text: the validation split of the embedded corpus (documents the training split never
contains).  Bits per byte on it at several points of training (every ``eval_every`` steps, the
first ``eval_batches`` x 4 KB of it) go to a table and a PNG curve; at the end each model is
evaluated on ``--final-bytes`` of held-out text with ``byteify eval``'s code, next to the source.

Usage: .venv/bin/python benchmarks/byteify_quality.py [--budget 1.0] [--work DIR] [--rows 1,2,3,4]
       .venv/bin/python benchmarks/byteify_quality.py --ablate [--ablate-steps 30]
       .venv/bin/python benchmarks/byteify_quality.py --lr-sweep 0.1,0.3,1.0
The ablation mode runs the distillation stage alone in five variants (default; dense
byte-marginal term off; encoder half off; k = 1 and 8 instead of 4) for the same steps and reports, at the end, the decoder half's
held-out bits per byte (decoder reading the teacher) and the end-to-end path's (encoder -> frozen
transplanted global -> decoder, entropy patches) without any end-to-end training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BYTEIFY = str(Path(sys.executable).with_name("byteify"))

SEQ_LEN, BATCH_BYTES = 1024, 4096


def sh(*args):
    subprocess.run(list(args), check=True)


def prepare(work: Path, budget: float) -> Path:
    """Convert SmolLM2, train + calibrate the entropy model: the common starting point."""
    base = work / "smollm2-blt"
    if not (base / "config.json").exists():
        gguf = subprocess.check_output([sys.executable, str(ROOT / "scripts" / "smollm2_path.py")], text=True).strip()
        sh(BYTEIFY, "convert", gguf, str(base), "--force")
    ent = work / "entropy"
    start = work / "start"
    if not (start / "config.json").exists():
        shutil.rmtree(ent, ignore_errors=True)
        steps = max(20, int(150 * budget))
        sh(BYTEIFY, "train", "entropy-model", f"model={base}", f"output_dir={ent}", f"stages.0.steps={steps}",
           "run.progress=false")
        ckpt = sorted(p for p in (ent / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
        shutil.copytree(ckpt / "model", start)
        meta = json.loads((start / "byteify.json").read_text())
        meta["converted_model_dir"] = str(base.resolve())
        (start / "byteify.json").write_text(json.dumps(meta, indent=2))
    return start


def random_global(start: Path, out: Path, seed: int) -> Path:
    """The same model with the global transformer re-initialised (transformers' BLT init)."""
    if (out / "config.json").exists():
        return out
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, BltForCausalLM

    shutil.copytree(start, out)
    cfg = AutoConfig.from_pretrained(str(start))
    torch.manual_seed(seed)
    fresh = BltForCausalLM(cfg).state_dict()
    for f in out.glob("*.safetensors"):
        sd = load_file(str(f))
        for k in sd:
            if k.startswith("model.global_transformer."):
                sd[k] = fresh[k].to(sd[k].dtype).contiguous()
        save_file(sd, str(f), metadata={"format": "pt"})
    return out


def stage(name, train, steps, lr, **extra):
    s = {"name": name, "train": train, "steps": steps, "lr": lr, "warmup_steps": max(1, steps // 10),
         "batch_bytes": BATCH_BYTES, "grad_clip": 1.0, "weight_decay": 0.1, "schedule": "cosine"}
    s.update(extra)
    return s


ALL = ["local_encoder", "hash_embeddings", "local_decoder", "global"]
LOCAL = ["local_encoder", "hash_embeddings", "local_decoder"]


def run_recipe(work: Path, name: str, model: Path, stages: list, eval_every: int, seed: int) -> Path:
    out = work / "runs" / name
    if (out / "metrics.jsonl").exists() and '"summary"' in (out / "metrics.jsonl").read_text():
        return out
    shutil.rmtree(out, ignore_errors=True)
    recipe = {"model": str(model), "output_dir": str(out), "seed": seed,
              "data": {"sources": [{"path": "default"}], "seq_len": SEQ_LEN, "val_fraction": 0.05},
              "patching": {"mode": "entropy"}, "stages": stages,
              "run": {"device": "auto", "log_every": 5, "eval_every": eval_every, "eval_batches": 4,
                      "save_every": 100000, "keep_last": 1, "progress": False}}
    path = work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t = time.perf_counter()
    sh(BYTEIFY, "train", str(path))
    print(f"[{name}] trained in {time.perf_counter() - t:.0f}s", flush=True)
    return out


def curve(run: Path) -> list[tuple[int, float, str]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["bytes_seen"], r["val_bpb"], r["stage"]) for r in rows if "val_bpb" in r and r.get("val_bpb") is not None]


def summary(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["summary"] for r in rows if "summary" in r)


def held_out_docs(max_bytes: int) -> list[bytes]:
    from byteify.data.streams import decide_holdout, held_out_documents
    from byteify.train.recipe import load_recipe

    recipe, _ = load_recipe("smollm2-135m")
    sources = recipe.data.sources
    val = held_out_documents(sources, decide_holdout(sources, recipe.data.val_fraction, recipe.seed))
    out, n = [], 0
    for d in val:
        if n >= max_bytes:
            break
        out.append(d[: max_bytes - n])
        n += len(out[-1])
    return out


def final_eval(model_dir: Path, docs, source=None) -> dict:
    from byteify.evaluate import evaluate_blt, evaluate_source
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt

    if source is not None:
        from byteify.resolve import load_source_tokenizer
        from byteify.train.teacher import load_teacher

        res = evaluate_source(load_teacher(source), load_source_tokenizer(source), docs)
        return {"bpb": res.bits_per_byte, "bytes_per_token": res.bytes_per_token}
    _, model = load_blt(model_dir, torch.float32, torch.device("cpu"))
    res = evaluate_blt(model, docs, build_patcher(PatchingSpec(mode="entropy"), model))
    return {"bpb": res.bits_per_byte, "bytes_per_patch": res.mean_bytes_per_patch}


def plot(curves: dict, source_bpb: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in curves.items():
        ax.plot([b / 1024 for b, _, _ in pts], [v for _, v, _ in pts], marker="o", ms=3, label=name)
    ax.axhline(source_bpb, color="k", ls="--", lw=1, label=f"source SmolLM2 ({source_bpb:.3f})")
    ax.set_xlabel("training bytes seen (KB)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("byte-ifying SmolLM2-135M on CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def ablate(work: Path, start: Path, out: Path, args) -> None:
    variants = [("default (dense KL, encoder half, k=4)", {}), ("no dense byte-marginal term", {"kl_weight": 0.0}),
                ("no encoder half", {"encoder": False}), ("encoder half through k=1 layer", {"encoder_layers": 1}),
                ("encoder half through k=8 layers", {"encoder_layers": 8})]
    n = args.ablate_steps
    lines = [f"Distillation-stage ablations on SmolLM2-135M: {n} steps of {BATCH_BYTES} bytes each, lr 1e-3, seed "
             f"{args.seed}; held-out bits per byte at the end (first 16 KB of the validation split).", "",
             "| variant | decoder half (reads the teacher) | end to end, no e2e training (entropy patches) | s/step |",
             "|---|---:|---:|---:|"]
    for i, (name, kw) in enumerate(variants):
        spec = {"encoder_layers": 4, **kw}
        run = run_recipe(work, f"ablate-{i}", start, [stage("distill", LOCAL, n, 1e-3, distill=spec)], n, args.seed)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "val_distill_bpb" in r][-1]
        step_s = summary(run)["wall_seconds"] / n
        lines.append(f"| {name} | {last['val_distill_bpb']:.3f} | {last['val_bpb']:.3f} | {step_s:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (out / "byteify_ablations.md").write_text(text + "\n")


def lr_sweep(work: Path, start: Path, out: Path, args, multipliers: list[float]) -> None:
    """Row 3's recipe (transplanted global, end to end) with other global learning-rate
    multipliers: is the BLT paper's 0.1x what holds the transplant back?"""
    n = 113
    docs = held_out_docs(args.final_bytes)
    lines = [f"Global learning-rate multiplier sweep, transplanted global, {n} end-to-end steps of {BATCH_BYTES} "
             f"bytes (local lr 1e-3), seed {args.seed}; held-out bits per byte on {sum(len(d) for d in docs):,} bytes "
             "of the validation split.", "", "| global lr multiplier | bits/byte | train wall s |", "|---:|---:|---:|"]
    for mult in multipliers:
        name = "3-transplant" if mult == 0.1 else f"3-transplant-glr{mult:g}"
        run = run_recipe(work, name, start, [stage("end-to-end", ALL, n, 1e-3, lr_multipliers={"global": mult})],
                         max(2, int(20 * args.budget)), args.seed)
        ck = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[-1] / "model"
        bpb = final_eval(ck, docs)["bpb"]
        lines.append(f"| {mult:g} | {bpb:.3f} | {summary(run)['wall_seconds']:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (out / "byteify_lr_sweep.md").write_text(text + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=1.0, help="scales every step count")
    ap.add_argument("--work", default="/tmp/byteify-quality")
    ap.add_argument("--rows", default="1,2,3,4")
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="distillation-stage ablations only")
    ap.add_argument("--ablate-steps", type=int, default=30)
    ap.add_argument("--lr-sweep", default=None, help="e.g. 0.1,0.3,1.0: row 3 with these global lr multipliers")
    ap.add_argument("--final-bytes", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = set(args.rows.split(","))
    d_steps, e_steps = max(4, int(60 * args.budget)), max(4, int(60 * args.budget))
    eval_every = max(2, int(20 * args.budget))
    start = prepare(work, args.budget)
    base = work / "smollm2-blt"
    if args.ablate:
        return ablate(work, start, out, args)
    if args.lr_sweep:
        return lr_sweep(work, start, out, args, [float(x) for x in args.lr_sweep.split(",")])
    results, curves = {}, {}

    def distill_then_e2e(name, **distill):
        spec = {"encoder_layers": 4, **distill}
        return run_recipe(work, name, start, [
            stage("distill", LOCAL, d_steps, 1e-3, distill=spec),
            stage("end-to-end", ALL, e_steps, 1e-3, lr_multipliers={"global": 0.1}),
        ], eval_every, args.seed)

    if "2" in rows:
        r2 = distill_then_e2e("2-transplant+distill")
        curves["2: transplant + distillation"] = curve(r2)
        results["2"] = r2
    bytes2 = summary(results["2"])["bytes_seen"] if "2" in results else d_steps * BATCH_BYTES + e_steps * BATCH_BYTES
    n_plain = max(1, round(bytes2 / BATCH_BYTES))
    if "3" in rows:
        r3 = run_recipe(work, "3-transplant", start, [stage("end-to-end", ALL, n_plain, 1e-3,
                                                               lr_multipliers={"global": 0.1})], eval_every, args.seed)
        curves["3: transplant, no distillation (default recipe)"] = curve(r3)
        results["3"] = r3
    if "4" in rows:
        rnd = random_global(start, work / "start-random-global", args.seed + 1)
        r4 = run_recipe(work, "4-scratch", rnd, [stage("end-to-end", ALL, n_plain, 1e-3,
                                                        lr_multipliers={"global": 0.1})], eval_every, args.seed)
        curves["4: random global (scratch)"] = curve(r4)
        results["4"] = r4
    if args.ablations:
        for name, kw in (("A-no-dense-kl", {"kl_weight": 0.0}), ("B-no-encoder-half", {"encoder": False}),
                         ("C-k2", {"encoder_layers": 2})):
            results[name] = distill_then_e2e(name, **kw)
            curves[f"ablation {name}"] = curve(results[name])

    docs = held_out_docs(args.final_bytes)
    finals = {"1": final_eval(None, docs, source=base)}
    for key, run in results.items():
        ck = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))[-1] / "model"
        finals[key] = final_eval(ck, docs)
        finals[key].update(bytes_seen=summary(run)["bytes_seen"], wall_s=summary(run)["wall_seconds"])
    wall = time.perf_counter() - t0
    hw = f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    lines = [f"byteify quality experiment: SmolLM2-135M, seed {args.seed}, budget {args.budget} "
             f"({d_steps} distill + {e_steps} end-to-end steps vs {n_plain} end-to-end steps of {BATCH_BYTES} bytes), "
             f"{hw}; training wall {sum(summary(r)['wall_seconds'] for r in results.values()) / 60:.1f} min "
             f"(plus the entropy model), this invocation {wall / 60:.1f} min", "",
             f"Final held-out bits per byte ({sum(len(d) for d in docs):,} bytes of the validation split):", "",
             "| row | model | bits/byte | bytes seen | train wall s |", "|---|---|---:|---:|---:|"]
    names = {"1": "source SmolLM2 (token loss in bits/byte)", "2": "BLT, transplanted global + distillation stage",
             "3": "BLT, transplanted global, no distillation (BLT paper; the default recipe)", "4": "BLT, random global, recipe of 3"}
    for key in ["1", "2", "3", "4", "A-no-dense-kl", "B-no-encoder-half", "C-k2"]:
        if key in finals:
            f = finals[key]
            lines.append(f"| {key} | {names.get(key, 'ablation: ' + key)} | {f['bpb']:.3f} | "
                         f"{f.get('bytes_seen', '-')} | {f.get('wall_s', '-')} |")
    lines += ["", "Held-out bits per byte during training (first 16 KB of the validation split):", "",
              "| run | " + " | ".join(f"{b // 1024} KB" for b, _, _ in next(iter(curves.values()))) + " |" if curves else ""]
    if curves:
        lines.append("|---|" + "---:|" * len(next(iter(curves.values()))))
        for name, pts in curves.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for _, v, _ in pts) + " |")
    if "2" in finals and "4" in finals:
        gain = 1 - finals["2"]["bpb"] / finals["4"]["bpb"]
        lines += ["", f"row 2 vs row 4: {gain * 100:.1f}% lower bits per byte (target >= 25%: "
                      f"{'MET' if gain >= 0.25 else 'NOT MET'}); row 2 - row 1 = {finals['2']['bpb'] - finals['1']['bpb']:.3f} "
                      f"bits per byte ({finals['2']['bpb'] / finals['1']['bpb']:.2f}x the source)"]
    text = "\n".join(lines)
    print(text)
    (out / "byteify_quality.md").write_text(text + "\n")
    (out / "byteify_quality.json").write_text(json.dumps({"finals": finals, "curves": curves}, indent=2))
    if plot(curves, finals["1"]["bpb"], out / "byteify_quality.png"):
        print(f"curve: {out / 'byteify_quality.png'}")


if __name__ == "__main__":
    main()
