"""Distributed runs under ``torchrun --nproc-per-node 2`` on CPU/gloo (standing in for NCCL):
multi-stage recipes (plain, LoRA, distillation) equal one process; an entropy-model stage and its
calibration give one process's threshold; checkpoints written by 2
processes resume in 1 and the other way round, at a stage boundary and mid-stage, with weights
*and* optimizer moments equal to the uninterrupted run; SIGTERM to one rank stops every rank at
the same step with one consistent checkpoint; a SIGKILL during a save leaves the previous
checkpoint the newest; FSDP2's units, mixed-precision policy and gradient-sync switching."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from byteify.train.recipe import load_recipe
from byteify.train.trainer import Trainer
from helpers import checkpoint_state, checkpoint_weights

ROOT = Path(__file__).resolve().parents[2]
TWO_STAGES = ("stages=[{name: a, train: [local_encoder, hash_embeddings, local_decoder], steps: 3, batch_bytes: 1024, "
              "lr: 3e-3, warmup_steps: 1}, {name: b, train: [local_encoder, hash_embeddings, local_decoder, global], "
              "lr_multipliers: {global: 0.1}, steps: 3, batch_bytes: 1024, lr: 3e-3, warmup_steps: 1, "
              "decoder_byte_dropout: 0.2}]")  # b's withheld bytes must not depend on world size or resume
COMMON = ("run.progress=false", "run.log_every=1", "run.eval_every=3", "run.save_every=100")


def overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={model}", f"output_dir={out}", *COMMON, *extra]


def one_process(model: Path, out: Path, *extra: str, resume=None) -> dict:
    recipe, raw = load_recipe("tiny-cpu", overrides(model, out, *extra))
    return Trainer(recipe, raw, resume=resume, log=lambda m: None).run()


def torchrun(model: Path, out: Path, *extra: str, resume: str | None = None, nproc: int = 2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(ROOT / "cli.py"),
           "train", "tiny-cpu", *overrides(model, out, *extra)] + (["--resume", resume] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def newest(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step-*"))[-1]


def assert_same_training_state(a: Path, b: Path):
    """Weights and AdamW moments of two checkpoints (written by any number of processes).
    Tolerances: weights within 1e-4 absolute (after a few AdamW steps at lr 3e-3, Adam's
    normalisation turns reduction-order noise on near-zero gradients into ~1e-5 differences);
    moments within 1e-4 of each tensor's largest value (measured: ~5e-6)."""
    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4, msg=k)
    sa, sb = checkpoint_state(a)["optimizer"]["state"], checkpoint_state(b)["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 10
    for k in sa:
        assert float(sa[k]["step"]) == float(sb[k]["step"]) > 0, k
        for m in ("exp_avg", "exp_avg_sq"):
            x, y = sa[k][m], sb[k][m]
            assert float(y.abs().max()) > 0, (k, m)  # restored moments, not a restart from zero
            assert float((x - y).abs().max()) <= 1e-4 * float(x.abs().max()), (k, m)


def test_two_stage_run_in_two_processes_equals_one_process(tiny_converted, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(tiny_converted, one, TWO_STAGES)
    torchrun(tiny_converted, two, TWO_STAGES)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s]["stage"] for s in a] == ["a"] * 3 + ["b"] * 3
    for s in a:  # fp32 on gloo: the reduction order is all that differs
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4, (s, a[s]["loss"], b[s]["loss"])
        if "val_bpb" in a[s]:
            assert abs(a[s]["val_bpb"] - b[s]["val_bpb"]) <= 1e-4
    assert_same_training_state(newest(one), newest(two))
    assert (newest(two) / "model" / "model.safetensors").exists()  # consolidated at the end of the stage


ENTROPY_STAGE = ("stages=[{name: e, train: [entropy_model], steps: 3, batch_bytes: 1024, lr: 3e-3, warmup_steps: 1}]",
                 "calibration={target_bytes_per_patch: 4.0, max_bytes: 2048}")


def test_entropy_model_stage_and_calibration_under_torchrun(tiny_converted, tmp_path):
    """The GPU recipes' first command (the entropy-model recipe's shape): trained in two
    processes, calibrated once by the main process, the same threshold as one process; the run
    then serves as the start of an entropy-patched stage, which a fresh conversion is refused: in
    two processes too, by every rank before anything is written (no rank left waiting)."""
    one, two = tmp_path / "one", tmp_path / "two"
    refused = torchrun(tiny_converted, tmp_path / "refused", "patching.mode=entropy", wait=False)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode != 0 and err.count("never trained and calibrated") >= 2, err[-3000:]
    assert not (tmp_path / "refused").exists()
    a = one_process(tiny_converted, one, *ENTROPY_STAGE)["calibration"]
    torchrun(tiny_converted, two, *ENTROPY_STAGE)
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    b = [r["calibration"] for r in rows if "calibration" in r]  # written once, by the main process
    assert len(b) == 1 and abs(a["threshold"] - b[0]["threshold"]) <= 1e-4, (a, b)
    meta = json.loads((newest(two) / "model" / "byteify.json").read_text())
    assert meta["calibration"]["threshold"] == pytest.approx(b[0]["threshold"])
    s = one_process(two, tmp_path / "next", "patching.mode=entropy", "stages.0.steps=1", "stages.0.warmup_steps=0")
    assert s["steps"] == 1


@pytest.mark.parametrize("chain", [
    # (processes, stop after) per invocation; a stop at 3 is the stage boundary, 2 and 4 are mid-stage
    ((2, 2), (1, 3), (2, None)),  # mid-stage 2 -> 1, boundary 1 -> 2
    ((1, 2), (2, 3), (1, 4), (2, None)),  # mid-stage 1 -> 2, boundary 2 -> 1, mid-stage 1 -> 2
])
def test_resume_in_another_world_size_reproduces_weights_and_moments(tiny_converted, tmp_path, chain):
    ref, out = tmp_path / "ref", tmp_path / "run"
    one_process(tiny_converted, ref, TWO_STAGES)
    for i, (nproc, stop) in enumerate(chain):
        extra = (TWO_STAGES,) + ((f"run.stop_after={stop}",) if stop else ())
        resume = "auto" if i else None
        if nproc == 1:
            one_process(tiny_converted, out, *extra, resume=resume)
        else:
            torchrun(tiny_converted, out, *extra, resume=resume)
        if stop:
            assert json.loads((newest(out) / "trainer.json").read_text())["world_size"] == nproc
    a, b = losses(ref), losses(out)
    assert sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4, (s, a[s]["loss"], b[s]["loss"])
    assert_same_training_state(newest(ref), newest(out))


def test_lora_and_distill_stages_under_torchrun(tmp_path):
    """distill -> LoRA -> plain with teacher_kl, patch_norm and decoder_byte_dropout in 2 processes
    equals 1 process (the model is re-sharded at every stage; the teachers are sharded too; the
    withheld bytes are a function of the data, not of the process)."""
    from helpers import tiny_source_and_blt

    _, blt = tiny_source_and_blt(tmp_path / "m", layers=2, seed=3)
    stages = ("data.seq_len=64", "stages=[{name: d, train: [local_encoder, hash_embeddings, local_decoder], "
              "distill: {encoder_layers: 1}, steps: 2, batch_bytes: 256, lr: 3e-3}, "
              "{name: l, train: [local_decoder], lora: {rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}, "
              "steps: 2, batch_bytes: 256, lr: 1e-2}, {name: p, train: [local_encoder, global, local_decoder], "
              "teacher_kl: {teacher_dtype: fp32}, patch_norm: {max_norm: 0.1}, decoder_byte_dropout: 0.5, steps: 2, "
              "batch_bytes: 256}]")
    one_process(blt, tmp_path / "one", *stages)
    torchrun(blt, tmp_path / "two", *stages)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [a[s]["stage"] for s in sorted(a)] == ["d", "d", "l", "l", "p", "p"] and sorted(a) == sorted(b)
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4, (s, a[s]["loss"], b[s]["loss"])
    for key in ("teacher_kl", "patch_norm_penalty"):
        assert a[5][key] > 0 and abs(a[5][key] - b[5][key]) <= 1e-5 * a[5][key], (key, a[5][key], b[5][key])
    assert_same_training_state(newest(tmp_path / "one"), newest(tmp_path / "two"))


def test_keep_warm_start_in_two_processes_resumed_in_one(tmp_path):
    """keep_warm_start on FSDP2 shards (the encoder's fixed rows split between the ranks): 2
    processes stopped mid-stage and resumed in 1 equal one uninterrupted process, and the
    written entries are still as converted."""
    from helpers import tiny_warm_blt

    blt = tiny_warm_blt(tmp_path / "m", free_dims=8)  # rows 0-23 of 32 fixed: rank 0 holds 0-15, rank 1 16-31
    stage = ("data.seq_len=64", "stages=[{name: w, train: [local_encoder, hash_embeddings, local_decoder, global], "
             "keep_warm_start: true, steps: 4, batch_bytes: 256, lr: 1e-2, weight_decay: 0.1}]")
    one_process(blt, tmp_path / "ref", *stage)
    torchrun(blt, tmp_path / "run", *stage, "run.stop_after=2")
    one_process(blt, tmp_path / "run", *stage, resume="auto")
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4, (s, a[s]["loss"], b[s]["loss"])
    assert_same_training_state(newest(tmp_path / "ref"), newest(tmp_path / "run"))
    before, after = checkpoint_weights(blt), checkpoint_weights(newest(tmp_path / "run"))
    name = "model.local_encoder.layers.0.mlp.down_proj.weight"
    assert torch.equal(after[name][:24], torch.zeros_like(after[name][:24])) and after[name][24:].abs().max() > 0
    assert torch.equal(after["model.encoder_hash_tok_embedding.weight"][:, :24],
                       before["model.encoder_hash_tok_embedding.weight"][:, :24])


def test_gpu_recipe_shape_in_two_processes_resumed_in_one(tmp_path):
    """The shipped GPU recipes' shape: a local stage then an end-to-end stage (global at 0.1x),
    both with keep_warm_start and teacher_kl (one teacher shared by the stages, its head in
    chunks under FSDP2), on a warm-start conversion; 2 processes stopped inside the second stage
    and resumed in 1 equal one uninterrupted process (fp32 teacher: exact comparison)."""
    from helpers import tiny_warm_blt

    blt = tiny_warm_blt(tmp_path / "m", free_dims=8)
    both = "keep_warm_start: true, teacher_kl: {teacher_dtype: fp32}, steps: 2, batch_bytes: 256, lr: 1e-2"
    stages = ("data.seq_len=64", f"stages=[{{name: local, train: [local_encoder, hash_embeddings, local_decoder], {both}}}, "
              f"{{name: e2e, train: [local_encoder, hash_embeddings, local_decoder, global], "
              f"lr_multipliers: {{global: 0.1}}, {both}}}]")
    one_process(blt, tmp_path / "ref", *stages)
    torchrun(blt, tmp_path / "run", *stages, "run.stop_after=3")
    one_process(blt, tmp_path / "run", *stages, resume="auto")
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and [a[s]["stage"] for s in sorted(a)] == ["local"] * 2 + ["e2e"] * 2
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-4, (s, a[s]["loss"], b[s]["loss"])
        assert a[s]["teacher_kl"] > 0 and abs(a[s]["teacher_kl"] - b[s]["teacher_kl"]) <= 1e-4 * a[s]["teacher_kl"]
    assert_same_training_state(newest(tmp_path / "ref"), newest(tmp_path / "run"))


def test_bf16_teacher_sharded_under_torchrun_gives_the_same_targets(tmp_path):
    """The default bf16 teacher, sharded over 2 processes (computing in bf16 under FSDP2's
    policy), gives one process's teacher KL on the same step within bf16 noise."""
    from helpers import tiny_source_and_blt

    _, blt = tiny_source_and_blt(tmp_path / "m", layers=2, seed=3)
    stage = ("data.seq_len=64", "stages=[{name: k, train: [local_decoder], teacher_kl: {}, steps: 1, batch_bytes: 256}]")
    one_process(blt, tmp_path / "one", *stage)
    torchrun(blt, tmp_path / "two", *stage)
    a, b = losses(tmp_path / "one")[1], losses(tmp_path / "two")[1]
    assert abs(a["loss"] - b["loss"]) <= 1e-4
    assert a["teacher_kl"] > 0 and abs(a["teacher_kl"] - b["teacher_kl"]) <= 1e-2 * a["teacher_kl"]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().split(")")[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_sigterm_to_one_rank_stops_all_ranks_with_one_checkpoint(tiny_converted, tmp_path):
    out = tmp_path / "r"
    proc = torchrun(tiny_converted, out, "stages.0.steps=100000", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    workers = sorted(_children(proc.pid))
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # one rank only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and err.count("interrupted: checkpoint saved") == 2, err[-3000:]
    assert "exitcode: 130" in err  # torchrun reports the ranks' exit code
    ckpts = [p for p in (out / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step-"), ckpts
    state = json.loads((ckpts[0] / "trainer.json").read_text())
    data = json.loads((ckpts[0] / "data.json").read_text())
    assert state["world_size"] == 2 and sorted(data["lanes"]) == [str(i) for i in range(8)]  # both ranks' lanes
    one_process(tiny_converted, out, f"stages.0.steps={state['global_step'] + 1}", resume="auto")
    assert max(losses(out)) == state["global_step"] + 1


KILL_ON_SECOND_SAVE = """
import os, signal, sys
import byteify.train.checkpoints as ck
real, calls = ck.finish, []
def finish(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # the shards of the second checkpoint are written; it is not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
ck.finish = finish
from byteify.cli import app
sys.argv[0] = "byteify"
app()
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tiny_converted, tmp_path):
    out, script = tmp_path / "r", tmp_path / "kill_in_save.py"
    script.write_text(KILL_ON_SECOND_SAVE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), "train", "tiny-cpu",
           *overrides(tiny_converted, out, "stages.0.steps=6", "run.save_every=2", "run.keep_last=1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode != 0
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert (out / "checkpoints" / ".step-00000004.tmp" / "sharded").is_dir()  # the half-written one, hidden
    one_process(tiny_converted, out, "stages.0.steps=6", "run.save_every=2", "run.keep_last=1", resume="auto")
    assert sorted(losses(out))[-1] == 6 and newest(out).name == "step-00000006"
    assert not (out / "checkpoints" / ".step-00000004.tmp").exists()  # cleared by the next save of step 4


PROBE = """
import json, os, torch
from byteify.train.distributed import setup_distributed, set_gradient_sync
from byteify.train.model import build_module
from byteify.train.recipe import load_recipe
import sys
recipe, _ = load_recipe("tiny-cpu", [f"model={sys.argv[1]}", "output_dir=/tmp/unused", "run.fsdp.param_dtype=bf16"])
dist = setup_distributed("cpu")
from transformers import AutoConfig
module = build_module(AutoConfig.from_pretrained(sys.argv[1]), recipe.stages[0], dist, recipe.run)
units = {n or "<root>": m for n, m in module.named_modules() if hasattr(m, "_get_fsdp_state")}
policies = {n: [str(getattr(m._get_fsdp_state()._mp_policy, k)) for k in ("param_dtype", "reduce_dtype")] for n, m in units.items()}
recipe32, _ = load_recipe("tiny-cpu", [f"model={sys.argv[1]}", "output_dir=/tmp/unused"])
module32 = build_module(AutoConfig.from_pretrained(sys.argv[1]), recipe32.stages[0], dist, recipe32.run)
with torch.no_grad():
    for p in module32.parameters():
        p.to_local().normal_(0, 0.02)
ids = torch.randint(4, 260, (1, 32))
from byteify.patching.patchers import StaticPatcher
grads = []
for last in (False, True):
    set_gradient_sync(module32, last)
    blt = module32(ids, ids, patcher=StaticPatcher(4)).blt
    blt.backward()
    grads.append(sum(p.grad is not None for p in module32.parameters() if p.requires_grad))
if dist.main:
    print("PROBE" + json.dumps({"units": sorted(units), "policies": policies, "grads": grads,
                                "trainable": sum(p.requires_grad for p in module32.parameters())}))
dist.barrier()  # both ranks past their last collective before either tears gloo down
# Drop every holder of the process group (the FSDP states, the graph of the last loss) while the
# interpreter is whole: left to interpreter finalization, gloo aborted the process ("terminate
# called without an active exception", no Python frame) in ~3 of 40 runs on a loaded machine.
del module, module32, units, blt
import gc; gc.collect()
dist.close()
"""


def test_fsdp2_units_mixed_precision_and_gradient_sync(tiny_converted, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                           str(tiny_converted)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("PROBE", 1)[1].splitlines()[0])
    units = set(got["units"])
    assert {"<root>", "model.model.encoder_hash_tok_embedding", "model.model.patcher",
            "model.model.global_transformer.layers.0", "model.model.local_encoder.layers.0",
            "model.model.local_decoder.layers.1", "model.model.patcher.layers.1"} <= units
    assert all(p == ["torch.bfloat16", "torch.float32"] for p in got["policies"].values()), got["policies"]
    assert got["grads"] == [0, got["trainable"]]  # no reduce-scatter until the last micro-step


def test_fsdp2_in_one_process_equals_the_plain_run(tiny_converted, tmp_path):
    """run.fsdp.shard=always: the sharded path (FSDP2, DCP) in one process, as on one GPU."""
    one_process(tiny_converted, tmp_path / "plain", "stages.0.steps=3")
    one_process(tiny_converted, tmp_path / "fsdp", "stages.0.steps=3", "run.fsdp.shard=always")
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "fsdp")
    assert all(abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 for s in a)
    assert_same_training_state(newest(tmp_path / "plain"), newest(tmp_path / "fsdp"))
