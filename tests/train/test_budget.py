"""The dry run's per-GPU budget: the shipped GPU recipes fit an 80 GB GPU on 8 GPUs (their
sources' real shapes, built from the convert command in each recipe's header, and with the
vocabulary warm start's wider local modules: benchmarks/gpu_plan.py), sharding divides
the training state, checkpointing shrinks activations, and an over-large micro-batch warns."""

from __future__ import annotations

import re

import pytest

from benchmarks.gpu_plan import config_only_conversion
from byteify.errors import ByteifyError
from byteify.train.recipe import load_recipe
from byteify.train.plan import plan


def totals(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"total with activation checkpointing: ([\d.]+) GiB", text)]


@pytest.mark.parametrize("preset", ["auto", "warm-16k", "warm-kept-64k"])
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


def test_a_distilling_stage_counts_its_teacher(tmp_path):
    """teacher_kl runs the source model beside the student: its sharded weights (bf16 by default,
    fp32 on request), two gathered layers and its token logits join the per-GPU total and its
    forward the FLOPs; Llama 3.1 8B with the smollm2-135m recipe's teacher_kl does not fit at the
    recipe's micro-batch (the dry run says so) and does at half of it."""
    model = config_only_conversion("llama-3.1-8b", tmp_path, "warm-kept-64k")
    teacher_line = re.compile(r"teacher \(the source model, forward only[^)]*\): ([\d.]+) GiB")

    def dry(*extra):
        recipe, _ = load_recipe("llama-3.1-8b", [f"model={model}", *extra])
        return plan(recipe, world=8)

    plain, bf16, fp32 = dry(), dry("stages.1.teacher_kl={weight: 1.0}"), \
        dry("stages.1.teacher_kl={weight: 1.0, teacher_dtype: fp32}")
    assert not teacher_line.search(plain) and "WARNING" not in plain
    (t16,), (t32,) = teacher_line.findall(bf16), teacher_line.findall(fp32)
    # 8.03B parameters / 8 processes in bf16 = 1.9 GiB; gathered: the root (embeddings and head, 1.05B)
    # and 2 layers of 218M = 2.8 GiB; logits for 16 x 8192 bytes / 4.4 = 29,789 tokens of a 128,256-token
    # vocabulary in bf16 and fp32 (6 B): 21.3 GiB; in fp32 weights and gathered units double and the
    # logits take 8 B: +1.9 + 2.8 + 7.1 GiB
    assert 25.5 < float(t16) < 26.5 and 11.3 < float(t32) - float(t16) < 12.3, (t16, t32)
    assert abs(totals(bf16)[1] - totals(plain)[1] - float(t16)) < 0.2 and totals(bf16)[0] == totals(plain)[0]
    assert "WARNING" in bf16 and "will not fit an 80 GB GPU" in bf16
    rate = lambda t: [int(x) for x in re.findall(r"~(\d+) kB/s per GPU at 25% MFU  <- this recipe", t)]  # noqa: E731
    assert rate(bf16)[1] < rate(plain)[1]  # the teacher's forward
    assert "WARNING" not in dry("stages.1.teacher_kl={weight: 1.0}", "stages.1.batch_bytes=524288")
    (model / "byteify_source" / "config.json").unlink()  # the teacher cannot be rebuilt: refused by name
    with pytest.raises(ByteifyError, match=r"byteify_source/config.json: not found; the teacher"):
        dry("stages.1.teacher_kl={weight: 1.0}")
    assert "WARNING" not in dry()  # a stage that does not distil does not need it
