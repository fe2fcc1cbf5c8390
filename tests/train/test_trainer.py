"""byteify train: losses fall, freezing is bit-exact, per-part learning rates, LoRA through peft,
exact resume, NaN handling, SIGTERM, checkpoints that load with plain transformers (runs in
several processes: test_distributed.py)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.gpu_plan import WITHOUT_WARM_START
from byteify.errors import ByteifyError
from byteify.parts import part_of
from byteify.train.recipe import load_recipe
from byteify.train.trainer import Trainer
from helpers import checkpoint_state, checkpoint_weights

ROOT = Path(__file__).resolve().parents[2]


def run(tiny_converted: Path, out: Path, *overrides: str, resume=None) -> dict:
    recipe, raw = load_recipe("tiny-cpu", [f"model={tiny_converted}", f"output_dir={out}", "run.progress=false",
                                           "run.log_every=1", *overrides])
    return Trainer(recipe, raw, resume=resume, log=lambda m: None).run()


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return checkpoint_weights(ckpt)


def initial_weights(tiny_converted: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_converted / "model.safetensors"))


def interrupted_and_resumed(model, tmp_path, steps: int, *extra: str):
    """Run ``steps`` steps straight and, separately, stopped at half and resumed: the losses of
    every step agree within 1e-6 and the final weights exactly.  Returns (full, part) run dirs."""
    full, part = tmp_path / "full", tmp_path / "part"
    stage = (*extra, f"stages.0.steps={steps}", "run.save_every=100")
    run(model, full, *stage)
    s = run(model, part, *stage, f"run.stop_after={steps // 2}")
    assert s["stopped_early"] and s["steps"] == s["steps_run"] == steps // 2
    s = run(model, part, *stage, resume="auto")
    assert s["steps"] == steps and s["steps_run"] == steps - steps // 2  # wall_seconds covers this process only
    a, b = metrics(full), metrics(part)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6
    last = f"step-{steps:08d}"
    wa, wb = weights(full / "checkpoints" / last), weights(part / "checkpoints" / last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    return full, part


def test_loss_falls_on_real_text(tiny_converted, tmp_path):
    summary = run(tiny_converted, tmp_path / "r")
    m = metrics(tmp_path / "r")
    first, last = m[1]["loss"], m[20]["loss"]
    assert last < first - 1.0, (first, last)  # nats per byte: ~5.6 at init
    assert m[20]["val_bpb"] < m[10]["val_bpb"]
    assert summary["bytes_seen"] == 20 * 1024 and summary["steps"] == 20
    # the checkpoint is a model directory that plain transformers loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(summary["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"))
    tok = AutoTokenizer.from_pretrained(str(ckpt / "model"))
    ids = torch.tensor([tok("The if statement").input_ids])
    assert torch.isfinite(model(ids, labels=ids).loss)
    assert (tmp_path / "r" / "recipe.yaml").exists()


def test_frozen_parts_are_bit_exact_and_have_no_optimizer_state(tiny_converted, tmp_path):
    out = tmp_path / "r"
    run(tiny_converted, out, "stages.0.train=[local_decoder]", "stages.0.steps=4", "run.save_every=4")
    ckpt = out / "checkpoints" / "step-00000004"
    before, after = initial_weights(tiny_converted), weights(ckpt)
    changed = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"local_decoder"}
    state = checkpoint_state(ckpt)["optimizer"]
    n_state = len(state["state"])
    n_trainable = sum(1 for k in before if part_of(k) == "local_decoder")
    assert n_state == n_trainable
    assert {g["part"] for g in state["param_groups"]} == {"local_decoder"}


def test_per_part_learning_rates(tiny_converted, tmp_path):
    out = tmp_path / "r"
    run(tiny_converted, out, "stages.0.steps=3", "stages.0.lr_multipliers={global: 0.0, local_encoder: 0.5}",
        "stages.0.warmup_steps=0", "stages.0.schedule=constant")
    ckpt = out / "checkpoints" / "step-00000003"
    state = checkpoint_state(ckpt)["optimizer"]
    lrs = {g["part"]: g["lr"] for g in state["param_groups"]}
    assert lrs["global"] == 0.0 and lrs["local_encoder"] == pytest.approx(1.5e-3) and lrs["local_decoder"] == pytest.approx(3e-3)
    before, after = initial_weights(tiny_converted), weights(ckpt)
    assert all(torch.equal(before[k], after[k]) for k in before if part_of(k) == "global")
    assert any(not torch.equal(before[k], after[k]) for k in before if part_of(k) == "local_encoder")


def test_lora_trains_only_adapters_and_merges_to_base_plus_delta(tiny_converted, tmp_path):
    out = tmp_path / "r"
    run(tiny_converted, out, "stages.0.train=[]", "stages.0.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "stages.0.steps=3", "stages.0.lr=1e-2")
    ckpt = out / "checkpoints" / "step-00000003"
    before, after = initial_weights(tiny_converted), weights(ckpt)
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights must stay frozen under LoRA"
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and "global_transformer" in k for k in adapter)
    # merged = base + B @ A * alpha / r, through peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"))
    merged = PeftModel.from_pretrained(base, str(ckpt / "adapter")).merge_and_unload()
    name = "model.global_transformer.layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if name in k and "lora_A" in k)
    b = next(v for k, v in adapter.items() if name in k and "lora_B" in k)
    assert b.abs().max() > 0, "adapter B must have trained away from zero"
    expected = before[name + ".weight"] + (b @ a) * (8 / 4)
    torch.testing.assert_close(merged.state_dict()[name + ".weight"], expected, rtol=0, atol=1e-6)


LORA = "stages.0.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}"


def test_resume_inside_a_lora_stage_continues_exactly(tiny_converted, tmp_path):
    # issue 10 bug 1: peft's from_pretrained left the stage's 'train' parts frozen, so the
    # optimizer had fewer groups than the saved state and resuming raised
    full, part = interrupted_and_resumed(tiny_converted, tmp_path, 6, "stages.0.train=[local_decoder]", LORA)
    aa = load_file(str(full / "checkpoints" / "step-00000006" / "adapter" / "adapter_model.safetensors"))
    ab = load_file(str(part / "checkpoints" / "step-00000006" / "adapter" / "adapter_model.safetensors"))
    assert aa.keys() == ab.keys() and all(torch.equal(aa[k], ab[k]) for k in aa)


def test_global_lr_multiplier_applies_to_the_lora_adapter(tiny_converted, tmp_path):
    # issue 10 bug 6: lr_multipliers.global was silently ignored in a LoRA stage
    out = tmp_path / "r"
    run(tiny_converted, out, "stages.0.train=[local_decoder]", LORA, "stages.0.steps=1", "stages.0.warmup_steps=0",
        "stages.0.schedule=constant", "stages.0.lr_multipliers={global: 0.25}")
    state = checkpoint_state(out / "checkpoints" / "step-00000001")["optimizer"]
    lrs = {g["part"]: g["lr"] for g in state["param_groups"]}
    assert lrs["global"] == pytest.approx(0.25 * 3e-3) and lrs["local_decoder"] == pytest.approx(3e-3)


def test_dry_run_of_a_lora_stage(tiny_converted, tmp_path):
    # issue 10 bug 3: --dry-run of any recipe with a LoRA stage raised KeyError: 'global'
    from typer.testing import CliRunner

    import byteify.cli as cli

    res = CliRunner().invoke(cli.app, ["train", "tiny-cpu", f"model={tiny_converted}", f"output_dir={tmp_path / 'r'}",
                                       "stages.0.train=[]", LORA, "--dry-run"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.strip().startswith("global"))
    assert line.split()[-1] == f"{3e-3 * 0.1:.2e}"  # the recipe's global multiplier, on the adapter
    assert "LoRA r=4" in res.output


def test_resume_gives_identical_losses_and_weights(tiny_converted, tmp_path):
    interrupted_and_resumed(tiny_converted, tmp_path, 8)


def test_multi_stage_continues_from_previous_stage(tiny_converted, tmp_path):
    out = tmp_path / "r"
    run(tiny_converted, out, "stages=[{name: a, train: [local_decoder], steps: 2, batch_bytes: 1024}, "
        "{name: b, train: [global], steps: 2, batch_bytes: 1024}]")
    m = metrics(out)
    assert [m[s]["stage"] for s in (1, 2, 3, 4)] == ["a", "a", "b", "b"]
    before, after = initial_weights(tiny_converted), weights(out / "checkpoints" / "step-00000004")
    changed = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"local_decoder", "global"}


def test_non_finite_loss_stops_with_clear_error_and_keeps_last_checkpoint(tiny_converted, tmp_path, monkeypatch):
    from byteify.train import model as training

    real = training.TrainModule.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        return out._replace(blt=out.blt * float("nan")) if calls["n"] > 3 and self.training else out

    monkeypatch.setattr(training.TrainModule, "forward", poisoned)
    out = tmp_path / "r"
    with pytest.raises(ByteifyError, match=r"non-finite loss .* step 4 .*step-00000002"):
        run(tiny_converted, out, "run.save_every=2", "run.eval_every=100")
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env, **kw)


def test_sigterm_saves_checkpoint_and_exits_130(tiny_converted, tmp_path):
    out = tmp_path / "r"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", "tiny-cpu", f"model={tiny_converted}",
                             f"output_dir={out}", "stages.0.steps=100000", "run.log_every=1", "run.save_every=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpts = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(ckpts) == 1 and "--resume auto" in err
    state = json.loads((ckpts[0] / "trainer.json").read_text())
    assert 1 <= state["global_step"] < 100000


@pytest.mark.parametrize("name,warm,overrides", [
    ("tiny-cpu", False, []), ("smollm2-135m", True, []), ("entropy-model", False, []),
    ("llama-3.2-1b", True, []), ("llama-3.1-8b", True, []),  # as shipped: warm start kept, teacher_kl
    ("llama-3.2-1b", False, WITHOUT_WARM_START), ("llama-3.1-8b", False, WITHOUT_WARM_START)])  # the headers' alternative
def test_every_shipped_recipe_passes_dry_run(tiny_converted, tiny_warm, name, warm, overrides, tmp_path):
    """Each shipped recipe on the conversion its header names (``warm``: the vocabulary warm start
    with free coordinates, which keep_warm_start needs), after the entropy-model run the headers
    start from (a calibration record: the dry run refuses entropy patches nobody calibrated)."""
    from typer.testing import CliRunner

    import byteify.cli as cli
    from byteify.modelfiles import read_json, write_json

    model = tmp_path / "entropy-run"
    shutil.copytree(tiny_warm if warm else tiny_converted, model)
    meta = read_json(model / "byteify.json")
    write_json(model / "byteify.json", {**meta, "calibration": {"threshold": 2.0, "monotonic": False, "target_bytes_per_patch": 4.0}})
    res = CliRunner().invoke(cli.app, ["train", name, f"model={model}", f"output_dir={tmp_path / 'r'}", *overrides, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "trainable" in res.output and "per-GPU estimate" in res.output
    assert not (tmp_path / "r").exists()


def test_a_recipe_that_keeps_the_warm_start_refuses_a_model_without_one(tiny_converted, tmp_path):
    """The shipped smollm2-135m recipe (keep_warm_start) on a conversion without the warm start:
    the dry run and the run itself stop with exit code 2 and name the stage and the fix, writing nothing."""
    from typer.testing import CliRunner

    import byteify.cli as cli

    for extra in (["--dry-run"], []):
        res = CliRunner().invoke(cli.app, ["train", "smollm2-135m", f"model={tiny_converted}",
                                           f"output_dir={tmp_path / 'r'}", *extra])
        assert res.exit_code == 2, res.output
        assert "stage 'end-to-end': keep_warm_start needs a model converted with the vocabulary warm start " \
               "(byteify convert --preset warm-kept)" in res.output
        assert not (tmp_path / "r").exists()


def test_activation_checkpointing_recomputes_and_gives_the_same_losses(tiny_converted, tmp_path, monkeypatch):
    from byteify.train import model as train_model

    real, calls = train_model.TrainModule.forward, []

    def counting(self, *a, **k):  # calls inside the first global layer's forward, gradients on
        layer = self.blt.model.global_transformer.layers[0].mlp  # (transformers checkpoints forward, not hooks)
        if not getattr(layer, "_counted", False):
            layer._counted = True
            layer.register_forward_pre_hook(lambda *_: calls.append(1) if torch.is_grad_enabled() else None)
        return real(self, *a, **k)

    monkeypatch.setattr(train_model.TrainModule, "forward", counting)
    run(tiny_converted, tmp_path / "a", "stages.0.steps=3")
    plain = len(calls)
    calls.clear()
    run(tiny_converted, tmp_path / "b", "stages.0.steps=3", "run.activation_checkpointing=true")
    assert plain == 3 and len(calls) == 6  # checkpointing is on: each layer runs again in backward
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for s in (1, 2, 3):
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5


def test_memory_efficient_attention_trains_like_stock(tiny_converted, tmp_path):
    run(tiny_converted, tmp_path / "a", "stages.0.steps=3")
    run(tiny_converted, tmp_path / "b", "stages.0.steps=3", "run.attention=byteify_local")
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for s in (1, 2, 3):
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5
    assert abs(a[3]["val_bpb"] - b[3]["val_bpb"]) <= 1e-5


def test_tensorboard_without_the_package_is_a_clear_error(tiny_converted, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ByteifyError, match="tensorboard"):
        run(tiny_converted, tmp_path / "r", "stages.0.steps=1", "stages.0.warmup_steps=0", "run.tensorboard=true")


def test_frozen_hash_tables_without_warm_start_get_a_note(tiny_converted, tmp_path):
    def logged(model: Path, out: Path) -> list[str]:
        lines = []
        recipe, raw = load_recipe("tiny-cpu", [f"model={model}", f"output_dir={out}", "run.progress=false",
                                               "stages.0.steps=1", "stages.0.warmup_steps=0",
                                               "stages.0.train=[local_encoder, local_decoder]"])
        Trainer(recipe, raw, log=lines.append).run()
        return [x for x in lines if "hash tables frozen" in x]

    assert len(logged(tiny_converted, tmp_path / "a")) == 1  # random tables that never train: said once
    warm = tmp_path / "warm"
    shutil.copytree(tiny_converted, warm)
    meta = json.loads((warm / "byteify.json").read_text())
    (warm / "byteify.json").write_text(json.dumps({**meta, "vocab_warm_start": {"entries": 1}}))
    assert logged(warm, tmp_path / "b") == []  # written tables: frozen on purpose


def test_split_seed_keeps_the_held_out_text_across_run_seeds(tiny_converted, tmp_path):
    """``data.split_seed`` fixes which documents are validation text, whatever the run's seed:
    a seed sweep is scored on, and never trains on, the same held-out text."""
    from types import SimpleNamespace

    def validation(*overrides):
        recipe, raw = load_recipe("tiny-cpu", [f"model={tiny_converted}", f"output_dir={tmp_path / 'r'}", *overrides])
        trainer = Trainer(recipe, raw, log=lambda m: None)
        trainer.dist = SimpleNamespace(world=1)
        rows, holdout = trainer._validation()
        return torch.as_tensor(rows), holdout

    rows0, split0 = validation("seed=0")
    rows1, split1 = validation("seed=1")
    assert split0 != split1 and not torch.equal(rows0, rows1)  # by default the split follows the run's seed
    rows_fixed, split_fixed = validation("seed=1", "data.split_seed=0")
    assert split_fixed == split0 and torch.equal(rows_fixed, rows0)


def test_entropy_patching_from_an_untrained_entropy_model_is_refused_before_any_write(tiny_converted, tmp_path):
    """A fresh conversion's entropy model is random under BLT's default threshold: training on
    its patches is refused with the command that fixes it, and nothing is written; an explicit
    threshold is the user's say-so.  The dry run refuses it the same way."""
    from typer.testing import CliRunner

    import byteify.cli as cli

    out = tmp_path / "r"
    res = CliRunner().invoke(cli.app, ["train", "tiny-cpu", f"model={tiny_converted}", f"output_dir={out}",
                                       "patching.mode=entropy", "--dry-run"])
    assert res.exit_code == 2 and "stage 'adapt': entropy patching with" in res.output, res.output
    assert "never trained and calibrated" in res.output and not out.exists()
    with pytest.raises(ByteifyError, match=r"stage 'adapt': entropy patching with .* never trained and calibrated.*"
                                           r"byteify train entropy-model model="):
        run(tiny_converted, out, "patching.mode=entropy", "stages.0.steps=1", "stages.0.warmup_steps=0")
    assert not out.exists()
    s = run(tiny_converted, out, "patching.mode=entropy", "patching.threshold=1.0", "stages.0.steps=1",
            "stages.0.warmup_steps=0")
    assert s["steps"] == 1
