"""The dry run's per-GPU budget: the shipped GPU recipes fit an 80 GB GPU on 8 GPUs (their
sources' real shapes, built from the convert command in each recipe's header), sharding divides
the training state, checkpointing shrinks activations, and an over-large micro-batch warns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig

from byteify.convert.presets import load_spec
from byteify.convert.sources import SourceCheckpoint
from byteify.convert.transplant import build_blt_config
from byteify.train.recipe import load_recipe, shipped_recipes
from byteify.train.plan import plan

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # the sources' config.json values
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, rope_parameters={**LLAMA3_ROPE, "factor": 8.0}),
}


def converted_config_dir(name: str, root: Path) -> Path:
    """A directory with the config 'byteify convert' writes for the recipe's source (no weights:
    the dry run builds the model on the meta device)."""
    sets = re.findall(r"--set (\S+)", shipped_recipes()[name].read_text())
    source = SourceCheckpoint(path=root, format="hf", architecture="LlamaForCausalLM", files=[],
                              config=LlamaConfig(vocab_size=128256, max_position_embeddings=131072, **SHAPES[name]))
    config, _ = build_blt_config(source, load_spec("auto", sets))
    out = root / name
    config.save_pretrained(str(out))
    (out / "model.safetensors").write_bytes(b"")
    (out / "byteify.json").write_text(json.dumps({"source_bytes_per_token": 4.4}))  # Llama 3's tokenizer on English
    return out


def totals(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"total with activation checkpointing: ([\d.]+) GiB", text)]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_gpu_recipes_fit_an_80gb_gpu_on_8_gpus(name, tmp_path):
    recipe, _ = load_recipe(name, [f"model={converted_config_dir(name, tmp_path)}"])
    assert recipe.run.activation_checkpointing and recipe.data.sources[0].path.endswith(".parquet")
    text = plan(recipe, world=8)
    assert "WARNING" not in text, text
    assert len(totals(text)) == 2 and all(5 < t < 80 for t in totals(text)), totals(text)
    assert "kB/s per GPU" in text and "16 x 8192-byte sequences per micro-step" in text


def test_budget_scales_with_world_size_checkpointing_and_micro_batch(tmp_path):
    model = converted_config_dir("llama-3.2-1b", tmp_path)
    recipe, _ = load_recipe("llama-3.2-1b", [f"model={model}"])
    one, eight = plan(recipe, world=1), plan(recipe, world=8)
    state = lambda t: [float(x) for x in re.findall(r"AdamW \(fp32, sharded\): ([\d.]+) GiB", t)]  # noqa: E731
    assert [round(a / b) for a, b in zip(state(one), state(eight))] == [8, 8]
    act = re.findall(r"activations: ([\d.]+) GiB with checkpointing, ([\d.]+) GiB without", eight)
    assert all(float(w) < float(wo) / 4 for w, wo in act)
    big, _ = load_recipe("llama-3.2-1b", [f"model={model}", "run.activation_checkpointing=false",
                                          "stages.1.batch_bytes=8388608"])
    assert "WARNING" in plan(big, world=8) and "will not fit an 80 GB GPU" in plan(big, world=8)
