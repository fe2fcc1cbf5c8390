"""``byteify inspect``: parameter counts per part must be those of the model transformers loads."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from byteify.errors import ByteifyError
from byteify.inspection import flops_per_byte, inspect_model
from byteify.parts import PARTS, part_of
from byteify.cli import app

runner = CliRunner()


def loaded_counts(out) -> Counter:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    counts = Counter()
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    return counts


@pytest.mark.parametrize("name", ["gqa-tied-fp32", "gguf-untied-mha"])
def test_part_counts_match_loaded_model(converted, name):
    src, out, _ = converted(name)
    ins = inspect_model(out)
    counts = loaded_counts(out)
    assert set(counts) == set(PARTS)
    assert {p: s.params for p, s in ins.parts.items()} == dict(counts)
    assert ins.total_params == sum(counts.values())
    c = src.reference().config
    layers = c.num_hidden_layers
    kv = c.num_key_value_heads * 16
    per_layer = 64 * (64 + kv + kv + 64) + 3 * 64 * 96 + 2 * 64
    assert ins.parts["global"].params == layers * per_layer
    assert all(s.dtypes == ("F32",) for s in ins.parts.values())


def test_cli_inspect_text_and_json(converted):
    _, out, _ = converted("gqa-tied-fp32")
    counts = loaded_counts(out)
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.stderr
    table = {}
    for line in r.stdout.split("\n\n")[0].splitlines()[1:]:  # the table, above the config summary
        m = re.match(r"^(\w+)\s+([\d,]+)(\s|$)", line)
        assert m, line
        table[m.group(1)] = int(m.group(2).replace(",", ""))
    assert {p: table[p] for p in PARTS} == dict(counts)
    assert table["total"] == sum(counts.values())

    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert {p: d["parts"][p]["params"] for p in PARTS} == dict(counts)
    assert d["total_params"] == sum(counts.values())
    assert d["train_memory_bytes"] == 16 * (d["total_params"] - counts["entropy_model"]) + 4 * counts["entropy_model"]


def test_bf16_dtypes_and_bytes(sources, tiny_spec, tmp_path):
    from byteify.convert.transplant import convert
    from byteify.convert.sources import open_source

    out = tmp_path / "bf16"
    convert(open_source(sources("mha-untied-fp32").path), out, tiny_spec, dtype="bf16", progress=False, verify=False)
    ins = inspect_model(out)
    for s in ins.parts.values():
        assert s.dtypes == ("BF16",) and s.bytes == 2 * s.params


def test_flops_scale_with_patch_size(converted):
    _, out, _ = converted("gqa-tied-fp32")
    a, b = inspect_model(out, patch_size=2.0), inspect_model(out, patch_size=4.0)
    g = a.parts["global"].params
    assert a.flops_per_byte - b.flops_per_byte == pytest.approx(2 * g * (1 / 2 - 1 / 4))
    assert flops_per_byte({p: s.params for p, s in a.parts.items()}, 2.0) == a.flops_per_byte


def test_inspect_rejects_non_blt_dirs(sources, tmp_path):
    with pytest.raises(ByteifyError, match="model_type is 'llama', expected 'blt'"):
        inspect_model(sources("mha-untied-fp32").path)
    r = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "config.json" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_part_of_covers_every_tensor(converted):
    from safetensors import safe_open

    _, out, _ = converted("gqa-tied-fp32")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        parts = {part_of(k) for k in f.keys()}
    assert parts == set(PARTS)
    with pytest.raises(KeyError):
        part_of("model.something_else.weight")
