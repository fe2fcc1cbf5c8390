"""The dry run's per-GPU budget: the shipped GPU recipes fit an 80 GB GPU on 8 GPUs (their
sources' real shapes, built from the convert command in each recipe's header, and with the
vocabulary warm start's wider local modules: benchmarks/gpu_plan.py), sharding divides
the training state, checkpointing shrinks activations, and an over-large micro-batch warns."""

from __future__ import annotations

import re

import pytest

from benchmarks.gpu_plan import WITHOUT_WARM_START, config_only_conversion, recipe_overrides
from byteify.errors import ByteifyError
from byteify.train.recipe import load_recipe, shipped_recipes
from byteify.train.plan import plan


def totals(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"total with activation checkpointing: ([\d.]+) GiB", text)]


@pytest.mark.parametrize("preset", ["auto", "warm-16k", "warm-spell-64k"])
@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_gpu_recipes_fit_an_80gb_gpu_on_8_gpus(name, preset, tmp_path):
    """As shipped on the header's warm-spell-64k conversion, and as the header's alternative says on
    the others (its overrides are the header's words)."""
    header = shipped_recipes()[name].read_text()
    assert "--preset warm-spell-64k" in header and f"'{' '.join(WITHOUT_WARM_START)}'" in header
    recipe, _ = load_recipe(name, [f"model={config_only_conversion(name, tmp_path, preset)}", *recipe_overrides(preset)])
    assert recipe.run.activation_checkpointing and recipe.data.sources[0].path.endswith(".parquet")
    text = plan(recipe, world=8)
    assert "WARNING" not in text, text
    assert len(totals(text)) == 2 and all(5 < t < 80 for t in totals(text)), totals(text)
    assert "kB/s per GPU" in text and "16 x 8192-byte sequences per micro-step" in text


def test_budget_scales_with_world_size_checkpointing_and_micro_batch(tmp_path):
    model = config_only_conversion("llama-3.2-1b", tmp_path, "warm-spell-64k")  # as the header converts
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
    fp32 on request), two gathered layers, one chunk of its head's logits and the byte targets join
    the per-GPU total and its forward the FLOPs; the shipped Llama 3.1 8B recipe (teacher_kl on both
    stages, on its header's warm-spell-64k conversion) fits an 80 GB GPU at its micro-batch (the
    whole [tokens, vocabulary] logits would not: 21.3 GiB more)."""
    model = config_only_conversion("llama-3.1-8b", tmp_path, "warm-spell-64k")
    teacher_line = re.compile(r"teacher \(the source model, forward only[^)]*\): ([\d.]+) GiB")

    def dry(*extra):
        recipe, _ = load_recipe("llama-3.1-8b", [f"model={model}", *extra])
        return plan(recipe, world=8)

    no_teacher = ("stages.0.teacher_kl=null", "stages.1.teacher_kl=null")
    plain, bf16, fp32 = dry(*no_teacher), dry(), dry("stages.1.teacher_kl={weight: 1.0, teacher_dtype: fp32}")
    assert not teacher_line.search(plain) and "WARNING" not in plain
    (_, t16), (_, t32) = teacher_line.findall(bf16), teacher_line.findall(fp32)  # the end-to-end stage's
    # 8.03B parameters / 8 processes in bf16 = 1.9 GiB; gathered: the root (embeddings and head, 1.05B)
    # and 2 layers of 218M = 2.8 GiB; a head chunk of 2^24 // 128,256 = 130 positions x 128,256 logits
    # x 26 B (bf16, fp32, softmax, float64 gather and prefix sums) = 0.40 GiB; targets for 16 x 8192
    # bytes x 256 fp32 = 0.125 GiB.  In fp32 weights and gathered units double and the chunk takes 28 B:
    # +1.9 + 2.8 + 0.03 GiB
    assert 5.0 < float(t16) < 5.4 and 4.5 < float(t32) - float(t16) < 4.9, (t16, t32)
    assert all(abs(b - p - float(t16)) < 0.2 for b, p in zip(totals(bf16), totals(plain)))
    assert "WARNING" not in bf16 and max(totals(bf16)) < 75  # the shipped recipe fits an 80 GB GPU
    rate = lambda t: [int(x) for x in re.findall(r"~(\d+) kB/s per GPU at 25% MFU  <- this recipe", t)]  # noqa: E731
    assert rate(bf16)[1] < rate(plain)[1]  # the teacher's forward
    (model / "byteify_source" / "config.json").unlink()  # the teacher cannot be rebuilt: refused by name
    with pytest.raises(ByteifyError, match=r"byteify_source/config.json: not found; the teacher"):
        dry("stages.1.teacher_kl={weight: 1.0}")
    assert "WARNING" not in dry(*no_teacher)  # a stage that does not distil does not need it
