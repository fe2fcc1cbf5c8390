"""``byteify convert`` through the command line: the happy path, and every kind of bad input
(exit code 2, one line on stderr naming the file or key, no traceback, nothing left behind)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import byteify.convert.transplant as conversion
from byteify.cli import app
from helpers import leftovers, safetensors_header, transplant_rel_diff

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stdout + result.stderr


def test_convert_cli_happy_path(sources, tmp_path):
    src = sources("gqa-untied-bf16")
    out = tmp_path / "blt"
    r = run("convert", src.path, out, "--preset", "tiny", "--seed", 3, "--dtype", "bf16",
            "--max-shard-size", "300KB")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "-> PASS" in r.stdout and "global" in r.stdout and "hash_embeddings" in r.stdout
    assert leftovers(out) == ["blt"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    dtypes = {v["dtype"] for s in shards for k, v in safetensors_header(out / s).items() if k != "__metadata__"}
    assert dtypes == {"BF16"}
    meta = json.loads((out / "byteify.json").read_text())
    assert meta["seed"] == 3 and meta["output_dtype"] == "bfloat16"
    assert transplant_rel_diff(src.reference(), out) <= 1e-4


def test_force_replaces_existing_output(sources, tmp_path):
    out = tmp_path / "blt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    r = run("convert", sources("gqa-tied-fp32").path, out, "--preset", "tiny", "--force", "--no-verify")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert leftovers(out) == ["blt"]  # no .blt.old-* / .blt.tmp-* siblings
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(str(out))).__name__ == "BltForCausalLM"


def test_empty_existing_output_is_fine_without_force(sources, tmp_path):
    out = tmp_path / "blt"
    out.mkdir()
    r = run("convert", sources("gqa-tied-fp32").path, out, "--preset", "tiny", "--no-verify")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert (out / "config.json").exists()


# ---- bad input ---------------------------------------------------------------------------------
def _copy_source(sources, name, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(sources(name).path, dst)
    return dst


def _write_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _missing(sources, tmp_path):
    return tmp_path / "does-not-exist", ["does-not-exist", "source not found"]


def _no_config(sources, tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    shutil.copy(sources("mha-untied-fp32").path / "model.safetensors", d)
    return d, [str(d / "config.json"), "not found"]


def _gpt2(sources, tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(str(d))
    return d, ["config.json", "'GPT2LMHeadModel' is not supported"]


def _qwen2(sources, tmp_path):
    from transformers import Qwen2Config

    d = tmp_path / "qwen2"
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=96)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(str(d))
    return d, ["config.json", "'Qwen2ForCausalLM' is not supported"]


def _llama_with_bias(sources, tmp_path):
    d = _copy_source(sources, "mha-untied-fp32", tmp_path)
    _write_config(d, attention_bias=True)
    return d, ["config.json", "attention_bias"]


def _no_architectures(sources, tmp_path):
    d = _copy_source(sources, "mha-untied-fp32", tmp_path)
    _write_config(d, architectures=None)
    return d, ["config.json", "'architectures'"]


def _truncated_shard(sources, tmp_path):
    d = _copy_source(sources, "sharded", tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    return d, [shard.name, "truncated"]


def _index_missing_shard(sources, tmp_path):
    d = _copy_source(sources, "sharded", tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.1.mlp.down_proj.weight"] = "model-00042-of-00042.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return d, ["model.safetensors.index.json", "model-00042-of-00042.safetensors", "not found"]


def _shape_contradicts_config(sources, tmp_path):
    d = _copy_source(sources, "mha-untied-fp32", tmp_path)
    _write_config(d, intermediate_size=128)
    return d, ["model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]"]


def _gguf_shape_contradicts_metadata(sources, tmp_path):
    from helpers import write_gguf

    src = sources("gguf-tied-gqa")
    f = write_gguf(src.memory_model, tmp_path / "bad.gguf", overrides={"feed_forward_length": 80})
    return f, ["bad.gguf", "blk.0.ffn_gate.weight", "[96, 64]", "[80, 64]", "GGUF metadata"]


BAD_SOURCES = {
    "missing-src": _missing,
    "dir-without-config": _no_config,
    "gpt2": _gpt2,
    "qwen2-with-biases": _qwen2,
    "llama-with-attention-bias": _llama_with_bias,
    "no-architectures-field": _no_architectures,
    "truncated-shard": _truncated_shard,
    "index-names-missing-shard": _index_missing_shard,
    "shape-contradicts-config": _shape_contradicts_config,
    "gguf-shape-contradicts-metadata": _gguf_shape_contradicts_metadata,
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source(sources, tmp_path, case):
    src, needles = BAD_SOURCES[case](sources, tmp_path)
    out = tmp_path / "out"
    r = run("convert", src, out, "--preset", "tiny")
    assert_user_error(r, *needles)
    assert leftovers(out) == []


def test_output_exists_and_not_empty(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run("convert", sources("mha-untied-fp32").path, out, "--preset", "tiny")
    assert_user_error(r, str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert leftovers(out) == ["out"]


def test_output_inside_source(sources, tmp_path):
    src = _copy_source(sources, "mha-untied-fp32", tmp_path)
    before = sorted(p.name for p in src.iterdir())
    r = run("convert", src, src / "blt", "--preset", "tiny")
    assert_user_error(r, "inside the source")
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize("key,closest", [("encoder.hiden_size", "encoder.hidden_size"),
                                         ("hash.ngram_size", "hash.ngram_sizes")])
def test_unknown_set_key_names_closest(sources, tmp_path, key, closest):
    out = tmp_path / "out"
    r = run("convert", sources("mha-untied-fp32").path, out, "--preset", "tiny", "--set", f"{key}=32")
    assert_user_error(r, f"'{key}'", f"did you mean '{closest}'")
    assert leftovers(out) == []


def test_bad_set_value_and_dtype(sources, tmp_path):
    out = tmp_path / "out"
    src = sources("mha-untied-fp32").path
    assert_user_error(run("convert", src, out, "--preset", "tiny", "--set", "encoder.hidden_size=big"),
                      "encoder.hidden_size")
    assert_user_error(run("convert", src, out, "--preset", "tiny", "--dtype", "fp8"), "--dtype 'fp8'")
    assert_user_error(run("convert", src, out, "--preset", "tiny", "--max-shard-size", "lots"), "'lots'")
    assert leftovers(out) == []


def test_failed_verification_leaves_nothing(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(conversion.TRANSFORMS, "rope_to_interleaved", lambda w, n: w)
    out = tmp_path / "out"
    r = run("convert", sources("gqa-tied-fp32").path, out, "--preset", "tiny")
    assert_user_error(r, "verification failed")
    assert leftovers(out) == []


def test_interrupt_leaves_nothing(sources, tmp_path, monkeypatch):
    calls = {"n": 0}
    add = conversion.ShardWriter.add_chunks

    def interrupted_add(self, name, shape, dtype, chunks):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return add(self, name, shape, dtype, chunks)

    monkeypatch.setattr(conversion.ShardWriter, "add_chunks", interrupted_add)
    out = tmp_path / "out"
    r = run("convert", sources("gqa-tied-fp32").path, out, "--preset", "tiny")
    assert r.exit_code == 130 and calls["n"] == 40
    assert leftovers(out) == []


def test_real_process_bad_input_has_no_traceback(tmp_path):
    """The installed entry point, not just CliRunner: exit status 2 and a single stderr line."""
    exe = Path(sys.executable).with_name("byteify")
    p = subprocess.run([str(exe), "convert", str(tmp_path / "nope"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: source not found "
                                             "(expected a checkpoint directory or a .gguf file)"]
    assert leftovers(tmp_path / "out") == []
