"""The dry run's per-GPU budget: the shipped GPU recipes fit an 80 GB GPU on 8 GPUs (their
sources' real shapes, built from the convert command in each recipe's header, and with the
vocabulary warm start's wider local modules: benchmarks/gpu_plan.py), sharding divides
the training state, checkpointing shrinks activations, and an over-large micro-batch warns."""

from __future__ import annotations

import re

import pytest

from benchmarks.gpu_plan import config_only_conversion
from byteify.train.recipe import load_recipe
from byteify.train.plan import plan


def totals(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"total with activation checkpointing: ([\d.]+) GiB", text)]


@pytest.mark.parametrize("preset", ["auto", "warm-16k"])
@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_gpu_recipes_fit_an_80gb_gpu_on_8_gpus(name, preset, tmp_path):
    recipe, _ = load_recipe(name, [f"model={config_only_conversion(name, tmp_path, preset)}"])
    assert recipe.run.activation_checkpointing and recipe.data.sources[0].path.endswith(".parquet")
    text = plan(recipe, world=8)
    assert "WARNING" not in text, text
    assert len(totals(text)) == 2 and all(5 < t < 80 for t in totals(text)), totals(text)
    assert "kB/s per GPU" in text and "16 x 8192-byte sequences per micro-step" in text


def test_budget_scales_with_world_size_checkpointing_and_micro_batch(tmp_path):
    model = config_only_conversion("llama-3.2-1b", tmp_path)
    recipe, _ = load_recipe("llama-3.2-1b", [f"model={model}"])
    one, eight = plan(recipe, world=1), plan(recipe, world=8)
    state = lambda t: [float(x) for x in re.findall(r"AdamW \(fp32, sharded\): ([\d.]+) GiB", t)]  # noqa: E731
    assert [round(a / b) for a, b in zip(state(one), state(eight))] == [8, 8]
    act = re.findall(r"activations: ([\d.]+) GiB with checkpointing, ([\d.]+) GiB without", eight)
    assert all(float(w) < float(wo) / 4 for w, wo in act)
    big, _ = load_recipe("llama-3.2-1b", [f"model={model}", "run.activation_checkpointing=false",
                                          "stages.1.batch_bytes=8388608"])
    assert "WARNING" in plan(big, world=8) and "will not fit an 80 GB GPU" in plan(big, world=8)
