#!/usr/bin/env python3
"""The GPU check: one script, one markdown table, at most 8 minutes on one H100/H200.

Sections (each row guarded: a failure becomes a FAIL row and the rest goes on):

* **environment**: python/torch/transformers/peft/pydantic/typer versions, the CUDA device, bf16
  support, the attention implementations available, a bf16 matmul ceiling (8192^3).  If byteify
  cannot run here (a pinned package missing or at an incompatible version) the script stops at
  once with one line saying how to carry the wheels (``scripts/gpu_wheels.sh``), exit code 2.
* **recipe**: a tiny random Llama -> ``byteify convert --preset tiny`` -> the ``tiny-cpu`` recipe
  with two stages (1: local parts, 2: end to end, global at 0.1x lr, 4 steps each) on CUDA in bf16
  with activation checkpointing and ``torch.compile``, stopped after step 6 (``run.stop_after``)
  and resumed (``--resume auto``); then the same recipe uninterrupted under FSDP2 in one process
  (``run.fsdp.shard=always``: NCCL, world size 1), whose losses must equal the plain run's within
  0.05 nats per step (bf16; fp32 on CPU: 1e-4).  All through byteify's CLI, in one child process.
* **throughput**: a Llama-3.2-1B-shaped BLT with random weights (global: 16 layers, hidden 2048,
  32/8 heads, FFN 8192; local sizes from ``recipes/llama-3.2-1b.yaml``'s convert command:
  ``--preset warm-kept-64k --set decoder.num_hidden_layers=6``), seq_len 8192, the recipe's
  end-to-end stage (fp32 master weights, bf16 autocast, AdamW over everything but the entropy
  model; the BLT's step alone: the stage's teacher_kl has its own row, which times the source
  model's next-byte targets for one micro-batch, its head in chunks and the byte-trie marginals on
  the GPU, and checks them against a float64 reference), entropy patching at 4.5 bytes/patch (threshold set from the random entropy model's
  entropies): bytes/s, peak memory and MFU with activation checkpointing and compile on/off, and
  with byteify's memory-efficient attention (``byteify/attention.py``) on/off.  MFU = bytes/s x
  model FLOPs per byte / peak; model FLOPs are counted analytically (see :func:`analytic_flops`);
  peak = 989 TFLOP/s dense bf16 (H100/H200 SXM datasheet; 756 for H100 PCIe; ``--peak-tflops``).
* **micro-batch**: the largest micro-batch (sequences of 8192 bytes) for which a training step
  runs without CUDA OOM, activation checkpointing on, per attention: two sizes give a linear
  memory model, sizes around its prediction bracket the limit (else doubling), bisection to 1/8;
  capped at ``--max-batch`` (256) and ``--search-s`` (75 s).
* **profile**: one training step under ``torch.profiler``: top kernels, the share of attention
  kernels, of mask building (transformers' ``create_causal_mask`` /
  ``create_sliding_window_causal_mask`` and BLT's ``_prepare_patch_cross_attention_mask``), of the
  entropy model's forward (``BltPatcher``) and of the global/local parts.

``--cpu`` runs the same code on a tiny shape on the CPU (seq 256, 1 warm-up + 1 timed step per
row, compile rows traced with dynamo's ``eager`` backend, micro-batch sizes 1 and 2 only) in about
a minute; ``tests/test_gpu_check.py`` runs it so the script cannot rot.

On the GPU machine (its image lacks pydantic and has transformers 5.17): ``bash
scripts/gpu_wheels.sh`` here first (22 MiB of wheels into the git-ignored .whl/), then ONE call of
the ``device`` tool's ``run`` with ``carry: [".whl"]``, ``timeout_s: 560`` and the command that
``python3 scripts/gpu_check.py --print-run`` prints (pip install of the wheels into /tmp/site, then
this script with ``--out $OUT --budget-s 440``).  Budget: environment ~10 s, recipe <= 170 s,
throughput + profile + micro-batch the rest; each row starts only if the time it needs is left,
else it is reported as skipped; a row still running at the deadline gets SIGTERM and is reported
as stopped.  ``--only recipe|bench`` runs one half (e.g. a second call for the rows that were
skipped).

Writes ``--out``/gpu_check.md (the table), gpu_check.json (rows with raw numbers), gpu_check.log
(the children's output) and profile_*.txt (the profiler's tables).  Exit code: 0 when no row
failed, 1 when one did, 2 when the environment cannot run byteify.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "recipe", "throughput", "micro-batch", "profile")
PINS = {"transformers": "5.24.0", "peft": "0.21.2", "pydantic": "2.14.4", "typer": "0.29.2"}
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
           "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;")
RUN_COMMAND = (INSTALL + " export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1;"
               " python3 scripts/gpu_check.py --out $OUT --budget-s 440")
RUN_CARRY = [".whl"]
RUN_TIMEOUT_S = 560
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0))
BYTES_PER_PATCH = 4.5  # target mean patch size of the throughput rows (BLT's entropy patching)
RECIPE_TOL = {"cuda": 0.05, "cpu": 1e-4}  # |loss(FSDP2) - loss(plain)| per step, nats


# ---- rows and the table -----------------------------------------------------------------------
class Rows:
    """Rows of the table, appended to a JSON-lines file as they come (a child killed at its
    deadline keeps what it finished)."""

    def __init__(self, path: Path | None = None):
        self.path, self.rows = path, []
        self.stop = ""  # set when the check cannot go on: the one line to print

    def add(self, section: str, check: str, status: str, result: str = "", notes: str = "", seconds=None, **data):
        row = {"section": section, "check": check, "status": status, "result": result, "notes": notes,
               "seconds": None if seconds is None else round(float(seconds), 1), "data": data}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        print(f"[{status}] {section} / {check}: {result}" + (f" ({notes})" if notes else ""), flush=True)
        return row

    @contextlib.contextmanager
    def guard(self, section: str, check: str):
        """Run a block; an exception becomes a FAIL row (one line) and the traceback goes to the log."""
        t0, n0 = time.perf_counter(), len(self.rows)
        try:
            yield
        except Deadline:
            if not any(r["check"] == check for r in self.rows[n0:]):  # (not when it came after the row)
                self.add(section, check, "skipped", "stopped at the time budget (--budget-s) while running",
                         seconds=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - every failure is a row
            traceback.print_exc()
            self.add(section, check, "FAIL", one_line(exc), seconds=time.perf_counter() - t0)


class Deadline(Exception):
    """Raised in a child by SIGTERM, which the parent sends when the child's deadline has passed:
    the row in progress is reported as stopped and the child ends normally."""


def _on_sigterm(signum, frame):
    raise Deadline()


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def si(x: float, unit: str, digits: int = 3) -> str:
    """1.23e9 -> '1.23 G<unit>' (k, M, G, T; plain below 1000)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}"


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(x) -> str:
    return ("-" if x in (None, "") else str(x)).replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[dict], header: str = "") -> str:
    order = {s: i for i, s in enumerate(SECTIONS)}
    rows = sorted(rows, key=lambda r: order.get(r["section"], len(SECTIONS)))  # stable: run order within
    lines = [header] if header else []
    lines += ["| section | check | status | result | s | notes |", "|---|---|---|---|---:|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in ("section", "check", "status", "result", "seconds",
                                                                    "notes")) + " |")
    return "\n".join(lines)


class Clock:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


# ---- environment (parent; light imports only) -----------------------------------------------
DIST_NAMES = ("torch", "transformers", "peft", "pydantic", "pydantic-core", "typer", "safetensors", "tokenizers",
              "huggingface-hub", "numpy", "pyyaml", "tqdm", "zstandard", "pyarrow")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in DIST_NAMES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def version_problems(v: dict[str, str | None]) -> list[str]:
    """What stops byteify from running with these package versions (empty: fine)."""
    problems = []
    for name in ("torch", "transformers", "pydantic", "typer", "peft", "safetensors", "pyyaml", "numpy", "tqdm"):
        if not v.get(name):
            problems.append(f"{name} missing")
    t = v.get("transformers")
    if t and t.split("+")[0] != PINS["transformers"]:
        problems.append(f"transformers {t} (byteify needs {PINS['transformers']}: its BLT code differs between versions)")
    p = v.get("pydantic")
    if p and not p.startswith("2."):
        problems.append(f"pydantic {p} (needs 2.x, pinned {PINS['pydantic']})")
    tv = v.get("torch")
    if tv:
        major, minor = (int(x) for x in tv.split("+")[0].split(".")[:2])
        if (major, minor) < (2, 6):
            problems.append(f"torch {tv} (needs >= 2.6 for FSDP2's fully_shard)")
    return problems


def stop_message(problems: list[str]) -> str:
    return ("gpu_check: byteify cannot run with this Python's packages (" + "; ".join(problems) + "). "
            "Carry the pinned wheels: run `bash scripts/gpu_wheels.sh` where pip can download (it fills the "
            "git-ignored .whl/), call the device tool's run with carry ['.whl'] and start the command with `"
            + INSTALL + "` (or `python3 scripts/gpu_check.py --print-run` for the whole command).")


def environment(rows: Rows, args) -> bool:
    """Environment rows; False when the check cannot go on (the caller stops)."""
    t0 = time.perf_counter()
    v = package_versions()
    problems = version_problems(v)
    if not problems:
        try:  # transformers' import-time dependency checks, its BLT, byteify's recipes and CLI
            import transformers.models.blt.modeling_blt  # noqa: F401

            import byteify.cli  # noqa: F401
            import byteify.train.recipe  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            problems.append(f"import failed: {one_line(exc, 200)}")
    shown = ", ".join(f"{k} {v[k] or 'MISSING'}" for k in ("torch", "transformers", "peft", "pydantic", "typer",
                                                             "safetensors", "tokenizers", "zstandard"))
    notes = f"python {sys.version.split()[0]} at {sys.executable}"
    if v.get("peft") and v["peft"] != PINS["peft"]:
        notes += f"; peft pinned {PINS['peft']}"
    if v.get("torch") and not v["torch"].startswith("2.13"):
        notes += "; project pins torch 2.13.0 (GPU users bring their CUDA build)"
    if not v.get("zstandard"):
        notes += "; zstandard missing: .zst data sources unavailable (not used here)"
    if problems:
        rows.add("environment", "versions", "FAIL", shown, "; ".join(problems), seconds=time.perf_counter() - t0)
        rows.stop = stop_message(problems)
        return False
    rows.add("environment", "versions", "ok", shown, notes, seconds=time.perf_counter() - t0, versions=v)
    import torch

    if args.cpu:
        rows.add("environment", "device", "ok", f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                 "--cpu: tiny shapes, fp32, no inductor")
        return True
    if not torch.cuda.is_available():
        rows.add("environment", "device", "FAIL", "no CUDA device visible to torch",
                 f"torch {torch.__version__}, CUDA build {torch.version.cuda}; use --cpu for the CPU mode")
        rows.stop = (f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build "
                     f"{torch.version.cuda}); run with --cpu for the CPU mode")
        return False
    props = torch.cuda.get_device_properties(0)
    bf16 = torch.cuda.is_bf16_supported()
    rows.add("environment", "device", "ok" if bf16 else "FAIL",
             f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, bf16 "
             + ("yes" if bf16 else "NO"),
             f"{torch.cuda.device_count()} GPU(s); CUDA {torch.version.cuda}; "
             f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}",
             device=props.name, memory_gib=props.total_memory / 2**30)
    if not bf16:
        rows.stop = f"gpu_check: {props.name} does not support bf16, which the recipes train in"
    return bf16


# ---- children -----------------------------------------------------------------------------------
def child_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONUNBUFFERED"] = "1"
    if args.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # small shapes on shared cores: threads only contend
    return env


def run_child(kind: str, args, rows: Rows, clock: Clock, timeout: float, log) -> None:
    rows_file = Path(args.work) / f"rows-{kind}.jsonl"
    rows_file.unlink(missing_ok=True)
    deadline = time.time() + timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--rows", str(rows_file),
           "--deadline", f"{deadline:.1f}", "--work", str(args.work), "--out", str(args.out)]
    if args.cpu:
        cmd.append("--cpu")
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    print(f"== {kind}: child process, {timeout:.0f} s at most", flush=True)
    log.write(f"\n===== {kind}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=child_env(args), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    import signal

    try:  # the child checks its deadline before each row; a row that overruns it gets SIGTERM
        rc = proc.wait(timeout=timeout + 3)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    got = read_rows(rows_file)
    for r in got:
        rows.rows.append(r)
    if rc != 0:
        what = f"timed out after {time.perf_counter() - t0:.0f} s" if rc is None else f"exit code {rc}"
        rows.add(kind if kind in SECTIONS else "throughput", f"{kind} child process", "FAIL", what,
                 f"{len(got)} row(s) came back; the log (gpu_check.log) has its output",
                 seconds=time.perf_counter() - t0)


# ---- the recipe section (child) -----------------------------------------------------------------
def corpus_texts(min_chars: int = 300_000) -> list[str]:
    """Real English text without a download: the pydoc topics every CPython carries (quicker than
    byteify's default source, which also parses the standard library); that default source if an
    install lacks them; this file's own text as the last resort."""
    texts: list[str] = []
    try:
        from byteify.data.corpus import pydoc_topic_documents

        texts = [t for _, t in pydoc_topic_documents()]
    except Exception:  # noqa: BLE001 - a Python without pydoc_data
        pass
    if sum(map(len, texts)) < min_chars:
        try:
            from byteify.data.corpus import default_documents

            texts += [t for _, t in default_documents()]
        except Exception:  # noqa: BLE001
            pass
    while sum(map(len, texts)) < min_chars:
        texts.append(Path(__file__).read_text())
    return texts


def write_corpus(path: Path) -> int:
    with open(path, "w") as f:
        n = 0
        for text in corpus_texts():
            f.write(json.dumps({"text": text}) + "\n")
            n += len(text)
    return n


def cli(*argv: str) -> int:
    """byteify's typer app in this process (what ``byteify ARGS`` runs); returns the exit code."""
    from byteify.cli import app

    try:
        rc = app(list(argv), prog_name="byteify", standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - click in standalone mode
        rc = exc.code
    return int(rc or 0)


def metrics(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in recs if "step" in r}, [r["summary"] for r in recs if "summary" in r]


def recipe_child(args, rows: Rows, clock: Clock) -> None:
    import torch

    cpu = args.cpu
    work = Path(args.work) / "recipe"
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if cpu else "cuda"
    seq, batch = (128, 1024) if cpu else (512, 4096)
    blt = work / "blt"
    with rows.guard("recipe", "convert --preset tiny"):
        t0 = time.perf_counter()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, vocab_size=96, max_position_embeddings=1024)
        LlamaForCausalLM(cfg).save_pretrained(str(work / "src"))
        rc = cli("convert", str(work / "src"), str(blt), "--preset", "tiny", "--force")
        ok = rc == 0 and (blt / "config.json").exists()
        rows.add("recipe", "convert --preset tiny", "ok" if ok else "FAIL",
                 "random Llama (2 layers, hidden 64) -> BLT, transplant verified" if ok else f"exit code {rc}",
                 seconds=time.perf_counter() - t0)
    corpus = work / "corpus.jsonl"
    n_bytes = write_corpus(corpus)
    stages = ("stages=[{name: local, train: [local_encoder, hash_embeddings, local_decoder], steps: 4, warmup_steps: 1, "
              f"batch_bytes: {batch}, lr: 3.0e-3}}, {{name: end-to-end, train: [local_encoder, hash_embeddings, "
              f"local_decoder, global], lr_multipliers: {{global: 0.1}}, steps: 4, warmup_steps: 1, batch_bytes: {batch}, "
              "lr: 3.0e-3}]")
    base = [f"model={blt}", f"data.sources=[{{path: '{corpus}'}}]", f"data.seq_len={seq}", stages,
            f"run.device={device}", f"run.dtype={'fp32' if cpu else 'bf16'}", "run.activation_checkpointing=true",
            "run.progress=false", "run.log_every=1", "run.eval_every=4", "run.eval_batches=1", "run.save_every=100",
            "run.keep_last=2"]

    def common(comp: bool) -> list[str]:
        return base + [f"run.compile={'true' if comp else 'false'}"]

    def what(comp: bool) -> str:
        return (f"tiny-cpu, 2 stages x 4 steps, {batch} B/step (seq {seq}), {device}, "
                + ("fp32" if cpu else "bf16") + ", checkpointing, " + ("compile" if comp else "no compile")
                + (" (CPU mode)" if cpu else ""))

    # instrumentation (no file of byteify is changed): which process-group backend and how often FSDP2 shards
    import byteify.train.distributed as bdist
    import torch.distributed as tdist

    seen = {"backend": [], "shard": 0}
    real_init, real_shard = tdist.init_process_group, bdist.shard

    def init_pg(*a, **k):
        seen["backend"].append(a[0] if a else k.get("backend"))
        return real_init(*a, **k)

    def shard(*a, **k):
        seen["shard"] += 1
        return real_shard(*a, **k)

    tdist.init_process_group, bdist.shard = init_pg, shard

    def verdict(ok: bool, rc: int) -> str:
        if not ok and rc == 130 and clock.left() <= 0:
            return "skipped"  # the parent's SIGTERM at the deadline: the trainer saved and stopped
        return "ok" if ok else "FAIL"

    def skip(check: str, need_gpu: float) -> bool:
        need = 5.0 if cpu else need_gpu
        if clock.left() >= need:
            return False
        rows.add("recipe", check, "skipped", f"{clock.left():.0f} s left, needs ~{need:.0f} s",
                 "the time budget ran out (--budget-s)")
        return True

    def plain_pair(comp: bool, run_dir: Path, tag: str) -> bool:
        """Stop after step 6 (mid stage 2), then --resume auto to the end; True when both passed."""
        passed = []
        check = f"stop mid-way (run.stop_after=6){tag}"
        if skip(check, 40):
            return False
        with rows.guard("recipe", check):
            t0 = time.perf_counter()
            rc = cli("train", "tiny-cpu", f"output_dir={run_dir}", *common(comp), "run.stop_after=6")
            steps, summaries = metrics(run_dir)
            ok = rc == 0 and sorted(steps) == list(range(1, 7)) and summaries and summaries[-1]["stopped_early"]
            stage_names = list(dict.fromkeys(steps[s]["stage"] for s in sorted(steps)))
            rows.add("recipe", check, verdict(ok, rc),
                     f"exit {rc}; steps {min(steps, default=0)}-{max(steps, default=0)} ({' -> '.join(stage_names)}); "
                     "stopped with a checkpoint at step 6", what(comp), seconds=time.perf_counter() - t0)
            passed.append(ok)
        check = f"resume (--resume auto){tag}"
        if skip(check, 25):
            return False
        with rows.guard("recipe", check):
            t0 = time.perf_counter()
            rc = cli("train", "tiny-cpu", f"output_dir={run_dir}", *common(comp), "--resume", "auto")
            steps, summaries = metrics(run_dir)
            losses = [steps[s]["loss"] for s in sorted(steps)]
            final = summaries[-1] if summaries else {}
            ckpt = Path(final.get("checkpoint") or "")
            ok = (rc == 0 and sorted(steps) == list(range(1, 9)) and all(math.isfinite(x) for x in losses)
                  and not final.get("stopped_early", True) and (ckpt / "model" / "config.json").exists()
                  and [steps[s]["stage"] for s in range(1, 9)] == ["local"] * 4 + ["end-to-end"] * 4)
            rows.add("recipe", check, verdict(ok, rc),
                     f"exit {rc}; steps 7-8 run, 8 in all, losses finite ({losses[0]:.3f} -> {losses[-1]:.3f} nats), "
                     f"val {final.get('final_val_bpb') or float('nan'):.3f} bpb",
                     f"final checkpoint {ckpt.name} with model/; peak {final.get('peak_memory_mb')} MB"
                     + ("" if cpu else " (CUDA max allocated)"), seconds=time.perf_counter() - t0, losses=losses)
            passed.append(ok)
        return len(passed) == 2 and all(passed)

    def fsdp_run(comp: bool, run_dir: Path, tag: str) -> bool:
        check = f"FSDP2 in one process (run.fsdp.shard=always){tag}"
        ok = False
        if skip(check, 40):
            return False
        with rows.guard("recipe", check):
            t0 = time.perf_counter()
            before = seen["shard"]
            rc = cli("train", "tiny-cpu", f"output_dir={run_dir}", *common(comp), "run.fsdp.shard=always")
            steps_f, summaries_f = metrics(run_dir)
            backend = seen["backend"][-1] if seen["backend"] else None
            ok = (rc == 0 and sorted(steps_f) == list(range(1, 9)) and backend == ("gloo" if cpu else "nccl")
                  and seen["shard"] - before == 2 and bool(summaries_f) and not summaries_f[-1]["stopped_early"])
            rows.add("recipe", check, verdict(ok, rc),
                     f"exit {rc}; 8 steps uninterrupted; backend {backend}, world size 1; fully_shard applied "
                     f"{seen['shard'] - before}x (once per stage)",
                     what(comp) + "; FSDP2 mixed precision " + ("fp32 (CPU)" if cpu else "bf16 params, fp32 reduce"),
                     seconds=time.perf_counter() - t0)
        return ok

    # On CUDA the recipe runs with torch.compile; if that fails, the same again without compile, so the
    # table tells a compile problem from a training/resume/FSDP problem.
    modes = [False] if cpu else [True, False]

    def tag(comp: bool) -> str:
        return "" if comp == modes[0] else " [compile off]"

    plain_comp, plain = None, None
    for comp in modes:
        run_dir = work / f"plain-{'compile' if comp else 'eager'}"
        if plain_pair(comp, run_dir, tag(comp)):
            plain_comp, plain = comp, run_dir
            break
        if clock.left() < 60:
            break
    fsdp_ok, fsdp = False, None
    for comp in ([False] if plain_comp is False else modes):
        fsdp = work / f"fsdp-{'compile' if comp else 'eager'}"
        if fsdp_run(comp, fsdp, tag(comp)):
            fsdp_ok = True
            break
        if clock.left() < 45:
            break
    tol = RECIPE_TOL[device]
    with rows.guard("recipe", "FSDP2 losses = plain losses"):
        if plain_comp is None or not fsdp_ok:
            raise RuntimeError("nothing to compare: the plain or the FSDP2 run failed (rows above)")
        steps, _ = metrics(plain)
        steps_f, _ = metrics(fsdp)
        diffs = [abs(steps[s]["loss"] - steps_f[s]["loss"]) for s in sorted(steps) if s in steps_f]
        vals = [abs(steps[s]["val_bpb"] - steps_f[s]["val_bpb"]) for s in (4, 8)
                if "val_bpb" in steps.get(s, {}) and "val_bpb" in steps_f.get(s, {})]
        ok = len(diffs) == 8 and max(diffs) <= tol
        rows.add("recipe", "FSDP2 losses = plain losses", "ok" if ok else "FAIL",
                 f"max |dloss| {max(diffs):.2e} nats over {len(diffs)} steps (tolerance {tol:g}, "
                 + ("fp32)" if cpu else "bf16)"),
                 f"plain = stopped at 6 + resumed; val bpb max |d| {max(vals) if vals else float('nan'):.2e}",
                 diffs=diffs)
    tdist.init_process_group, bdist.shard = real_init, real_shard
    print(f"corpus {n_bytes:,} chars; recipe section done", flush=True)


# ---- the 1B-shaped model (child) -----------------------------------------------------------------
def llama_source(cpu: bool):
    """A stand-in for ``SourceCheckpoint`` (config + dims) of Llama 3.2 1B (or a tiny Llama)."""
    from transformers import LlamaConfig

    if cpu:
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=96, max_position_embeddings=1024, rms_norm_eps=1e-5)
    else:  # meta-llama/Llama-3.2-1B's config.json
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                          rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})

    class Source:
        config = cfg

        def dims(self):
            hd = cfg.hidden_size // cfg.num_attention_heads
            return {"hidden": cfg.hidden_size, "q_dim": cfg.num_attention_heads * hd,
                    "kv_dim": cfg.num_key_value_heads * hd, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size}

    return Source()


def bench_stage(recipe):
    """The recipe's end-to-end stage (its long one) as the throughput rows train it: the BLT's
    step alone (teacher_kl has its own row) with every weight training (random weights have no
    written content for keep_warm_start to fix)."""
    return recipe.stages[-1].model_copy(update={"teacher_kl": None, "keep_warm_start": False})


def bench_config(cpu: bool):
    """The BltConfig ``byteify convert`` writes for the llama-3.2-1b recipe (its header's
    ``--preset warm-kept-64k --set decoder.num_hidden_layers=6``); tiny in --cpu."""
    from byteify.convert.presets import load_spec
    from byteify.convert.transplant import build_blt_config

    if cpu:
        spec = load_spec("tiny", ["local_attention_window=64", "entropy.sliding_window=64"])
    else:
        spec = load_spec("warm-kept-64k", ["decoder.num_hidden_layers=6"])
    config, _ = build_blt_config(llama_source(cpu), spec)
    return config


def analytic_flops(blt, seq_len: int, bytes_per_patch: float) -> dict[str, float]:
    """Training FLOPs per byte of the model (no recompute): 2 x weights of every linear layer a
    byte / patch slot / patch goes through, plus attention scores and weighted sums (4 x width x
    context per query: local self-attention within its window, global causal over the patches,
    cross-attention over a patch's bytes or its k slots); x3 for forward + backward of the parts
    that train, x1 for the frozen entropy model (forward only, no gradients).  Hash and byte
    embeddings are lookups (0 FLOPs)."""
    import torch.nn as nn

    m, cfg = blt.model, blt.config
    k, n = cfg.cross_attn_k, float(bytes_per_patch)

    def lin(mod) -> int:
        return sum(x.weight.numel() for x in mod.modules() if isinstance(x, nn.Linear))

    per_byte = lin(m.local_encoder.layers) + lin(m.local_decoder.layers) + lin(blt.lm_head)
    per_slot = 0
    for ca in m.local_encoder.cross_attn_layers:  # queries: the patch slots; keys/values: the bytes
        per_byte += lin(ca.k_proj) + lin(ca.v_proj)
        per_slot += lin(ca.q_proj) + lin(ca.o_proj)
    for ca in m.local_decoder.cross_attn_layers:  # queries: the bytes; keys/values: the patch slots
        per_byte += lin(ca.q_proj) + lin(ca.o_proj)
        per_slot += lin(ca.k_proj) + lin(ca.v_proj)
    per_patch = lin(m.global_transformer) + lin(m.local_encoder.patch_embedding_projection) + \
        lin(m.local_decoder.patch_embedding_projection)
    linear = 2.0 * (per_byte + per_slot * k / n + per_patch / n)
    e, d, g = cfg.encoder_config, cfg.decoder_config, cfg.global_config
    w = cfg.local_attention_window_len or seq_len
    ctx_local = sum(min(t + 1, w) for t in range(seq_len)) / seq_len
    patches = seq_len / n
    attn = 4.0 * e.hidden_size * ctx_local * (e.num_hidden_layers + d.num_hidden_layers)
    attn += 4.0 * g.hidden_size * (patches + 1) / 2 * g.num_hidden_layers / n
    attn += 4.0 * e.hidden_size * k * len(m.local_encoder.cross_attn_layers)  # each slot over ~n bytes
    attn += 4.0 * d.hidden_size * k * len(m.local_decoder.cross_attn_layers)  # each byte over k slots
    entropy = 0.0
    if m.patcher is not None:
        p = cfg.patcher_config
        we = getattr(p, "sliding_window", None) or seq_len
        ctx_e = sum(min(t + 1, we) for t in range(seq_len)) / seq_len
        entropy = 2.0 * lin(m.patcher) + 4.0 * p.hidden_size * ctx_e * p.num_hidden_layers
    return {"train": 3.0 * (linear + attn) + entropy, "linear_fwd": linear, "attention_fwd": attn,
            "entropy_fwd": entropy, "params_per_byte": per_byte, "params_per_patch": per_patch}


class Bench:
    """Builds the stage's TrainModule (byteify.train.model.build_module, as the trainer does),
    random weights, AdamW (byteify.train.optim), the entropy patcher, and runs training steps as
    ByteStage + Trainer._optimizer_step do (forward under autocast, backward, clip, step)."""

    def __init__(self, args, rows: Rows, clock: Clock):
        import torch

        from byteify.train.distributed import Dist
        from byteify.train.recipe import load_recipe

        self.args, self.rows, self.clock, self.cpu = args, rows, clock, args.cpu
        self.torch = torch
        self.device = torch.device("cpu" if self.cpu else "cuda")
        self.dist = Dist(device=self.device)
        over = ["model=unused", "output_dir=unused"] + (["data.seq_len=256"] if self.cpu else [])
        recipe, _ = load_recipe("llama-3.2-1b", over)
        self.stage, self.run = bench_stage(recipe), recipe.run
        self.seq = recipe.data.seq_len
        self.config = bench_config(self.cpu)
        self.warmup, self.timed = (1, 1) if self.cpu else (2, 3)
        self.batch = 2 if self.cpu else 8
        self.rows_np = self._rows(32 if not self.cpu else 4)
        self.peak = self._peak_flops()
        self.bpp = None  # measured bytes per patch
        self.threshold = None

    # -- pieces --
    def _rows(self, n: int):
        from byteify.data.readers import encode_text
        from byteify.data.streams import pack_rows

        return pack_rows((encode_text(t) for t in corpus_texts()), self.seq, max_rows=n)

    def batch_of(self, b: int):
        from byteify.data.streams import to_batch

        idx = [i % len(self.rows_np) for i in range(b)]
        batch = to_batch(self.rows_np[idx])
        return batch["input_ids"].to(self.device), batch["labels"].to(self.device)

    def _peak_flops(self):
        if self.args.peak_tflops:
            return self.args.peak_tflops * 1e12, f"{self.args.peak_tflops:g} TFLOP/s (--peak-tflops)"
        if self.cpu:
            return None, "no peak on CPU"
        name = self.torch.cuda.get_device_name(0)
        for key, tf in PEAK_TFLOPS:
            if key in name:
                return tf * 1e12, f"{tf:g} TFLOP/s dense bf16 ({key} datasheet)"
        return None, f"peak unknown for {name} (pass --peak-tflops)"

    def sync(self):
        if not self.cpu:
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if not self.cpu:
            self.torch.cuda.empty_cache()

    def autocast(self):
        if self.cpu:
            return contextlib.nullcontext()
        return self.torch.autocast("cuda", dtype=self.torch.bfloat16)

    def build(self, ckpt: bool, compile_: bool, attention: str | None):
        torch = self.torch
        from byteify.train.model import build_module
        from byteify.train.optim import build_optimizer

        run = self.run.model_copy(update={"activation_checkpointing": ckpt, "compile": compile_})
        module = build_module(self.config, self.stage, self.dist, run)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for _, p in module.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02, generator=gen)
                else:
                    p.fill_(1.0)
        if attention is None:  # stock, whatever default the trainer may grow
            module.blt.set_attn_implementation("sdpa")
        else:
            from byteify.attention import use_attention

            use_attention(module, attention)
        if compile_:  # as Trainer.run_stage does
            backend = "eager" if self.cpu else "inductor"
            for layer in module.blt.model.global_transformer.layers:
                layer.compile(backend=backend)
        optimizer = build_optimizer(module, self.stage)
        module.train()
        return module, optimizer

    def patcher(self, module, ids):
        from byteify.patching.patchers import EntropyPatcher

        ent = module.blt.model.patcher
        if self.threshold is None:  # random entropy model: the quantile giving ~4.5 bytes per patch
            h = EntropyPatcher(ent, 0.0).entropies(ids[: min(len(ids), 8)])
            self.threshold = float(self.torch.quantile(h.flatten().float(), 1.0 - 1.0 / BYTES_PER_PATCH))
        p = EntropyPatcher(ent, self.threshold)
        if self.bpp is None:
            with self.torch.no_grad():
                lengths = p(ids)
            self.bpp = float(lengths.sum()) / float((lengths > 0).sum())
        return p

    def step(self, module, optimizer, ids, labels, patcher) -> float:
        torch = self.torch
        from byteify.tokenizer import IGNORE_INDEX

        count = int((labels != IGNORE_INDEX).sum())
        with self.autocast():
            blt = module(ids, labels, patcher=patcher, entropy_loss=False).blt
        (blt / max(count, 1)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], self.stage.grad_clip or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(blt.detach()) / max(count, 1)

    def peak_mem(self) -> float:
        if self.cpu:
            return vm_hwm() / 2**30
        return self.torch.cuda.max_memory_allocated() / 2**30

    def reset_peak(self):
        if self.cpu:
            reset_hwm()
        else:
            self.torch.cuda.reset_peak_memory_stats()

    def is_oom(self, exc) -> bool:
        return isinstance(exc, self.torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def vm_hwm() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def matmul_ceiling(b: Bench, rows: Rows) -> None:
    torch = b.torch
    with rows.guard("environment", "matmul ceiling"):
        n, dtype = (1024, torch.float32) if b.cpu else (8192, torch.bfloat16)
        x = torch.randn(n, n, device=b.device, dtype=dtype)
        y = torch.randn(n, n, device=b.device, dtype=dtype)
        times = []
        for i in range(3 if b.cpu else 13):
            b.sync()
            t0 = time.perf_counter()
            x @ y
            b.sync()
            if i >= (1 if b.cpu else 3):
                times.append(time.perf_counter() - t0)
        times.sort()
        tflops = 2 * n**3 / times[len(times) // 2] / 1e12
        b.measured_tflops = tflops
        rows.add("environment", "matmul ceiling", "ok",
                 f"{si(tflops * 1e12, 'FLOP/s')} ({'fp32' if b.cpu else 'bf16'} {n}^3, median)",
                 "random data; KINDS.md saw 769-798 TFLOP/s on an H200" if not b.cpu else "CPU")
        del x, y
        b.free()


def model_row(b: Bench, rows: Rows) -> None:
    """The shape, parameters per part and FLOPs per byte (analytic, and as torch's flop counter
    sees one eager step with the dense masks)."""
    with rows.guard("throughput", "model"):
        t0 = time.perf_counter()
        from byteify.train.model import param_counts

        module, optimizer = b.build(ckpt=False, compile_=False, attention=None)
        ids, labels = b.batch_of(1)
        patcher = b.patcher(module, b.batch_of(min(b.batch, 8))[0])
        counts = {p: c["trainable"] + c["frozen"] for p, c in param_counts(module).items()}
        fl = analytic_flops(module.blt, b.seq, b.bpp)
        b.flops_per_byte = fl["train"]
        counted = ""
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                b.step(module, optimizer, ids, labels, patcher)
            counted = (f"; torch.utils.flop_counter on one eager step: {si(fc.get_total_flops() / b.seq, 'FLOP')}/byte "
                       "(its attention formulas count masked SDPA dense; none for SDPA on CPU)")
        except Exception as exc:  # noqa: BLE001
            counted = f"; flop counter failed: {one_line(exc, 80)}"
        c = module.blt.config
        shape = (f"global {c.global_config.num_hidden_layers}x{c.global_config.hidden_size} "
                 f"({c.global_config.num_attention_heads}/{c.global_config.num_key_value_heads} heads, ffn "
                 f"{c.global_config.intermediate_size}); enc {c.encoder_config.num_hidden_layers} / dec "
                 f"{c.decoder_config.num_hidden_layers} x {c.encoder_config.hidden_size}; k={c.cross_attn_k}; "
                 f"window {c.local_attention_window_len}; entropy {c.patcher_config.num_hidden_layers}x"
                 f"{c.patcher_config.hidden_size}; hash {c.encoder_hash_byte_group_vocab} x "
                 f"{len(c.encoder_hash_byte_group_size)}")
        total = sum(counts.values())
        rows.add("throughput", "model", "ok",
                 f"{si(total, 'params')}; seq {b.seq}; {b.bpp:.2f} bytes/patch; "
                 f"{si(fl['train'], 'FLOP')}/byte (training, analytic)",
                 shape + "; params: " + ", ".join(f"{p} {si(n, '')}" for p, n in counts.items())
                 + f"; forward per byte: linear {si(fl['linear_fwd'], 'FLOP')} + attention "
                 f"{si(fl['attention_fwd'], 'FLOP')}, entropy model {si(fl['entropy_fwd'], 'FLOP')}; training = "
                 "3 x forward + entropy model" + counted,
                 seconds=time.perf_counter() - t0, params=counts, flops=fl, bytes_per_patch=b.bpp,
                 threshold=b.threshold)
        del module, optimizer
        b.free()


def throughput_row(b: Bench, rows: Rows, ckpt: bool, compile_: bool, attention: str | None) -> None:
    torch = b.torch
    attn = attention or "sdpa (stock)"
    name = f"ckpt {'on' if ckpt else 'off'}, compile {'on' if compile_ else 'off'}, {attn}"
    with rows.guard("throughput", name):
        t0 = time.perf_counter()
        batch, notes = b.batch, []
        while True:
            module = optimizer = None
            try:
                b.free()
                b.reset_peak()
                module, optimizer = b.build(ckpt, compile_, attention)
                ids, labels = b.batch_of(batch)
                patcher = b.patcher(module, ids)
                tw = time.perf_counter()
                for _ in range(b.warmup):
                    loss = b.step(module, optimizer, ids, labels, patcher)
                b.sync()
                warm = time.perf_counter() - tw
                b.sync()
                t1 = time.perf_counter()
                for _ in range(b.timed):
                    loss = b.step(module, optimizer, ids, labels, patcher)
                b.sync()
                dt = time.perf_counter() - t1
                break
            except Exception as exc:  # noqa: BLE001
                if not b.is_oom(exc) or batch == 1:
                    raise
                notes.append(f"B={batch} OOM")
                batch //= 2
            finally:
                del module, optimizer
        bytes_s = batch * b.seq * b.timed / dt
        peak = b.peak_mem()
        fps = bytes_s * b.flops_per_byte
        if b.peak[0]:
            mfu = f"MFU {100 * fps / b.peak[0]:.1f}%"
            ceiling = getattr(b, "measured_tflops", None)
            notes.append(f"{si(fps, 'FLOP/s')} model" + (f" = {100 * fps / 1e12 / ceiling:.1f}% of the measured matmul "
                                                          "ceiling" if ceiling else ""))
        else:
            mfu = f"{si(fps, 'FLOP/s')} model (MFU n/a: {b.peak[1]})"
        notes.append(f"B={batch} x {b.seq} B, {b.timed} timed step(s) after {b.warmup} warm-up ({warm:.1f} s"
                     + (", compile included" if compile_ else "") + f"); loss {loss:.3f}"
                     + ("; compile = global layers, as the trainer" + (" (CPU: dynamo, eager backend)" if b.cpu else "")
                        if compile_ else ""))
        rows.add("throughput", name, "ok" if math.isfinite(loss) else "FAIL",
                 f"{bytes_s:,.0f} B/s; peak {peak:.1f} GiB; {mfu}", "; ".join(n for n in notes if n),
                 seconds=time.perf_counter() - t0, bytes_per_s=bytes_s, peak_gib=peak, batch=batch,
                 model_flops_per_s=fps, step_s=dt / b.timed)
        b.free()
        if compile_:
            torch._dynamo.reset()


TEACHER_CHECK = "teacher_kl targets (bf16 teacher, head in chunks, byte trie on the device)"


def teacher_row(b: Bench, rows: Rows) -> None:
    """What ``teacher_kl`` adds to a step of the llama-3.2-1b recipe: the source model (Llama 3.2 1B
    shape, random bf16 weights; tiny in --cpu) over the source tokens of one micro-batch (b.batch x
    seq bytes at 4.4 bytes per token), its next-byte targets for every byte
    (:func:`byteify.train.teacher.byte_marginals`: the head a chunk of positions at a time, each
    chunk marginalised by a byte trie over a vocabulary of random byte strings where it was
    computed): seconds, peak memory above the weights, and the first positions' targets against the
    whole logits marginalised in float64 on the host."""
    torch = b.torch
    from transformers import LlamaForCausalLM

    from byteify.train.aligned import ByteTrie
    from byteify.train.teacher import HEAD_CHUNK, byte_marginals

    with rows.guard("throughput", TEACHER_CHECK):
        cfg = llama_source(b.cpu).config
        torch.manual_seed(0)
        with torch.device(b.device):
            teacher = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        vocab, gen = cfg.vocab_size, torch.Generator().manual_seed(0)
        lengths = torch.randint(1, 9, (vocab,), generator=gen).tolist()
        seen, strings = set(), []
        for n in lengths:  # random byte strings, 1-8 bytes; a repeat is not a token (None)
            x = bytes(torch.randint(0, 256, (n,), generator=gen).tolist())
            strings.append(None if x in seen else x)
            seen.add(x)
        trie = ByteTrie(strings)
        valid = torch.tensor([i for i, x in enumerate(strings) if x is not None])
        per_row = max(2, round(b.seq / 4.4))
        ids = valid[torch.randint(0, len(valid), (b.batch, per_row), generator=gen)]
        nxt = ids[:, 1:].flatten()  # the token after each position (all but the last of a row)
        at = (torch.arange(b.batch)[:, None] * per_row + torch.arange(per_row - 1)[None]).flatten()
        n = torch.tensor([len(strings[int(t)]) for t in nxt])
        token, pos = torch.repeat_interleave(nxt, n), torch.repeat_interleave(at, n)
        depth = torch.arange(len(token)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        byte_marginals(teacher, trie, pos, token, depth, 1.0, ids)  # warm-up (kernels, trie tables)
        b.sync()
        b.free()
        base = torch.cuda.memory_allocated() / 2**30 if not b.cpu else 0.0
        b.reset_peak()
        t0 = time.perf_counter()
        out = byte_marginals(teacher, trie, pos, token, depth, 1.0, ids)
        b.sync()
        dt = time.perf_counter() - t0
        peak = b.peak_mem() - base
        k = int((pos < 16).sum())  # the queries of the first 16 positions: the reference's
        with torch.no_grad():
            logits = teacher(ids[:1].to(b.device), use_cache=False).logits[0, :16].double().cpu()
        ref = trie.marginals(logits.softmax(-1), token[:k], depth[:k], which=pos[:k])
        err = float((out[:k].double().cpu() - ref).abs().max())
        sums = float((out.sum(-1) - 1).abs().max())
        ok = err < 2e-2 and sums < 1e-3 and bool(torch.isfinite(out).all())
        n_bytes = b.batch * b.seq
        rows.add("throughput", TEACHER_CHECK, "ok" if ok else "FAIL",
                 f"{dt * 1e3:.0f} ms per micro-batch ({n_bytes:,} bytes, {ids.numel():,} tokens, {len(token):,} "
                 f"targets; {n_bytes / dt / 1e3:.0f} kB/s); "
                 + (f"peak RSS {peak:.2f} GiB" if b.cpu else f"peak +{peak:.2f} GiB above the weights"),
                 f"vocabulary {vocab:,}, {max(1, HEAD_CHUNK // vocab)} positions per head chunk; max |target - "
                 f"float64 reference| {err:.1e}, max |sum - 1| {sums:.1e}", seconds=dt)
        del teacher, out
        b.free()


def microbatch_search(b: Bench, rows: Rows, attention: str | None, budget_s: float) -> None:
    """Largest micro-batch (sequences of seq_len bytes) for which one training step (forward,
    backward, AdamW) runs without CUDA OOM, activation checkpointing on: 1 sequence (AdamW's
    states appear), then the throughput rows' batch and twice it give a linear memory model, the
    sizes around its prediction bracket the limit (else doubling), then bisection to within 1/8;
    each trial catches the OOM and frees the memory.  --cpu: sizes 1 and 2 only (no OOM on CPU)."""
    attn = attention or "sdpa (stock)"
    name = f"largest micro-batch, ckpt on, {attn}"
    with rows.guard("micro-batch", name):
        t0 = time.perf_counter()
        stop_at = time.time() + budget_s
        cap = 2 if b.cpu else b.args.max_batch
        b.free()
        module, optimizer = b.build(ckpt=True, compile_=False, attention=attention)
        patcher = b.patcher(module, b.batch_of(min(8, b.batch))[0])
        trail, peaks = [], {}

        def fits(n: int) -> bool:
            ok = True
            b.free()
            b.reset_peak()
            t = time.perf_counter()
            try:
                ids, labels = b.batch_of(n)
                b.step(module, optimizer, ids, labels, patcher)
                b.sync()
            except Exception as exc:  # noqa: BLE001
                if not b.is_oom(exc):
                    raise
                ok = False
                optimizer.zero_grad(set_to_none=True)
            ids = labels = None
            if ok:
                peaks[n] = b.peak_mem()
            b.free()
            trail.append(f"{n}:" + (f"ok {peaks[n]:.1f}GiB {time.perf_counter() - t:.1f}s" if ok else "OOM"))
            return ok

        good, bad, stopped = 0, None, False

        def trial(n: int) -> bool:
            """False when the search should stop (OOM seen, or out of time)."""
            nonlocal good, bad, stopped
            if time.time() > stop_at:
                stopped = True
                return False
            if fits(n):
                good = max(good, n)
                return True
            bad = n if bad is None else min(bad, n)
            return False

        # 1 first (AdamW's states come with the first step), then two sizes for the linear model
        go = True
        for n in sorted({1, 2} if b.cpu else {1, min(b.batch, cap), min(2 * b.batch, cap)}):
            go = go and trial(n)
        if go and not b.cpu and good < cap and len(peaks) >= 3:
            n1, n2 = sorted(peaks)[-2:]
            per = (peaks[n2] - peaks[n1]) / (n2 - n1)  # GiB per sequence
            total = b.torch.cuda.get_device_properties(0).total_memory / 2**30
            if per > 0:
                pred = (0.98 * total - (peaks[n1] - n1 * per)) / per
                for n in (int(0.92 * pred), int(1.06 * pred)):
                    n = min(cap, n)
                    if n > good and not trial(n):
                        go = False
                        break
        while go and bad is None and good < cap:
            go = trial(min(cap, 2 * good))
        while bad is not None and bad - good > max(1, good // 8):
            if not trial((good + bad) // 2) and stopped:
                break
        micro = b.stage.batch_bytes // b.seq // b.stage.grad_accum
        if good == 0:
            result = f"not even 1 sequence of {b.seq} B fits" if not stopped else "stopped by the time budget"
        elif bad is None:
            result = f">= {good} x {b.seq} B ({si(good * b.seq, 'B')} per micro-step): " + \
                ("search stopped by the time budget" if stopped else
                 "CPU mode: sizes 1-2 only, no OOM search" if b.cpu else f"cap --max-batch {cap} reached")
        else:
            result = f"{good} x {b.seq} B ({si(good * b.seq, 'B')} per micro-step); {bad} OOM" + \
                (" (bisection stopped by the time budget)" if stopped else "")
        if not b.cpu:
            def verdict(n):
                return "fits" if good >= n else "does NOT fit" if bad is not None and bad <= n else "untested"

            result += (f"; the recipe's micro-step, {micro} sequences over all GPUs: {micro // 8} per GPU on 8 GPUs "
                       f"{verdict(micro // 8)}, {micro} on 1 GPU {verdict(micro)} (one unsharded GPU: FSDP2 on 8 "
                       "shards the weights and AdamW state, so this is conservative)")
        rows.add("micro-batch", name, "ok" if good else "skipped" if stopped else "FAIL", result,
                 "trail " + ", ".join(trail) + ("" if b.cpu else "; one forward + backward + AdamW step per size "
                                                "(fp32 master weights, bf16 autocast), peak = max allocated"),
                 seconds=time.perf_counter() - t0, largest=good, first_oom=bad, peaks_gib=peaks)
        module = optimizer = None  # free before the next row (the closure above holds them)
        b.free()


# ---- profile ------------------------------------------------------------------------------------
ATTN_KERNEL_WORDS = ("fmha", "flash", "attention", "attn", "sdpa")


@contextlib.contextmanager
def instrumented():
    """record_function ranges around the functions whose share we report (restored after)."""
    import torch
    import transformers.models.blt.modeling_blt as mb
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def wrap(label, fn):
        def inner(*a, **k):
            with torch.profiler.record_function(label):
                return fn(*a, **k)

        inner.__wrapped__ = fn
        return inner

    saved = []
    for fname in ("create_causal_mask", "create_sliding_window_causal_mask", "_prepare_patch_cross_attention_mask"):
        saved.append((mb, fname, getattr(mb, fname)))
        setattr(mb, fname, wrap("gpu_check/mask", getattr(mb, fname)))
    for cls, label in ((mb.BltPatcher, "gpu_check/entropy_model"), (mb.BltGlobalTransformer, "gpu_check/global"),
                       (mb.BltLocalEncoder, "gpu_check/local_encoder"), (mb.BltLocalDecoder, "gpu_check/local_decoder")):
        saved.append((cls, "forward", cls.forward))
        cls.forward = wrap(label, cls.forward)
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    for key in list(ALL_ATTENTION_FUNCTIONS.keys()):
        if key in ("sdpa", "eager") or key.startswith("byteify"):
            ALL_ATTENTION_FUNCTIONS[key] = wrap("gpu_check/attention", ALL_ATTENTION_FUNCTIONS[key])
    try:
        yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(local)


def profile_step(b: Bench, rows: Rows, attention: str | None) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    attn = attention or "sdpa (stock)"
    tag = f"[{attn}, ckpt on]"
    with rows.guard("profile", f"one step {tag}"):
        t0 = time.perf_counter()
        b.free()
        module, optimizer = b.build(ckpt=True, compile_=False, attention=attention)
        ids, labels = b.batch_of(b.batch)
        patcher = b.patcher(module, ids)
        b.step(module, optimizer, ids, labels, patcher)  # warm-up
        b.sync()
        acts = [ProfilerActivity.CPU] + ([] if b.cpu else [ProfilerActivity.CUDA])
        with instrumented(), profile(activities=acts) as prof:
            t1 = time.perf_counter()
            with record_function("gpu_check/step"):
                b.step(module, optimizer, ids, labels, patcher)
            b.sync()
            wall = time.perf_counter() - t1
        events = prof.events()
        if b.cpu:  # CPU: self CPU time of the operators stands in for kernels
            kernels = [(e.name, e.self_cpu_time_total) for e in events
                       if not getattr(e, "is_user_annotation", False) and not e.name.startswith("gpu_check/")]
            inclusive = "cpu_time_total"
            unit = "CPU ops (self CPU time)"
        else:
            kernels = [(e.name, e.time_range.elapsed_us()) for e in events
                       if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                       and not e.name.startswith(("gpu_check/", "ProfilerStep"))]
            inclusive = "device_time_total"
            unit = "GPU kernels"
        total = sum(t for _, t in kernels) or 1.0
        by_name: dict[str, float] = {}
        for n, t in kernels:
            by_name[n] = by_name.get(n, 0.0) + t
        top = sorted(by_name.items(), key=lambda x: -x[1])[:6]

        def ranged(label: str) -> tuple[float, float]:
            """(kernel time, CPU time) in us under the outermost ranges of ``label`` (a mask built
            inside the entropy model's range counts for both labels, once for each)."""
            evs = [e for e in events if e.name == label and e.device_type == DeviceType.CPU]
            ids_ = {id(e) for e in evs}
            outer = [e for e in evs if not _has_ancestor(e, ids_)]
            return sum(getattr(e, inclusive) for e in outer), sum(e.cpu_time_total for e in outer)

        labels_ = ("mask", "entropy_model", "attention", "global", "local_encoder", "local_decoder")
        spans = {lab: ranged(f"gpu_check/{lab}") for lab in labels_}
        shares = {lab: spans[lab][0] / total for lab in labels_}
        cpu_ms = {lab: spans[lab][1] / 1e3 for lab in labels_}
        by_kernel_name = sum(t for n, t in kernels if any(w in n.lower() for w in ATTN_KERNEL_WORDS)) / total
        (Path(b.args.out) / f"profile_{(attention or 'sdpa').replace('/', '_')}.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total" if b.cpu else "self_device_time_total",
                                      row_limit=60, max_name_column_width=90))
        busy = total / 1e6 / wall
        rows.add("profile", f"top {unit} {tag}", "ok",
                 "; ".join(f"{_short(n)} {100 * t / total:.1f}%" for n, t in top),
                 f"step {wall:.2f} s wall, B={b.batch} x {b.seq} B; {unit} {total / 1e6:.2f} s"
                 + ("" if b.cpu else f" ({100 * busy:.0f}% busy)") + f"; full table: profile_{attention or 'sdpa'}.txt",
                 seconds=time.perf_counter() - t0, top=top, total_us=total, wall_s=wall)
        rows.add("profile", f"attention {tag}", "ok",
                 f"{100 * by_kernel_name:.1f}% in attention-named kernels (fwd+bwd); "
                 f"{100 * shares['attention']:.1f}% under the attention functions",
                 "kernel names matching " + "/".join(ATTN_KERNEL_WORDS) + "; the functions' ranges cover forward "
                 "and checkpoint recompute, not their backward", shares=shares, by_kernel_name=by_kernel_name)
        host = "" if b.cpu else "; host (CPU) time {:.0f} ms of the step's {:.0f} ms wall"
        rows.add("profile", f"mask building {tag}", "ok",
                 f"{100 * shares['mask']:.1f}% of {unit}" + host.format(cpu_ms["mask"], 1e3 * wall),
                 "create_causal_mask, create_sliding_window_causal_mask, _prepare_patch_cross_attention_mask "
                 "(model + entropy model)", cpu_ms=cpu_ms["mask"])
        rows.add("profile", f"entropy patcher {tag}", "ok",
                 f"{100 * shares['entropy_model']:.1f}% of {unit}" + host.format(cpu_ms["entropy_model"], 1e3 * wall),
                 "BltPatcher forward (frozen, fp32, 8 rows at a time), its masks included",
                 cpu_ms=cpu_ms["entropy_model"])
        rows.add("profile", f"parts {tag}", "ok",
                 ", ".join(f"{k} {100 * shares[k]:.1f}%" for k in ("global", "local_encoder", "local_decoder")),
                 "forward ranges (checkpoint recompute runs layers outside them); the rest is backward, "
                 "embeddings, loss and AdamW")
        del module, optimizer, prof
        b.free()


def _has_ancestor(e, ids_) -> bool:
    p = getattr(e, "cpu_parent", None)
    while p is not None:
        if id(p) in ids_:
            return True
        p = getattr(p, "cpu_parent", None)
    return False


def _short(name: str, n: int = 56) -> str:
    """A kernel or operator name cut in the middle (templated kernel names run to hundreds of characters)."""
    name = " ".join(name.split())
    return name if len(name) <= n else name[: n - 18] + "..." + name[-15:]


def bench_child(args, rows: Rows, clock: Clock) -> None:
    import torch

    torch.manual_seed(0)
    b = Bench(args, rows, clock)
    try:
        from byteify.attention import MEMORY_EFFICIENT
    except ImportError:
        MEMORY_EFFICIENT = None
    rows.add("environment", "attention", "ok",
             f"stock sdpa + {MEMORY_EFFICIENT} (byteify/attention.py)" if MEMORY_EFFICIENT else "stock attention only",
             "rows below with each" if MEMORY_EFFICIENT else "byteify.attention is absent: stock sdpa rows only")
    cpu = args.cpu
    # (section, check, minimum seconds it needs, what runs); the micro-batch search takes what is
    # left within --search-s; a task without its minimum left becomes a 'skipped' row
    eager, compiled, search = (5, 10, 5) if cpu else (25, 110, 45)
    me = MEMORY_EFFICIENT

    def tp(ckpt, comp, attn):
        return ("throughput", f"ckpt {'on' if ckpt else 'off'}, compile {'on' if comp else 'off'}, "
                f"{attn or 'sdpa (stock)'}", compiled if comp else eager, lambda: throughput_row(b, rows, ckpt, comp, attn))

    def mb(attn):
        later = eager if attn is not None else 0  # the last profile comes after the second search
        return ("micro-batch", f"largest micro-batch, ckpt on, {attn or 'sdpa (stock)'}", search,
                lambda: microbatch_search(b, rows, attn,
                                          budget_s=min(args.search_s, max(clock.left() - 10 - later, search))))

    def prof(attn):
        return ("profile", f"one step [{attn or 'sdpa (stock)'}, ckpt on]", eager, lambda: profile_step(b, rows, attn))

    # what the issue asks for first (stock attention: what the recipes run today), then the rows of
    # byteify's memory-efficient attention while time is left
    tasks = [("environment", "matmul ceiling", 5, lambda: matmul_ceiling(b, rows)),
             ("throughput", "model", eager, lambda: model_row(b, rows)),
             tp(False, False, None), tp(True, False, None), prof(None),
             tp(False, True, None), tp(True, True, None),
             ("throughput", TEACHER_CHECK, eager, lambda: teacher_row(b, rows)), mb(None)]
    if me:
        tasks += [tp(False, False, me), tp(True, False, me), mb(me), prof(me)]
    for section, check, need, fn in tasks:
        if clock.left() < need:
            rows.add(section, check, "skipped", f"{clock.left():.0f} s left, needs ~{need} s",
                     "the time budget ran out (--budget-s)")
            continue
        fn()


# ---- main ---------------------------------------------------------------------------------------
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI mode, about a minute)")
    ap.add_argument("--out", default="runs/gpu_check", help="directory for gpu_check.md/.json/.log and profiles")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole check (default 440 on GPU, 300 with --cpu)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a fresh temporary one)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU")
    ap.add_argument("--max-batch", type=int, default=256, help="micro-batch search cap (sequences)")
    ap.add_argument("--search-s", type=float, default=75.0, help="seconds per micro-batch search at most")
    ap.add_argument("--only", choices=("recipe", "bench"), default=None,
                    help="run only the recipe section, or only throughput + micro-batch + profile")
    ap.add_argument("--print-run", action="store_true", help="print the device tool's run arguments and exit")
    ap.add_argument("--child", choices=("recipe", "bench"), help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.print_run:
        print(json.dumps({"command": RUN_COMMAND, "carry": RUN_CARRY, "timeout_s": RUN_TIMEOUT_S}, indent=2))
        return 0
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.child:
        import signal

        signal.signal(signal.SIGTERM, _on_sigterm)
        rows = Rows(Path(args.rows))
        clock = Clock(args.deadline)
        try:
            (recipe_child if args.child == "recipe" else bench_child)(args, rows, clock)
        except Deadline:
            print("stopped at the deadline", flush=True)
        return 0

    t_start = time.time()
    budget = args.budget_s or (300.0 if args.cpu else 440.0)
    clock = Clock(t_start + budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.out = str(out.resolve())
    try:
        return checks(args, out, clock, t_start, budget)
    finally:
        if own_work:
            import shutil

            shutil.rmtree(args.work, ignore_errors=True)


def checks(args, out: Path, clock: Clock, t_start: float, budget: float) -> int:
    rows = Rows()
    mode = "CPU mode (--cpu, tiny shapes)" if args.cpu else "GPU"
    print(f"gpu_check: {mode}; budget {budget:.0f} s; work {args.work}; out {out}", flush=True)
    t0 = time.time()
    ok = environment(rows, args)
    timings = {"environment": time.time() - t0}
    if not ok:
        print("\n" + write_outputs(out, rows.rows, mode, time.time() - t_start, timings) + "\n", flush=True)
        print(rows.stop, flush=True)
        return 2
    with open(out / "gpu_check.log", "w") as log:
        if args.only in (None, "recipe"):
            recipe_s = min(120.0 if args.cpu else 170.0, max(clock.left() * 0.45, 30.0))
            if args.only:
                recipe_s = max(clock.left() - 5.0, 20.0)
            t0 = time.time()
            run_child("recipe", args, rows, clock, recipe_s, log)
            timings["recipe"] = time.time() - t0
        if args.only in (None, "bench"):
            t0 = time.time()
            run_child("bench", args, rows, clock, max(clock.left() - 5.0, 20.0), log)
            timings["throughput + micro-batch + profile"] = time.time() - t0
    table = write_outputs(out, rows.rows, mode, time.time() - t_start, timings)
    print("\n" + table, flush=True)
    return 1 if any(r["status"] == "FAIL" for r in rows.rows) else 0


def write_outputs(out: Path, rows: list[dict], mode: str, wall: float, timings: dict) -> str:
    header = (f"### byteify GPU check: {mode}, {wall:.0f} s wall "
              f"({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n")
    table = render_table(rows, header)
    (out / "gpu_check.md").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"mode": mode, "wall_s": round(wall, 1), "timings_s": timings,
                                                    "rows": rows}, indent=1, default=str) + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
