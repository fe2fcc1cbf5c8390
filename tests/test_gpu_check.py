"""scripts/gpu_check.py, the GPU check (item 7 of issue 11), in its CPU mode: the same code paths
on a tiny shape, so the script cannot rot between the sessions that have a GPU.  Also the stop
message for an image without byteify's pinned packages, and scripts/gpu_wheels.sh's syntax."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"

# the checks every CPU run must report, per section (throughput/micro-batch/profile rows for the
# memory-efficient attention come on top when byteify.attention exists)
EXPECTED = {
    "environment": ["versions", "device", "attention", "matmul ceiling"],
    "recipe": ["convert --preset tiny", "stop mid-way (run.stop_after=6)", "resume (--resume auto)",
               "FSDP2 in one process (run.fsdp.shard=always)", "FSDP2 losses = plain losses"],
    "throughput": ["model", "ckpt off, compile off, sdpa (stock)", "ckpt on, compile off, sdpa (stock)",
                   "ckpt off, compile on, sdpa (stock)", "ckpt on, compile on, sdpa (stock)",
                   "teacher_kl targets (bf16 teacher, head in chunks, byte trie on the device)"],
    "micro-batch": ["largest micro-batch, ckpt on, sdpa (stock)"],
    "profile": ["top CPU ops (self CPU time) [sdpa (stock), ckpt on]", "attention [sdpa (stock), ckpt on]",
                "mask building [sdpa (stock), ckpt on]", "entropy patcher [sdpa (stock), ckpt on]",
                "parts [sdpa (stock), ckpt on]"],
}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_mode_reports_every_section_without_failures(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path), env=env)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    failed = [r for r in rows if r["status"] not in ("ok", "info")]
    assert not failed, failed  # no FAIL and, in CPU mode, nothing skipped for lack of time
    checks = {(r["section"], r["check"]) for r in rows}
    for section, names in EXPECTED.items():
        for name in names:
            assert (section, name) in checks, (section, name, sorted(checks))
    if any(r["check"] == "attention" and "byteify_local" in r["result"] for r in rows):
        for section, name in [("throughput", "ckpt on, compile off, byteify_local"),
                              ("micro-batch", "largest micro-batch, ckpt on, byteify_local"),
                              ("profile", "mask building [byteify_local, ckpt on]")]:
            assert (section, name) in checks, (section, name)
    # numbers that must be there and sane
    by = {(r["section"], r["check"]): r for r in rows}
    tp = by[("throughput", "ckpt on, compile off, sdpa (stock)")]["data"]
    assert tp["bytes_per_s"] > 0 and tp["peak_gib"] > 0 and tp["batch"] == 2
    model = by[("throughput", "model")]["data"]
    assert 3.5 < model["bytes_per_patch"] < 5.5 and model["flops"]["train"] > 0
    diffs = by[("recipe", "FSDP2 losses = plain losses")]["data"]["diffs"]
    assert len(diffs) == 8 and max(diffs) <= 1e-4
    assert by[("micro-batch", "largest micro-batch, ckpt on, sdpa (stock)")]["data"]["largest"] == 2
    # the table: printed last, written to gpu_check.md, one line per row
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # + the header row
    assert "| section | check | status | result | s | notes |" in proc.stdout
    assert (out / "profile_sdpa.txt").exists()
    # what may come back from the device tool: at most 8 files, no sub-folders
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())


def test_missing_pins_stop_with_one_line_naming_the_wheel_script():
    gc = load_script()
    versions = {k: None for k in gc.DIST_NAMES}
    versions.update(torch="2.11.0+cu130", transformers="5.17.0", peft="0.18.0", safetensors="0.8.0",
                    pyyaml="6.0.2", numpy="2.5.2", tqdm="4.67.1", typer="0.20.0")
    problems = gc.version_problems(versions)
    assert "pydantic missing" in problems
    assert any(p.startswith("transformers 5.17.0") for p in problems)
    msg = gc.stop_message(problems)
    assert "\n" not in msg and "scripts/gpu_wheels.sh" in msg and "--target /tmp/site .whl/*.whl" in msg
    ok = dict(versions, transformers="5.24.0", pydantic="2.14.4")
    assert gc.version_problems(ok) == []


def test_analytic_flops_match_torch_flop_counter_on_the_linear_layers():
    """The MFU's FLOPs per byte: the linear part of the analytic count equals what
    torch.utils.flop_counter counts for one forward + backward (static patches, no checkpointing,
    no entropy model in the loop)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from byteify.patching.patchers import StaticPatcher
    from byteify.train.distributed import Dist
    from byteify.train.model import build_module
    from byteify.train.recipe import load_recipe

    gc = load_script()
    recipe, _ = load_recipe("llama-3.2-1b", ["model=x", "output_dir=y", "data.seq_len=256",
                                             "run.activation_checkpointing=false"])
    module = build_module(gc.bench_config(cpu=True), gc.bench_stage(recipe), Dist(), recipe.run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    ids = torch.randint(4, 260, (1, 256))
    patcher = StaticPatcher(4)
    lengths = patcher(ids)
    bpp = float(lengths.sum()) / float((lengths > 0).sum())
    with FlopCounterMode(display=False) as fc:
        loss = module(ids, ids, patcher=patcher).blt
        loss.backward()
    counted = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "mm" in str(op)) / 256
    analytic = 3 * gc.analytic_flops(module.blt, 256, bpp)["linear_fwd"]
    assert counted == pytest.approx(analytic, rel=0.01)


def test_wheel_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_wheels.sh")], check=True)
