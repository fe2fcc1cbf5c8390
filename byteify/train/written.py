"""The vocabulary warm start's written content held fixed while the local modules train (stage
option ``keep_warm_start``).

With ``byteify convert --preset warm-kept`` (``free_dims`` f = 128) the first ``c = d - f``
coordinates of the encoder's byte states carry the written token vectors and length offsets, the
last ``f`` random n-gram codes the patch projection ignores (:mod:`byteify.convert.warmstart`).
A stage with ``keep_warm_start: true`` trains the local side only in those ``f`` coordinates, so
the global transformer reads exactly the converted model's patch vectors at every step while the
decoder's input (the same byte states) learns freely:

* byte embeddings and hash tables: columns ``[:c]`` stay as converted, columns ``[c:]`` train;
* the encoder layers' residual branches (attention ``o_proj``, MLP ``down_proj``): rows ``[:c]``
  stay zero (the layers write only into the free coordinates; what they read is unrestricted);
* the pooling cross-attention and the patch projection stay as converted (frozen whole, in
  :func:`byteify.train.model.apply_stage`).

Fixed entries keep the values the stage starts with (the converted ones unless an earlier stage
changed them): they get zero gradient (so gradient clipping does not count them and their AdamW
moments stay zero) and are copied back after every optimizer step (weight decay moves them
otherwise).  Works on FSDP2 shards (each
process fixes the rows it holds)."""

from __future__ import annotations

import re

import torch

from ..errors import ByteifyError
from ..parts import plain_name

FROZEN_WHOLE = re.compile(r"model\.local_encoder\.(cross_attn_layers\.\d+\..*|patch_embedding_projection\.weight)$")
_COLUMNS = re.compile(r"model\.(encoder_hash_tok_embedding|local_encoder\.embed_tokens)\.weight$")
_ROWS = re.compile(r"model\.local_encoder\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")


def free_dims(metadata: dict, stage_name: str) -> int:
    """``f``: the encoder coordinates the warm start left free, from the model's ``byteify.json``."""
    stats = metadata.get("vocab_warm_start")
    if not stats:
        raise ByteifyError(f"stage '{stage_name}': keep_warm_start needs a model converted with the vocabulary "
                           "warm start (byteify convert --preset warm-kept), but this model's byteify.json has none")
    return int(stats.get("free_dims", 0))


def check_stages(stages, metadata: dict) -> None:
    """Refuse, before anything runs, a ``keep_warm_start`` stage the model cannot serve: no warm
    start, or no free coordinates while the stage lists the encoder or the hash tables to train
    (every entry of theirs would be fixed)."""
    for stage in stages:
        if stage.keep_warm_start and free_dims(metadata, stage.name) == 0:
            local = sorted({"local_encoder", "hash_embeddings"} & set(stage.train))
            if local:
                raise ByteifyError(f"stage '{stage.name}': keep_warm_start fixes every coordinate of a model converted "
                                   f"with vocab_warm_start.free_dims 0, so {' and '.join(local)} cannot train; convert "
                                   "with --preset warm-kept (free_dims 128) or remove them from the stage's train list")


class WrittenContent:
    """The fixed entries of a stage's parameters and their converted values (this process's rows)."""

    def __init__(self, module, free: int):
        from torch.distributed.tensor import DTensor

        from .model import _local_rows

        self.fixed = []  # (parameter, local rows slice, columns slice, saved values)
        for fqn, p in module.named_parameters():
            name = plain_name(fqn)
            if name is None or not p.requires_grad:
                continue
            start, stop = _local_rows(p)
            if _COLUMNS.search(name):
                rows, cols = slice(0, stop - start), slice(0, p.shape[1] - free)
            elif _ROWS.search(name):
                rows, cols = slice(0, max(0, min(p.shape[0] - free, stop) - start)), slice(None)
            else:
                continue
            local = p.to_local() if isinstance(p, DTensor) else p
            self.fixed.append((p, rows, cols, local.detach()[rows, cols].clone()))

    @staticmethod
    def _local(t):
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, rows, cols, _ in self.fixed:
            if p.grad is not None:
                self._local(p.grad)[rows, cols] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for p, rows, cols, saved in self.fixed:
            self._local(p.detach())[rows, cols] = saved


def keep_written(module, stage, metadata: dict) -> WrittenContent | None:
    """The stage's :class:`WrittenContent`, or None when it does not keep the warm start."""
    if not stage.keep_warm_start:
        return None
    return WrittenContent(module, free_dims(metadata, stage.name))
