"""The decisive table: does byte-ifying keep what SmolLM2-135M knew?  One training run per row,
same seed, same training bytes, the same held-out text and the same causal patcher for every row:

1. source: SmolLM2's token loss in bits per byte (no training);
2. warm start + transplanted global (``byteify convert --preset warm``), the recipe built for it:
   a decoder stage (only the local decoder trains: the warm encoder and the transplanted global
   already speak the source's language), then end to end with the global at 1/10 of the local
   learning rate; the hash tables stay frozen (they hold the written vocabulary; 528M
   parameters are too many for Adam on a CPU);
3. transplant without warm start (``--preset auto``): one end-to-end stage, everything trains,
   global at 1/10 (the ``smollm2-135m`` recipe before the warm start);
4. warm start + *random* global: row 2's conversion with the global transformer re-initialised,
   row 2's recipe (separates the warm encoder's effect from the transplant's);
5. random global: row 3's conversion with the global re-initialised, row 3's recipe;
2b. (``--rows ...,2b``) row 2 with ``vocab_warm_start.decoder_ignores_offset``: the fresh
   decoder's input projections blind to the length offsets in the encoder's byte states;
2h. (``--rows ...,2h``) row 2's conversion with row 3's recipe: the hash tables train too (Adam
   over 528M more parameters: ~8 GB more memory and a slower step on a CPU).
2s. (``--rows ...,2s``) row 2 with the warm tables 32x smaller (``vocab_warm_start.unit_exponent=-11``:
   the byte states at the fresh modules' initial scale; the global's input is unchanged, exactly);
2f. (``--rows ...,2f``) row 2s with ``vocab_warm_start.free_dims=128``: the token vectors in 448 of
   the 576 coordinates (rank 447), random n-gram codes in the rest for the decoder to read;
2q. (``--rows ...,2q``) a warm start small enough to train whole on a CPU: 16,384 buckets per
   n-gram size (66M table parameters instead of 528M), unit_exponent -11, row 3's recipe (every
   part trains, the hash tables too, global at 0.1x);
2d. (``--rows ...,2s,2d``) row 2s with its decoder stage replaced by decoder-half distillation: the
   local decoder reads the teacher's final hidden states on source-token patches and learns the
   teacher's next-byte distributions (dense byte-trie KL), then row 2's end-to-end stage.
2qd. (``--rows ...,2qd``) row 2q with a first stage of source-aligned distillation (a quarter of
   the steps, global frozen, patches = source tokens): the decoder half reads the teacher's final
   states and learns its next-byte distributions (dense byte-trie KL) while the encoder half and
   the tables learn to feed the first 4 global layers the teacher's states; then row 2q's end to
   end stage.
2ql. (``--rows ...,2ql``) row 2q with the written parts learning slowly: the local encoder and the
   hash tables at 0.05x the learning rate, the global at 0.1x, the decoder at 1x (tests whether
   the full rate overwrites the warm content: table entries are ~0.02 per coordinate and the patch
   projection amplifies them ~35x, next to Adam's ~1e-3 steps).
2qk. (``--rows ...,2qk``) row 2q with end-to-end distillation (``teacher_kl``, weight 1, bf16
   teacher): besides byte cross-entropy, KL from the source model's exact next-byte
   distributions on every byte (the BLT under its own patcher and global transformer).
2qn. (``--rows ...,2qn``) row 2q with ``patch_norm`` (max_norm 6, about twice SmolLM2's mean
   token-embedding norm 2.90): the encoder may not grow the patch vectors past the scale the
   transplanted layers were trained on (row 2qk's grew ~3,600x and the global became a bypass).
2qx. (``--rows ...,2qx``) row 2q with ``decoder_byte_dropout`` 0.3: in training, each byte's
   encoder state is withheld from the local decoder with probability 0.3, so that byte must be
   predicted from earlier bytes and the global's states (rows 3 and 2qk barely read the global).
5k. (``--rows ...,5k``) row 5 with the same ``teacher_kl``: separates what the teacher's targets
   give from what the transplanted global and the warm start give.
4q. (``--rows ...,4q``) row 4 for the shipped warm start: row 2q's conversion with the global
   re-initialised, row 2q's recipe (separates ``warm-16k``'s effect from the transplant's).
2qw. (``--rows ...,2qw``) the written content kept: row 2q's conversion with ``free_dims`` 128
   (token vectors in 448 of the 576 coordinates, rank 447), row 2q's recipe with
   ``keep_warm_start``: the written columns of the tables, the encoder's zero branches into them,
   the pooling and the projection stay as converted, so the transplanted global reads the step-0
   patch vectors at every step, while the local side trains in the 128 free coordinates (every
   other row lets training overwrite the written content within a few dozen steps).  The
   conversion is ``--preset warm-kept``'s and the recipe the ``smollm2-135m``'s without ``teacher_kl``
   (shipped in sessions 14-16).
4qw. (``--rows ...,4qw``) row 4 for row 2qw: row 2qw's conversion with the global re-initialised,
   row 2qw's recipe (the same kept encoder in front of a random global: the transplant's share).
2qwk. (``--rows ...,2qwk``) row 2qw + row 2qk's ``teacher_kl`` (weight 1, bf16 teacher): the
   source's next-byte distributions as a second target, now behind a global that reads the
   converted patch vectors at every step (the teacher's states and the global's stay close).
2qw64. (``--rows ...,2qw64``) row 2qw with 65,536 buckets per n-gram size (264M table parameters
   instead of 66M): under ``keep_warm_start`` the global reads the step-0 patch vectors
   throughout, so their teacher-forced bound (row 2qw: 1.628, above the criterion's 0.75x of a
   random global) is what the global can be given; more buckets, fewer collisions, a tighter bound.
2qw64k. (``--rows ...,2qw64k``) row 2qw64 + row 2qwk's ``teacher_kl``: do the two gains stack?  The
   conversion is ``--preset warm-kept-64k``'s and the recipe the shipped ``smollm2-135m``'s.
2qw64kh. (``--rows ...,2qw64kh``) row 2qw64k with twice the local learning rate (2e-3), the
   global's kept at 1e-4 (multiplier 0.05): is the local side, which the kept rows leave 0.3-1.0
   bits per byte above their bounds, learning as fast as it can?
2qw64k3. (``--rows ...,2qw64k3``) row 2qw64k with the teacher's term weighted 3 instead of 1: the
   dense next-byte targets are the only signal that carries the global's whole next-token
   distribution to the decoder, whose read of the global is what the kept rows lack.
2qw64kd8. (``--rows ...,2qw64kd8``) row 2qw64k with an 8-layer local decoder instead of 4 (its
   conversion with ``decoder.num_hidden_layers=8``): the kept rows learn the decoder from ~1.5 MB,
   a data-limited regime, where a larger network learns more per byte seen.
2qw64kg0. (``--rows ...,2qw64kg0``) row 2qw64k with the transplanted global frozen (``train``
   without ``global``): under ``keep_warm_start`` its input is the converted patch vectors, so the
   question is whether fine-tuning it at 1/10 of the local rate helps the decoder or disturbs it.
2qw64ks. (``--rows ...,2qw64ks``) row 2qw64k on the spelling warm start
   (``vocab_warm_start.spelling``, :mod:`byteify.convert.spelling`): the free coordinates carry each
   written token's next-byte distribution under the source vocabulary instead of random codes, and
   the decoder starts as an identity whose LM head reads them, so the model predicts bytes at step 0.
2qw64kgh. (``--rows ...,2qw64kgh``) row 2qw64k with the global at 0.3x the local learning rate
   instead of 0.1x (3e-4): row 2qw64kg0 (frozen) fell behind, so does a faster global help?
4qw64ks. (``--rows ...,4qw64ks``) row 4 for the shipped winner: row 2qw64ks's conversion with the
   global re-initialised, row 2qw64ks's recipe (the same kept spelling warm start in front of a
   random global: what the transplant adds to the warm start under the shipped recipe).
2qw128ks. (``--rows ...,2qw128ks``) row 2qw64ks with 131,072 buckets per n-gram size (528M table
   parameters instead of 264M; ~4 GB more memory for their gradient and Adam state): fewer
   collisions, a tighter teacher-forced bound for the kept global's input (row 2qw64ks: 1.440, only
   0.055 below the criterion's line).

The causal patcher: the entropy model is trained once (the shipped ``entropy-model`` recipe: a
byte LM that also learns the source tokenizer's boundaries, threshold calibrated to the source's
bytes per token) and its weights and threshold are copied into every row's starting model, so
training and evaluation of every row patch identically, from past bytes only.

Measured per row: step-0 bits per byte (the starting model, before any training) and bits per
byte after each budget, on the first ``--final-bytes`` of the embedded corpus's validation
documents (the recipes' split: never trained on), with ``byteify eval``'s code; seconds per step.
Also the step-0 gate for both conversions (``byteify eval --teacher-forced-bound``); and for each
finished run, its bits per byte with the decoder fed another window's global states (does it read
the global?) and the same gate on the trained model (is the written token content still there?).

Every run is resumable: rerun the same command and finished runs are skipped, interrupted ones
resume from their newest checkpoint (``--resume auto``).  The results file
(``benchmarks/results/byteify_quality.json``, kept in git) is the record of every run finished so
far: each invocation lays the runs it finished (and those it finds finished in ``--work``) over it,
so runs spread over sessions and machines (the work directory is scratch; to resume an interrupted run
in a later session, give a ``--work`` that outlives the session) add up to one table;
``--report-only`` trains and converts nothing, it only rewrites the table from the record.  A
record made with another held-out size or step size is not merged.  Budgets: ``--budgets
460,1500`` (KB of training text per row; 4 KB per step).  ``--seed N`` (N > 0) repeats rows
with another training seed (data order; for rows 4 and 5 also another random global) on the
same held-out text (the runs' ``data.split_seed`` stays 0): its runs, random globals and results
file are named ``...-seedN``; conversions, the shared patcher and the step-0 gate are shared.
``--entropy-steps N`` (N != 100) trains the shared patcher N steps instead (its boundaries closer
to the source's: F1 0.652 after 100 steps, 0.806 after 400): its patcher run, starting models,
runs and results file are named ``...-eN``; conversions and the step-0 gate (source-token
patches) are shared.

Usage: nice -n 5 .venv/bin/python benchmarks/byteify_quality.py [--budgets 460] [--rows 1,2,3,4,5]
       [--work /tmp/byteify-quality] [--final-bytes 32768] [--seed N] [--entropy-steps N]
Writes benchmarks/results/byteify_quality.{md,json,png} (``byteify_quality-seedN.*`` with ``--seed N``).
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
ENTROPY_STEPS = 100  # the shared patcher's training steps (--entropy-steps changes it for one invocation)
PATCHER = {"steps": ENTROPY_STEPS}
SOURCE_CONVERSION = "convert-auto"  # the plain conversion: its directory rebuilds the source model (teacher, gate)
SPLIT_SEED = 0  # the held-out text: the recipes' validation split under seed 0, whatever the run's seed
DECODER_SHARE = 0.25  # row 2/4: the share of the budget spent on the decoder stage
ALL = ["local_encoder", "hash_embeddings", "local_decoder", "global"]
KEPT_KL = {"2qwk": "2qw", "2qw64k": "2qw64", "2qw64kh": "2qw64", "2qw64k3": "2qw64", "2qw64kd8": "2qw64d8",
           "2qw64kg0": "2qw64", "2qw64kgh": "2qw64", "2qw64ks": "2qw64s", "2qw128ks": "2qw128s"}  # the starting model's row: its recipe + teacher_kl
WARM = ["local_encoder", "local_decoder", "global"]  # hash tables frozen
NAMES = {"1": "source SmolLM2 (token loss in bits/byte)",
         "2": "warm start (unit_exponent -6) + transplanted global (decoder stage, then end to end; hash tables frozen)",
         "3": "transplant, no warm start (--preset auto): one end-to-end stage, everything trains, global at 0.1x",
         "4": "warm start + random global",
         "5": "random global, no warm start",
         "2b": "row 2, the decoder's readers blind to the length offsets (decoder_ignores_offset)",
         "2h": "row 2's conversion, row 3's recipe (everything trains, hash tables too)",
         "2s": "row 2, warm tables at the fresh modules' scale (unit_exponent -11)",
         "2f": "row 2s with 128 of the 576 coordinates random n-gram codes (free_dims 128, rank 447)",
         "2q": "warm start at 16,384 buckets (--preset warm-16k), row 3's recipe: everything trains, hash tables too",
         "2d": "row 2s, its decoder stage distilled from the teacher (decoder half, dense KL)",
         "2qd": "row 2q after a distillation stage (decoder and encoder halves, tables train; a quarter of the steps)",
         "2ql": "row 2q, the warm encoder and tables at 0.05x the learning rate (global 0.1x, decoder 1x)",
         "2qk": "row 2q + the source's next-byte distributions as a second target (teacher_kl, weight 1)",
         "2qn": "row 2q + the global's input norm bounded (patch_norm, max_norm 6)",
         "2qx": "row 2q + bytes withheld from the decoder in training (decoder_byte_dropout 0.3)",
         "5k": "row 5 + the source's next-byte distributions as a second target (teacher_kl, weight 1)",
         "4q": "warm start at 16,384 buckets (row 2q's conversion) + random global, row 2q's recipe",
         "2qw": "warm start at 16,384 buckets, free_dims 128 (--preset warm-kept), the written content kept (keep_warm_start), row 2q's recipe: the smollm2-135m recipe without teacher_kl",
         "2qwk": "row 2qw + the source's next-byte distributions as a second target (teacher_kl, weight 1)",
         "2qw64": "row 2qw with 65,536 buckets per n-gram size (--preset warm-kept-64k; the written content kept)",
         "2qw64k": "row 2qw64 + teacher_kl (weight 1): the shipped smollm2-135m recipe",
         "2qw64kh": "row 2qw64k with the local learning rate doubled (2e-3; the global's kept at 1e-4)",
         "2qw64k3": "row 2qw64k with the teacher_kl term weighted 3",
         "2qw64kd8": "row 2qw64k with an 8-layer local decoder (4 in every other row)",
         "2qw64kg0": "row 2qw64k with the transplanted global frozen",
         "2qw64ks": "row 2qw64k on the spelling warm start (the vocabulary's next-byte distributions in the free coordinates, read by the decoder from step 0)",
         "2qw128ks": "row 2qw64ks with 131,072 buckets per n-gram size (a tighter bound for the kept global's input)",
         "2qw64kgh": "row 2qw64k with the global at 0.3x the local learning rate (3e-4; 0.1x in every other row)",
         "4qw": "row 2qw's conversion (written content kept) + random global, row 2qw's recipe",
         "4qw64ks": "row 2qw64ks's conversion (spelling warm start, written content kept) + random global, row 2qw64ks's recipe"}

GATES = {"2": "warm start (--preset warm, unit_exponent -6)", "3": "no warm start (--preset auto)",
         "2s": "warm start, unit_exponent -11 (row 2s)", "2f": "warm start, unit_exponent -11, free_dims 128 (row 2f)",
         "2q": "warm start, 16,384 buckets, unit_exponent -11 (--preset warm-16k; row 2q)",
         "2qw": "warm start, 16,384 buckets, unit_exponent -11, free_dims 128 (row 2qw)",
         "2qw64": "warm start, 65,536 buckets, unit_exponent -11, free_dims 128 (--preset warm-kept-64k; rows 2qw64, 2qw64k)",
         "2qw128s": "warm start, 131,072 buckets, unit_exponent -11, free_dims 128, spelling (row 2qw128ks)"}


def sh(*args):
    print("+", " ".join(args), flush=True)
    subprocess.run(list(args), check=True)


def smollm2() -> str:
    return subprocess.check_output([sys.executable, str(ROOT / "scripts" / "smollm2_path.py")], text=True).strip()


def convert(work: Path, name: str, *options: str) -> Path:
    out = work / name
    if not (out / "config.json").exists():
        sh(BYTEIFY, "convert", smollm2(), str(out), "--force", *options)
    return out


def patcher_tagged(name: str) -> str:
    """``name`` under the shared patcher of ENTROPY_STEPS steps, ``name-eN`` under one of N steps
    (the patcher run, starting models)."""
    return name if PATCHER["steps"] == ENTROPY_STEPS else f"{name}-e{PATCHER['steps']}"


def tagged(name: str, seed: int) -> str:
    """``name`` for seed 0, ``name-seedN`` for another seed (runs, random globals, results), with
    :func:`patcher_tagged`'s suffix."""
    return patcher_tagged(name if seed == 0 else f"{name}-seed{seed}")


def newest_model(run: Path) -> Path:
    return max(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) / "model"


def entropy_model(work: Path, base: Path) -> Path:
    """The shared causal patcher: the shipped entropy-model recipe on the default conversion."""
    steps = PATCHER["steps"]
    run = work / ("entropy" if steps == ENTROPY_STEPS else f"entropy-{steps}")
    if not done(run):
        sh(BYTEIFY, "train", "entropy-model", f"model={base}", f"output_dir={run}", f"stages.0.steps={steps}",
           "run.progress=false", *(["--resume", "auto"] if (run / "checkpoints").exists() else []))
    return newest_model(run)


def rewrite_tensors(src: Path, out: Path, replace) -> None:
    """Copy model directory ``src`` to ``out`` with ``replace(name, tensor)`` applied to every
    tensor (shard by shard; written to a temporary directory, then renamed)."""
    from safetensors.torch import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for f in tmp.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: replace(k, v).contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})
        del sd
    tmp.rename(out)


def with_patcher(model: Path, patcher_dir: Path, out: Path) -> Path:
    """``model`` with the entropy model (``model.patcher.*``) and the patching fields of its
    config taken from ``patcher_dir``, and its calibration record (training refuses entropy
    patching without one)."""
    if not (out / "config.json").exists():
        from byteify.modelfiles import SafetensorsDir

        ck = SafetensorsDir(patcher_dir)
        rewrite_tensors(model, out, lambda k, v: ck.get(k).to(v.dtype) if k.startswith("model.patcher.") else v)
        cfg = json.loads((out / "config.json").read_text())
        src = json.loads((patcher_dir / "config.json").read_text())
        cfg.update({k: v for k, v in src.items() if k.startswith(("patch", "max_patch"))})
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    carry_calibration(patcher_dir, out)
    return out


def carry_calibration(src: Path, out: Path) -> None:
    """The calibration record(s) of ``src``'s byteify.json into ``out``'s (idempotent; also
    repairs start directories built before training required them)."""
    from byteify.modelfiles import read_json, write_json

    meta = read_json(out / "byteify.json")
    record = {k: v for k, v in read_json(src / "byteify.json").items() if k.startswith("calibration")}
    if any(meta.get(k) != v for k, v in record.items()):
        write_json(out / "byteify.json", {**meta, **record})


def random_global(start: Path, out: Path, seed: int) -> Path:
    """The same model with the global transformer re-initialised (transformers' BLT init)."""
    if (out / "config.json").exists():
        carry_calibration(start, out)
        return out
    from transformers import AutoConfig, BltForCausalLM

    cfg = AutoConfig.from_pretrained(str(start))
    torch.manual_seed(seed)
    fresh = {k: v for k, v in BltForCausalLM(cfg).state_dict().items() if k.startswith("model.global_transformer.")}
    rewrite_tensors(start, out, lambda k, v: fresh[k].to(v.dtype) if k in fresh else v)
    return out


def stage(name, train, steps, lr=1e-3, **extra):
    s = {"name": name, "train": train, "steps": steps, "lr": lr, "warmup_steps": max(1, steps // 10),
         "batch_bytes": BATCH_BYTES, "grad_clip": 1.0, "weight_decay": 0.1, "schedule": "cosine"}
    s.update(extra)
    return s


def done(run: Path) -> bool:
    """The run has finished: its last process wrote a summary and was not stopped early."""
    m = run / "metrics.jsonl"
    return m.exists() and '"summary"' in m.read_text() and not summary(run)["stopped_early"]


def run_recipe(work: Path, name: str, model: Path, stages: list, eval_every: int, seed: int) -> Path:
    out = work / "runs" / name
    if done(out):
        return out
    recipe = {"model": str(model), "output_dir": str(out), "seed": seed,
              "data": {"sources": [{"path": "default"}], "seq_len": SEQ_LEN, "val_fraction": 0.05,
                       "split_seed": SPLIT_SEED},
              "patching": {"mode": "entropy"}, "stages": stages,
              "run": {"device": "auto", "log_every": 10, "eval_every": eval_every, "eval_batches": 4,
                      "save_every": 25, "keep_last": 1, "progress": False}}
    path = work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    sh(BYTEIFY, "train", str(path), *(["--resume", "auto"] if (out / "checkpoints").exists() else []))
    return out


def warm_recipe(steps: int, distill: bool = False) -> list:
    dec = max(1, round(steps * DECODER_SHARE))
    extra = {"distill": {"decoder": True, "encoder": False}} if distill else {}
    return [stage("decoder", ["local_decoder"], dec, **extra),
            stage("end-to-end", WARM, steps - dec, lr_multipliers={"global": 0.1})]


def plain_recipe(steps: int, multipliers: dict | None = None, **extra) -> list:
    return [stage("end-to-end", ALL, steps, lr_multipliers={"global": 0.1, **(multipliers or {})}, **extra)]


def distill_recipe(steps: int) -> list:
    """Row 2qd: source-aligned distillation (both halves, the tables train) for a quarter of the
    steps, then :func:`plain_recipe`'s end to end."""
    first = max(1, round(steps * DECODER_SHARE))
    return [stage("distill", ["local_encoder", "hash_embeddings", "local_decoder"], first,
                  distill={"decoder": True, "encoder": True, "encoder_layers": 4}),
            *plain_recipe(steps - first)]


def kept_kl(steps: int, multipliers: dict | None = None, weight: float = 1.0, **extra) -> list:
    """The kept rows' recipe: :func:`plain_recipe` with ``keep_warm_start`` and ``teacher_kl``."""
    return plain_recipe(steps, multipliers, keep_warm_start=True, teacher_kl={"weight": weight}, **extra)


ROW_RECIPES = {  # row -> its stages for a budget of ``steps`` (rows not named: plain_recipe)
    **dict.fromkeys(("2", "4", "2b", "2s", "2f"), warm_recipe),
    "2d": lambda steps: warm_recipe(steps, distill=True),
    "2qd": distill_recipe,
    "2ql": lambda steps: plain_recipe(steps, {"local_encoder": 0.05, "hash_embeddings": 0.05}),
    **dict.fromkeys(("2qk", "5k"), lambda steps: plain_recipe(steps, teacher_kl={"weight": 1.0})),
    "2qn": lambda steps: plain_recipe(steps, patch_norm={"max_norm": 6.0}),
    "2qx": lambda steps: plain_recipe(steps, decoder_byte_dropout=0.3),
    **dict.fromkeys(("2qw", "4qw", "2qw64"), lambda steps: plain_recipe(steps, keep_warm_start=True)),
    **dict.fromkeys((*KEPT_KL, "4qw64ks"), kept_kl),
    "2qw64kh": lambda steps: kept_kl(steps, {"global": 0.05}, lr=2e-3),
    "2qw64k3": lambda steps: kept_kl(steps, weight=3.0),
    "2qw64kg0": lambda steps: [{**kept_kl(steps)[0], "train": ALL[:3]}],
    "2qw64kgh": lambda steps: kept_kl(steps, {"global": 0.3}),
}


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> list[tuple[int, float]]:
    """(bytes seen, validation bits per byte); a step logged twice (a process that died after it,
    before its next checkpoint, and the resumed one) counts once, as the last process logged it."""
    return sorted({r["bytes_seen"]: r["val_bpb"] for r in metrics(run) if r.get("val_bpb") is not None}.items())


def summary(run: Path) -> dict:
    """The summary of the run's last process (one stopped by ``run.stop_after`` wrote its own)."""
    return [r["summary"] for r in metrics(run) if "summary" in r][-1]


def seconds_per_step(run: Path) -> float:
    """Wall seconds per step of a finished run: its summary's for a run of one process; for a
    resumed one (its summary times only the last process, setup included) from the log, whose
    ``elapsed_s`` restarts with each process: the logged span of each process over its steps."""
    s = summary(run)
    log = [r for r in metrics(run) if "elapsed_s" in r and "step" in r]
    starts = [i for i, r in enumerate(log) if i == 0 or r["elapsed_s"] < log[i - 1]["elapsed_s"]]
    if len(starts) == 1:
        return s["wall_seconds"] / s["steps"]
    parts = [log[a:b] for a, b in zip(starts, starts[1:] + [len(log)])]
    return (sum(p[-1]["elapsed_s"] - p[0]["elapsed_s"] for p in parts)
            / sum(p[-1]["step"] - p[0]["step"] for p in parts))


def held_out_docs(max_bytes: int) -> list[bytes]:
    from byteify.data.streams import decide_holdout, held_out_documents
    from byteify.train.recipe import load_recipe

    recipe, _ = load_recipe("smollm2-135m")
    sources = recipe.data.sources
    return first_bytes(held_out_documents(sources, decide_holdout(sources, recipe.data.val_fraction, SPLIT_SEED)),
                       max_bytes)


def first_bytes(docs, max_bytes: int) -> list[bytes]:
    """The documents, in order, up to ``max_bytes`` bytes in all (the last one cut)."""
    out, n = [], 0
    for d in docs:
        if n >= max_bytes:
            break
        out.append(d[: max_bytes - n])
        n += len(out[-1])
    return out


def evaluate(model_dir: Path, docs) -> dict:
    """Bits per byte of a BLT directory under its own (the shared) entropy patcher."""
    from byteify.evaluate import evaluate_blt
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt

    _, model = load_blt(model_dir, torch.float32, torch.device("cpu"))
    res = evaluate_blt(model, docs, build_patcher(PatchingSpec(mode="entropy"), model))
    return {"bpb": res.bits_per_byte, "bytes_per_patch": res.mean_bytes_per_patch}


def other_text_global(model_dir: Path, docs) -> float:
    """Bits per byte of ``model_dir`` when its decoder reads another window's global states (the
    global transformer's outputs rolled by one along the batch of 8 windows): what the decoder
    loses without its own text's global states, i.e. how much it reads the global at all."""
    from byteify.evaluate import evaluate_blt
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt

    _, model = load_blt(model_dir, torch.float32, torch.device("cpu"))
    hook = model.model.global_transformer.register_forward_hook(lambda mod, args, out: out.roll(1, dims=0))
    try:
        return evaluate_blt(model, docs, build_patcher(PatchingSpec(mode="entropy"), model)).bits_per_byte
    finally:
        hook.remove()


def source_bpb(base: Path, docs) -> float:
    from byteify.evaluate import evaluate_source
    from byteify.resolve import load_source_tokenizer
    from byteify.train.teacher import load_teacher

    return evaluate_source(load_teacher(base), load_source_tokenizer(base), docs).bits_per_byte


def step0_gate(model_dir: Path, base: Path, docs) -> dict:
    from byteify.evaluate import teacher_forced_bound
    from byteify.resolve import load_blt, load_source_tokenizer
    from byteify.train.teacher import load_teacher

    _, model = load_blt(model_dir, torch.float32, torch.device("cpu"))
    res = teacher_forced_bound(model, load_teacher(base), load_source_tokenizer(base), docs)
    return {"bound_bpb": res.bits_per_byte, "exact_bpb": res.exact_bits_per_byte, "ratio": res.ratio}


def cached(path: Path, fn):
    """``fn()``'s JSON result, computed once per work directory."""
    if path.exists():
        return json.loads(path.read_text())
    value = fn()
    path.write_text(json.dumps(value))
    return value


def plot(curves: dict, source: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, pts in curves.items():  # legend: the row and the start of its name
        label = name if len(name) <= 70 else name[:67] + "..."
        ax.plot([b / 1024 for b, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
    ax.axhline(source, color="k", ls="--", lw=1, label=f"source SmolLM2 ({source:.3f})")
    ax.set(xlabel="training bytes seen (KB)", ylabel="held-out bits per byte (first 16 KB)", yscale="log",
           title="byte-ifying SmolLM2-135M on CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


RANDOM_GLOBAL = {"4": "2", "4q": "2q", "4qw": "2qw", "4qw64ks": "2qw64s", "5": "3"}  # row -> the row whose start it re-initialises the global of
WARM_16K = ("convert-warm-16k", "vocab_warm_start.unit_exponent=-11", "hash.vocab_size=16384")


def starting_models(work: Path, rows: list[str], seed: int) -> tuple[Path, dict[str, Path]]:
    """The default conversion and each row's starting model, all with the one shared patcher."""
    base = convert(work, SOURCE_CONVERSION)
    patcher = entropy_model(work, base)
    starts = {"3": with_patcher(base, patcher, work / patcher_tagged("start-3"))}
    if {"2", "2h", "4"} & set(rows):  # the 131,072-bucket tables: 2.7 GB, only for the rows that use them
        warm = convert(work, "convert-warm", "--preset", "warm", "--set", "vocab_warm_start.unit_exponent=-6")
        starts["2"] = starts["2h"] = with_patcher(warm, patcher, work / patcher_tagged("start-2"))
    variants = {"2b": ("convert-warm-blind", "vocab_warm_start.decoder_ignores_offset=true", "vocab_warm_start.unit_exponent=-6"),
                "2s": ("convert-warm-small", "vocab_warm_start.unit_exponent=-11"),
                "2f": ("convert-warm-free", "vocab_warm_start.unit_exponent=-11", "vocab_warm_start.free_dims=128"),
                "2q": WARM_16K, "2qd": WARM_16K, "2ql": WARM_16K, "2qk": WARM_16K, "2qn": WARM_16K, "2qx": WARM_16K,  # one conversion, six recipes
                "2qw": ("convert-warm-16k-free128", *WARM_16K[1:], "vocab_warm_start.free_dims=128"),
                "2qw64": ("convert-warm-64k-free128", WARM_16K[1], "hash.vocab_size=65536", "vocab_warm_start.free_dims=128"),
                "2qw64d8": ("convert-warm-64k-free128-dec8", WARM_16K[1], "hash.vocab_size=65536",
                            "vocab_warm_start.free_dims=128", "decoder.num_hidden_layers=8"),
                "2qw64s": ("convert-warm-64k-spell", WARM_16K[1], "hash.vocab_size=65536", "vocab_warm_start.free_dims=128",
                           "vocab_warm_start.spelling=true"),
                "2qw128s": ("convert-warm-128k-spell", WARM_16K[1], "hash.vocab_size=131072", "vocab_warm_start.free_dims=128",
                            "vocab_warm_start.spelling=true"),
                "2d": ("convert-warm-small", "vocab_warm_start.unit_exponent=-11")}  # 2s's conversion
    rows = set(rows) | ({"5"} if "5k" in rows else set())  # row 5k trains from row 5's start
    needed = rows | {RANDOM_GLOBAL.get(r) for r in rows} | {KEPT_KL.get(r) for r in rows}  # with the rows whose start another uses
    for key, (name, *options) in variants.items():
        if key in needed:
            sets = [x for o in options for x in ("--set", o)]
            starts[key] = with_patcher(convert(work, name, "--preset", "warm", *sets), patcher, work / patcher_tagged(f"start-{key}"))
    for key in KEPT_KL.keys() & rows:
        starts[key] = starts[KEPT_KL[key]]  # another row's starting model, its recipe + teacher_kl
    for key in RANDOM_GLOBAL.keys() & rows:
        starts[key] = random_global(starts[RANDOM_GLOBAL[key]], work / tagged(f"start-{key}", seed), seed + 1)
    if "5k" in rows:
        starts["5k"] = starts["5"]
    return base, starts


def run_rows(work: Path, rows: list[str], budgets: list[int], starts: dict, docs, seed: int):
    """Step-0 and per-budget results of every row (cached per run), and its validation curves."""
    res, curves = {}, {}
    for key in [r for r in rows if r != "1"]:
        res[key] = {"step0": cached(work / f"{tagged(f'eval-{key}', seed)}-step0.json",
                                   lambda key=key: evaluate(starts[key], docs))}
        for kb in budgets:
            steps = round(kb * 1024 / BATCH_BYTES)
            recipe = ROW_RECIPES.get(key, plain_recipe)(steps)
            run = run_recipe(work, tagged(f"{key}-{kb}kb", seed), starts[key], recipe, max(2, steps // 6), seed)
            res[key][kb], curves[curve_name(key, kb)] = finished_cell(run, docs)
        print(key, res[key], flush=True)
    return res, curves


def curve_name(key: str, kb: int) -> str:
    return f"{key}: {NAMES[key]} ({kb} KB)"


def finished_cell(run: Path, docs) -> tuple[dict, list]:
    """(table cell, validation curve) of a finished run (``work/runs/<name>``).  ``bound_after``:
    the step-0 gate's teacher-forced bound of the trained model (the source's own layers fed the
    trained encoder's patch vectors): whether training kept the encoder's token content."""
    final = cached(run / "final-eval.json", lambda: evaluate(newest_model(run), docs))
    other = cached(run / "other-text-global.json", lambda: {"bpb_other_global": other_text_global(newest_model(run), docs)})
    source = run.parents[1] / SOURCE_CONVERSION
    bound = cached(run / "trained-bound.json",
                   lambda: {"bound_after": step0_gate(newest_model(run), source, docs)["bound_bpb"]})
    s = summary(run)
    return {**final, **other, **bound, "bytes_seen": s["bytes_seen"], "wall_s": s["wall_seconds"],
            "s_per_step": seconds_per_step(run)}, curve(run)


def recorded_results(path: Path, config: dict, work: Path, rows: list[str], budgets: list[int], docs):
    """(results, curves): the results file's record when it was made with the same ``config``
    (budget keys back to ints), with the step-0 evaluations and finished runs found in ``work``
    laid over it (nothing is trained or converted)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("config") != config:
        old = {}
    res = {key: {int(k) if k.isdigit() and key != "gate" else k: v for k, v in cells.items()}
           for key, cells in old.get("results", {}).items()}
    curves, seed = old.get("curves", {}), config["seed"]
    for key in [r for r in rows if r != "1"]:
        step0 = work / f"{tagged(f'eval-{key}', seed)}-step0.json"
        if step0.exists():
            res.setdefault(key, {})["step0"] = json.loads(step0.read_text())
        for kb in budgets:
            run = work / "runs" / tagged(f"{key}-{kb}kb", seed)
            if done(run) and "step0" in res.get(key, {}):
                res[key][kb], curves[curve_name(key, kb)] = finished_cell(run, docs)
    if (work / "eval-source.json").exists():
        res["1"] = {"step0": json.loads((work / "eval-source.json").read_text())}
    for key in GATES:
        if (work / f"gate-{key}.json").exists():
            res.setdefault("gate", {})[key] = json.loads((work / f"gate-{key}.json").read_text())
    return res, curves


def report(res: dict, rows: list[str], budgets: list[int], header: str) -> str:
    """The markdown table, the step-0 gate and the criterion."""
    lines = [header, "", "| row | model | step 0 | " + " | ".join(f"after {kb} KB" for kb in budgets) + " | s/step |",
             "|---|---|---:|" + "---:|" * len(budgets) + "---:|"]
    for key in ["1"] + [r for r in rows if r != "1" and "step0" in res.get(r, {})]:
        r = res[key]
        cells = [f"{r[kb]['bpb']:.3f}" if kb in r else "-" for kb in budgets] if key != "1" else ["-"] * len(budgets)
        ran = [kb for kb in budgets if kb in r]
        step = f"{r[ran[-1]]['s_per_step']:.1f}" if ran else "-"
        lines.append(f"| {key} | {NAMES[key]} | {r['step0']['bpb']:.3f} | " + " | ".join(cells) + f" | {step} |")
    lines += ["", ("Step-0 gate (teacher-forced bound: the source model fed the converted BLT's patch vectors, "
              "one patch per source token; target within 1.6x of the exact-embedding figure):"), "",
              "| conversion | bound bits/byte | exact embeddings | ratio |", "|---|---:|---:|---:|"]
    for key, name in GATES.items():
        if key not in res["gate"]:
            continue
        g = res["gate"][key]
        lines.append(f"| {name} | {g['bound_bpb']:.3f} | {g['exact_bpb']:.3f} | {g['ratio']:.2f} |")
    read = [(key, kb, res[key][kb]) for key in rows if key != "1" for kb in budgets
            if kb in res.get(key, {}) and "bpb_other_global" in res[key][kb]]
    if read:
        lines += ["", "Does the decoder read the global? Held-out bits per byte of the trained model, and with its decoder "
                  "fed another window's global states (the global's outputs rolled by one along the batch); and "
                  "the step-0 gate's bound after training (the source's own layers fed the trained encoder's patch "
                  "vectors: is the written token content still there?):", "",
                  "| row | budget | own global | another text's global | loss | bound after training |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {key} | {kb} KB | {c['bpb']:.3f} | {c['bpb_other_global']:.3f} | "
                  f"+{c['bpb_other_global'] - c['bpb']:.3f} | {c['bound_after']:.3f} |" for key, kb, c in read]
    kb = budgets[-1]
    # the warm start as first built, with every part training, with teacher_kl, kept (shipped), kept at 65,536 buckets
    # (and spelling, and at 131,072 buckets): at the criterion's budget, else the ratio at the largest budget measured
    for warm in ("2", "2q", "2qk", "2qw", "2qw64k", "2qw64ks", "2qw128ks"):
        both = [b for b in budgets if b in res.get(warm, {}) and b in res.get("5", {})]
        if not both:
            continue
        ratio = res[warm][both[-1]]["bpb"] / res["5"][both[-1]]["bpb"]
        verdict = ('MET' if ratio <= 0.75 else 'NOT MET') if both[-1] == kb else f"not yet measured at {kb} KB"
        lines += ["", f"Criterion (row {warm} <= 0.75 x row 5 at {kb} KB): {ratio:.3f} at {both[-1]} KB -> {verdict}"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="460", help="KB of training text per row, comma-separated")
    ap.add_argument("--rows", default="1,2,3,4,5")
    ap.add_argument("--work", default="/tmp/byteify-quality")
    ap.add_argument("--final-bytes", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--entropy-steps", type=int, default=ENTROPY_STEPS, help="the shared patcher's training steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report-only", action="store_true",
                    help="write the table from the results file and the runs finished in --work (unfinished "
                         "cells '-'); trains and converts nothing")
    args = ap.parse_args()
    PATCHER["steps"] = args.entropy_steps
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = args.rows.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    docs = held_out_docs(args.final_bytes)
    n_bytes = sum(len(d) for d in docs)
    config = {"seed": args.seed, "final_bytes": args.final_bytes, "batch_bytes": BATCH_BYTES, "seq_len": SEQ_LEN}
    stem = tagged("byteify_quality", args.seed)
    res, curves = recorded_results(out / f"{stem}.json", config, work, rows, budgets, docs)
    if not args.report_only:
        base, starts = starting_models(work, rows, args.seed)
        res["1"] = {"step0": cached(work / "eval-source.json", lambda: {"bpb": source_bpb(base, docs)})}
        res.setdefault("gate", {}).update(  # before training: a run stopped for time leaves its gate measured
            {key: cached(work / f"gate-{key}.json", lambda key=key: step0_gate(starts[key], base, docs))
             for key in GATES if key in starts and (key in ("2", "3") or key in rows or key in map(KEPT_KL.get, rows))})
        new, new_curves = run_rows(work, rows, budgets, starts, docs, args.seed)
        for key, cells in new.items():
            res.setdefault(key, {}).update(cells)
        curves.update(new_curves)
    if "1" not in res:
        raise SystemExit(f"{out / f'{stem}.json'}: no record made with {config}; run without --report-only")
    header = (f"Decisive table: SmolLM2-135M byte-ified on the embedded corpus, seed {args.seed}, {BATCH_BYTES}-byte "
              f"steps, {platform.machine()}, {os.cpu_count()} CPU cores; held-out bits per byte on {n_bytes:,} bytes "
              f"of the validation split, every row under the same boundary-trained causal entropy patcher "
              f"({PATCHER['steps']} steps, threshold calibrated to the source's bytes per token); "
              + ("made with --report-only from the results file and the finished runs." if args.report_only else
                 f"this invocation {(time.perf_counter() - t0) / 60:.0f} min."))
    text = report(res, rows, budgets, header)
    print(text)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"config": config, "results": res, "curves": curves}, indent=2, default=str))
    if plot(curves, res["1"]["step0"]["bpb"], out / f"{stem}.png"):
        print(f"curve: {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
