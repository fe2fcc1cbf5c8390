"""Stage runners: what one optimizer step and one validation mean for a kind of stage.  The
trainer builds a :class:`StageContext` (the model, the stage, the data, the patcher, the
processes) and hands it to a runner; runners never reach into the trainer.

* :class:`ByteStage`: plain and LoRA stages: byte cross-entropy of the BLT on packed byte
  sequences (and/or the entropy model's, when it trains; plus the source model's next-byte
  distributions with ``teacher_kl``), gradient accumulation over micro-steps.
* ``DistillStage`` (in :mod:`byteify.train.distill`): source-aligned distillation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..tokenizer import IGNORE_INDEX
from .distributed import Dist, set_gradient_sync
from .recipe import Recipe, StageSpec

LN2 = math.log(2.0)


@dataclass
class StepResult:
    loss: float  # nats per predicted byte (the quantity the progress bar shows as bpb / ln 2)
    bytes: int  # bytes this optimizer step consumed (over all processes)
    extras: dict = field(default_factory=dict)  # more metrics for metrics.jsonl
    bpb: float | None = None  # bits per byte to show, when ``loss`` is not byte cross-entropy


@dataclass
class StageContext:
    recipe: Recipe
    stage: StageSpec
    index: int
    module: torch.nn.Module  # the TrainModule (FSDP-sharded when dist.world > 1)
    dist: Dist
    location: object  # byteify.resolve.Location of the model the run started from
    sources: list  # the recipe's data sources (byteify.data.readers.SourceSpec)
    holdout: object  # which documents are validation text (byteify.data.streams.Holdout)
    val_rows: object  # held-out text packed into rows of seq_len + 1 ids (numpy uint16)
    patcher: object  # patch lengths for the BLT loss (None in an entropy-model-only stage)
    micro_batch: int  # sequences per micro-step over all processes (each takes micro_batch / world)
    shared: dict = field(default_factory=dict)  # lives across stages (a teacher, a trie ...)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def entropy_only(self) -> bool:
        return self.stage.train == ["entropy_model"]

    @property
    def seed(self) -> int:
        return self.recipe.seed + self.index

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dist.device)


class StageRunner(Protocol):
    stream: object  # resumable: state_dict() / load_state_dict()

    def step(self) -> StepResult: ...

    def validate(self) -> dict: ...


class ByteStage:
    """Plain and LoRA stages (with ``teacher_kl``: the source model's next-byte distributions as
    a second target, see :mod:`byteify.train.teacher_kl`; with ``patch_norm``: a penalty on the
    global transformer's input norm, see :func:`byteify.train.model.patch_norm_penalty`; with
    ``decoder_byte_dropout``: bytes withheld from the local decoder, see
    :func:`byteify.train.model.drop_bytes`)."""

    def __init__(self, ctx: StageContext):
        from ..data.streams import ByteBatches

        self.ctx = ctx
        self.stream = ByteBatches(ctx.sources, ctx.recipe.data.seq_len, ctx.micro_batch, rank=ctx.dist.rank,
                                  world_size=ctx.dist.world, seed=ctx.seed, holdout=ctx.holdout)
        self.teacher = None
        if ctx.stage.teacher_kl is not None:
            from .teacher import run_teacher
            from .teacher_kl import PackedTeacher

            self.teacher = PackedTeacher(run_teacher(ctx), ctx.stage.teacher_kl)

    def step(self) -> StepResult:
        ctx = self.ctx
        micro = [next(self.stream) for _ in range(ctx.stage.grad_accum)]
        (count,) = ctx.dist.all_sum(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro))
        scale = ctx.dist.world / max(count, 1)  # FSDP averages gradients over processes
        weight = ctx.stage.teacher_kl.weight if self.teacher is not None else 0.0
        norm_weight = ctx.stage.patch_norm.weight if ctx.stage.patch_norm is not None else 0.0
        blt_nats = ent_nats = bound = kl = norm = 0.0
        for i, b in enumerate(micro):
            set_gradient_sync(ctx.module, i == len(micro) - 1)  # reduce-scatter once per step
            out, _ = byte_losses(ctx, b, teacher=self.teacher)
            ((out.blt + out.entropy + out.boundary + weight * out.kl + norm_weight * out.patch_norm) * scale).backward()
            blt_nats, ent_nats = blt_nats + float(out.blt.detach()), ent_nats + float(out.entropy.detach())
            bound, kl = bound + float(out.boundary.detach()), kl + float(out.kl.detach())
            norm += float(out.patch_norm.detach())
        blt_nats, ent_nats, bound, kl, norm = ctx.dist.all_sum(blt_nats, ent_nats, bound, kl, norm)
        extras = {}
        if "entropy_model" in ctx.stage.train and not ctx.entropy_only:
            extras["entropy_bpb"] = ent_nats / max(count, 1) / LN2
        if ctx.stage.boundaries is not None:
            extras["boundary_bce"] = bound / max(count, 1)
        if self.teacher is not None:
            extras["teacher_kl"] = kl / max(count, 1)  # nats per byte, over all label bytes
        if ctx.stage.patch_norm is not None:
            extras["patch_norm_penalty"] = norm / max(count, 1)  # per byte, unweighted
        loss = (ent_nats if ctx.entropy_only else blt_nats) / max(count, 1)
        return StepResult(loss, ctx.stage.batch_bytes, extras)

    @torch.no_grad()
    def validate(self) -> dict:
        return {"val_bpb": validate_bytes(self.ctx)}


def byte_losses(ctx: StageContext, batch, entropy_loss: bool | None = None, with_boundaries: bool = True,
                teacher=None):
    """(:class:`~byteify.train.model.Losses`, labels) of a batch of packed byte sequences (the
    boundary term when the stage has ``boundaries``, the teacher KL when ``teacher`` is given)."""
    ids, labels = ctx.to_device(batch["input_ids"]), ctx.to_device(batch["labels"])
    if entropy_loss is None:
        entropy_loss = "entropy_model" in ctx.stage.train
    boundaries = None
    if entropy_loss and with_boundaries and ctx.stage.boundaries is not None:
        from .model import boundary_targets

        source = ctx.shared.get("source_token_patcher")
        if source is None:
            from ..patching.patchers import SourceTokenPatcher
            from ..resolve import load_source_tokenizer

            source = ctx.shared["source_token_patcher"] = SourceTokenPatcher(load_source_tokenizer(ctx.location))
        boundaries = (*boundary_targets(ids, source), ctx.stage.boundaries)
    byte_kl = teacher.byte_kl(batch["input_ids"], batch["labels"]) if teacher is not None else None
    max_norm = ctx.stage.patch_norm.max_norm if ctx.stage.patch_norm is not None else None
    with ctx.autocast():
        out = ctx.module(ids, labels, patcher=None if ctx.entropy_only else ctx.patcher, entropy_loss=entropy_loss,
                         boundaries=boundaries, byte_kl=byte_kl, max_patch_norm=max_norm,
                         decoder_byte_dropout=ctx.stage.decoder_byte_dropout)
    return out, labels


@torch.no_grad()
def validate_bytes(ctx: StageContext) -> float:
    """Bits per byte on the held-out split (the entropy model's when only it trains)."""
    from ..data.streams import validation_batches

    ctx.module.eval()
    nats = count = 0.0
    for batch in validation_batches(ctx.val_rows, ctx.micro_batch, ctx.recipe.run.eval_batches,
                                    rank=ctx.dist.rank, world_size=ctx.dist.world):
        out, labels = byte_losses(ctx, batch, entropy_loss=ctx.entropy_only, with_boundaries=False)
        nats += float(out.entropy if ctx.entropy_only else out.blt)
        count += float((labels != IGNORE_INDEX).sum())
    ctx.module.train()
    nats, count = ctx.dist.all_sum(nats, count)
    return nats / max(count, 1) / LN2
