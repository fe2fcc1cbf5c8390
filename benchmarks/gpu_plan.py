"""What a conversion preset costs the GPU recipes: the dry run's per-GPU budget
(:mod:`byteify.train.budget`) of each shipped GPU recipe on 8 GPUs, from its source's real shapes
(Llama 3.2 1B, Llama 3.1 8B config values; the model is built on the meta device, nothing is
downloaded), converted with each preset and the header's ``--set`` flags (the warm presets set
cross_attn_k 1, so the local encoder and decoder are as wide as the global transformer, and drop
the width flags of the header's ``--preset auto`` alternative; the decoder depth kept).  Presets
with free coordinates (``warm-kept``, ``warm-kept-64k``, ``warm-spell-64k``) train the recipe as shipped
(``keep_warm_start`` and ``teacher_kl``: the teacher is counted); the others train it as the
header's alternative says, everything training and no teacher (``WITHOUT_WARM_START``).

Usage: .venv/bin/python benchmarks/gpu_plan.py [--world 8] [--presets auto warm-16k warm-spell-64k] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SOURCE_SHAPES = {  # the GPU recipes' sources, their config.json values
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, rope_parameters={**LLAMA3_ROPE, "factor": 8.0}),
}
BYTES_PER_TOKEN = 4.4  # Llama 3's tokenizer on English: the patch size the budget assumes
# set flags the warm start overrides: it needs k = 1 and local width = global width
WIDTH_FLAGS = re.compile(r"^(cross_attn_k|(encoder|decoder)\.(hidden_size|num_attention_heads))=")
# the headers' alternative without the warm start: nothing kept, no teacher
WITHOUT_WARM_START = ["stages.0.keep_warm_start=false", "stages.1.keep_warm_start=false",
                      "stages.0.teacher_kl=null", "stages.1.teacher_kl=null"]


def header_sets(name: str, preset: str = "auto") -> list[str]:
    """The ``--set`` flags of the convert commands in the recipe's header (for ``preset`` other
    than auto: without the width flags the warm start replaces)."""
    from byteify.train.recipe import shipped_recipes

    sets = list(dict.fromkeys(re.findall(r"--set ([^\s'\\]+)", shipped_recipes()[name].read_text())))
    return sets if preset == "auto" else [s for s in sets if not WIDTH_FLAGS.match(s)]


def recipe_overrides(preset: str) -> list[str]:
    """How the recipe trains a conversion with ``preset``: as shipped where the warm start leaves
    free coordinates (what ``keep_warm_start`` needs), else as the header's alternative."""
    from byteify.convert.presets import load_spec

    spec = load_spec(preset).vocab_warm_start
    return [] if spec.enabled and spec.free_dims > 0 else WITHOUT_WARM_START


def config_only_conversion(name: str, root: Path, preset: str = "auto") -> Path:
    """A directory with the configs ``byteify convert --preset PRESET`` writes for the recipe's
    source (the BLT's, and the source's in ``byteify_source/``) and no weights (the dry run builds
    the model, and a distilling stage's teacher, on the meta device), standing for the entropy-model
    run the recipe's header starts from (its calibration record; BLT's default threshold)."""
    from transformers import LlamaConfig

    from byteify.convert.presets import load_spec
    from byteify.convert.sources import SourceCheckpoint
    from byteify.convert.transplant import build_blt_config
    from byteify.resolve import SIDE_DIR

    source_config = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, **SOURCE_SHAPES[name],
                                tie_word_embeddings=name == "llama-3.2-1b")
    source = SourceCheckpoint(path=root, format="hf", architecture="LlamaForCausalLM", files=[], config=source_config)
    spec = load_spec(preset, header_sets(name, preset))
    config, _ = build_blt_config(source, spec)
    out = root / f"{name}-{preset}"
    config.save_pretrained(str(out))
    source_config.save_pretrained(str(out / SIDE_DIR))  # the teacher's shape, for stages that distil
    (out / "model.safetensors").write_bytes(b"")
    meta = {"source_bytes_per_token": BYTES_PER_TOKEN,
            "calibration": {"threshold": config.patching_threshold, "monotonic": False, "target_bytes_per_patch": BYTES_PER_TOKEN}}
    if spec.vocab_warm_start.enabled:  # what keep_warm_start stages check before they run
        meta["vocab_warm_start"] = {"free_dims": spec.vocab_warm_start.free_dims}
    (out / "byteify.json").write_text(json.dumps(meta))
    return out


def measure(name: str, preset: str, world: int, root: Path) -> list[dict]:
    """One row per stage of the recipe: parameters per part and the per-GPU budget."""
    import torch
    from transformers import AutoConfig, BltForCausalLM

    from byteify.resolve import locate
    from byteify.train.budget import GIB, stage_budget
    from byteify.train.model import apply_stage, param_counts
    from byteify.train.plan import teacher_shape
    from byteify.train.recipe import load_recipe

    model_dir = config_only_conversion(name, root, preset)
    recipe, _ = load_recipe(name, [f"model={model_dir}", *recipe_overrides(preset)])
    config = AutoConfig.from_pretrained(str(model_dir))
    rows = []
    for stage in recipe.stages:
        with torch.device("meta"):
            counts = param_counts(apply_stage(BltForCausalLM(config), stage))
        teacher = teacher_shape(locate(model_dir), stage) if stage.teacher_dtype else None
        b = stage_budget(config, counts, stage, recipe.data.seq_len, world, BYTES_PER_TOKEN, teacher)
        size = lambda *parts: sum(counts[p]["trainable"] + counts[p]["frozen"] for p in parts)  # noqa: E731
        ckpt = recipe.run.activation_checkpointing
        rows.append({"recipe": name, "preset": preset, "stage": stage.name, "teacher": teacher is not None,
                     "local_width": config.encoder_config.hidden_size,
                     "local_params": size("local_encoder", "local_decoder"), "hash_params": size("hash_embeddings"),
                     "gflop_per_byte": b.flops_per_byte["checkpointing" if ckpt else "no checkpointing"] / 1e9,
                     "total_gib": b.total(ckpt) / GIB, "kbytes_per_s": b.bytes_per_second(ckpt) / 1e3})
    return rows


def table(rows: list[dict], world: int) -> str:
    lines = [f"| recipe, stage | preset | teacher | local width | encoder + decoder | hash tables | GFLOP per byte | "
             f"total per GPU ({world} GPUs) | expected per GPU at 25% MFU |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']}, {r['stage']} | `{r['preset']}` | {'yes' if r['teacher'] else 'no'} | "
                     f"{r['local_width']:,} | {r['local_params'] / 1e6:,.0f}M | "
                     f"{r['hash_params'] / 1e6:,.0f}M | {r['gflop_per_byte']:.1f} | {r['total_gib']:.1f} GiB | "
                     f"{r['kbytes_per_s']:.0f} kB/s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--presets", nargs="+", default=["auto", "warm-16k", "warm-spell-64k"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in SOURCE_SHAPES for preset in args.presets for r in measure(name, preset, args.world, Path(tmp))]
    print(table(rows, args.world))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
