"""``byteify train --dry-run``: the plan of a recipe, stage by stage, from the model built on the
meta device (nothing is loaded, no data is read), with the per-GPU budget of
:mod:`byteify.train.budget`; and the training-state size ``byteify inspect`` prints."""

from __future__ import annotations

import os

import torch

from ..errors import ByteifyError
from ..parts import PARTS
from ..resolve import locate
from .model import apply_stage, param_counts
from .recipe import Recipe, parts_for


def teacher_shape(loc, stage):
    """The source model a distilling stage runs (:class:`~.budget.TeacherShape`), from its
    architecture on the meta device, in the stage's ``teacher_dtype``."""
    from .budget import TeacherShape
    from .teacher import HEAD_CHUNK, teacher_on_meta

    teacher = teacher_on_meta(loc)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in teacher.model.layers]
    total = teacher.num_parameters()  # tied embeddings counted once
    vocab = teacher.config.vocab_size
    return TeacherShape(params=total, layer=max(layers), root=total - sum(layers), vocab=vocab,
                        dtype_bytes=2 if stage.teacher_dtype == "bf16" else 4, head_rows=max(1, HEAD_CHUNK // vocab))


def plan(recipe: Recipe, world: int | None = None, gpu_gib: float = 80.0) -> str:
    """The dry run: stage by stage, parameters and learning rates per part, and the per-GPU
    budget (:mod:`byteify.train.budget`) for ``world`` processes (default: ``WORLD_SIZE``)."""
    from transformers import AutoConfig, BltForCausalLM

    from .budget import budget_lines, stage_budget

    loc = locate(recipe.model)
    config = AutoConfig.from_pretrained(str(loc.config_dir))
    recipe.check_start(config, loc.metadata, recipe.model)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    patch_bytes = float(loc.metadata.get("source_bytes_per_token") or 4.5)
    lines = [f"model: {recipe.model}", f"output_dir: {recipe.output_dir}",
             f"data: {', '.join(s.path for s in recipe.data.sources)}; seq_len {recipe.data.seq_len} bytes"]
    for stage in recipe.stages:
        with torch.device("meta"):
            model = apply_stage(BltForCausalLM(config), stage)
        counts = param_counts(model)
        seqs = stage.batch_bytes // recipe.data.seq_len
        if (seqs // stage.grad_accum) % world:
            raise ByteifyError(f"stage '{stage.name}': {seqs // stage.grad_accum} sequences per micro-step do not split "
                               f"over {world} processes")
        p = recipe.patching_for(stage, config, loc.metadata)
        lines.append(f"\nstage '{stage.name}': {stage.steps} steps x {stage.batch_bytes:,} bytes/step "
                     f"= {stage.steps * stage.batch_bytes:,} bytes; micro-batch {seqs // stage.grad_accum} seq x "
                     f"{stage.grad_accum} accum; lr {stage.lr:g} ({stage.schedule}, warmup {stage.warmup_steps}); "
                     f"patching {p.mode}" + (f"; LoRA r={stage.lora.rank}" if stage.lora else ""))
        lines.append(f"  {'part':<16}{'trainable':>14}{'frozen':>14}{'lr':>11}")
        mults = parts_for(stage)
        for part in PARTS:
            c = counts[part]
            lr = f"{stage.lr * mults[part]:.2e}" if part in mults else "-"
            lines.append(f"  {part:<16}{c['trainable']:>14,}{c['frozen']:>14,}{lr:>11}")
        size = p.patch_size if p.mode == "static" else patch_bytes
        teacher = teacher_shape(loc, stage) if stage.teacher_dtype else None
        budget = stage_budget(config, counts, stage, recipe.data.seq_len, world, size, teacher)
        lines += budget_lines(budget, recipe.run.activation_checkpointing, gpu_gib)
    if recipe.calibration is not None:
        c = recipe.calibration
        target = f"{c.target_bytes_per_patch} bytes per patch" if c.target_bytes_per_patch else "the source tokenizer's bytes per token"
        lines.append(f"\nthen: calibrate the {'monotonic' if c.monotonic else 'global'} entropy threshold on up to "
                     f"{c.max_bytes:,} held-out bytes to {target}; written to the last checkpoint's model/config.json")
    return "\n".join(lines)
