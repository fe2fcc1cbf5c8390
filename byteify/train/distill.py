"""Source-aligned distillation (the first stage of byte-ifying, as in Bolmo): patches at the
source tokenizer's token boundaries, the source model as teacher, the global transformer frozen,
and its two halves trained apart:

* decoder half: the local decoder reads the teacher's final (pre-norm) hidden state of patch j in
  place of the global output and predicts the bytes of patch j+1, with byte cross-entropy plus
  a dense term: the teacher's next-token distribution marginalised byte by byte over the tokens
  whose bytes extend the current prefix (a byte trie over the source vocabulary), i.e. an exact
  teacher distribution for every byte of the next token;
* encoder half: the local encoder's patch outputs, passed through the first k frozen global
  layers, match the teacher's hidden states after layer k (squared error relative to the
  teacher state's norm).

BLT patch p holds source token p (patch 0 = BOS = the teacher's BOS position), so global state p
and teacher position p describe the same prefix.  The objective of a step is
:func:`distill_objective`; its data are :mod:`byteify.train.aligned`'s windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..tokenizer import IGNORE_INDEX, OFFSET
from .aligned import AlignedBatch, AlignedBatches, AlignedWindows, ByteTrie, WindowCutter
from .model import blt_forward, summed_nll
from .distributed import set_gradient_sync
from .stages import LN2, StageContext, StepResult, validate_bytes
from .teacher import byte_marginals


def dense_queries(batch: AlignedBatch) -> tuple[torch.Tensor, ...]:
    """(b_idx, t_idx, at, token, depth) of every label byte that has a teacher prediction: its row
    and position, the flat teacher position ``at`` (b * P + p) whose next-token distribution covers
    it, the token it belongs to and the bytes of that token before it."""
    b_idx, t_idx = torch.nonzero(batch.byte_patch >= 0, as_tuple=True)
    p_idx = batch.byte_patch[b_idx, t_idx]
    token = batch.next_token[b_idx, p_idx]
    keep = token >= 0
    b_idx, t_idx, p_idx, token = b_idx[keep], t_idx[keep], p_idx[keep], token[keep]
    return b_idx, t_idx, b_idx * batch.teacher_ids.shape[1] + p_idx, token, batch.byte_depth[b_idx, t_idx]


def teacher_states(teacher, batch: AlignedBatch, k: int, trie: ByteTrie | None = None, temperature: float = 1.0):
    """Teacher forward on the batch's source tokens: (hidden after layer k, final pre-norm hidden,
    dense targets), the last ``(b_idx, t_idx, [Q, 256] next-byte distributions)`` for every label
    byte that has a teacher prediction when ``trie`` is given (else None; the token logits are then
    not computed)."""
    captured = {}
    hooks = []
    if k > 0:
        hooks.append(teacher.model.layers[k - 1].register_forward_hook(
            lambda mod, args, out: captured.__setitem__("k", out[0] if isinstance(out, tuple) else out)))
    hooks.append(teacher.model.layers[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out)))
    dense = None
    try:
        with torch.no_grad():
            if trie is None:
                teacher(batch.teacher_ids, use_cache=False, logits_to_keep=1)
            else:
                b_idx, t_idx, at, token, depth = dense_queries(batch)
                dense = b_idx, t_idx, byte_marginals(teacher, trie, at, token, depth, temperature, batch.teacher_ids)
    finally:
        for h in hooks:
            h.remove()
    return captured.get("k"), captured["last"], dense


def byte_kl(student_logits: torch.Tensor, b_idx, t_idx, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over queries of KL(teacher || student) on the 256 byte ids, at temperature T
    (scaled by T^2 as usual)."""
    s = student_logits[b_idx, t_idx, OFFSET:OFFSET + 256].float() / temperature
    logq = F.log_softmax(s, dim=-1)
    kl = (target * (target.clamp(min=1e-30).log() - logq)).sum(-1)
    return kl.sum() * temperature**2


def encoder_half(blt, patch_embeds: torch.Tensor, k: int) -> torch.Tensor:
    """The encoder's patch outputs through the first ``k`` (frozen) global layers."""
    from transformers.masking_utils import create_causal_mask

    gt = blt.model.global_transformer
    h = gt.token_embedding_projection(patch_embeds)
    pos = torch.arange(h.shape[1], device=h.device)[None]
    pe = gt.rotary_emb(h, pos)
    mask = create_causal_mask(config=blt.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=None)
    for layer in gt.layers[:k]:
        h = layer(h, position_embeddings=pe, attention_mask=mask)
    return h


def distill_losses(blt, batch: AlignedBatch, teacher_k, teacher_last, dense, spec) -> dict:
    """Summed terms of one batch: byte cross-entropy (``ce``) and dense KL (``kl``, against
    ``dense``, :func:`teacher_states`' targets) of the decoder half, relative squared error of the
    encoder half (``enc``), and the counts that normalise them (``n_bytes``, ``n_patches``)."""
    captured = {}

    def teacher_global(patch_embeds):  # the decoder half reads the teacher's states
        captured["patch_embeds"] = patch_embeds
        return teacher_last.to(patch_embeds.dtype)

    logits = blt_forward(blt, batch.input_ids, batch.patch_lengths, global_fn=teacher_global)
    zero = logits.new_zeros((), dtype=torch.float32)
    out = {"ce": summed_nll(logits, batch.labels), "kl": zero, "enc": zero}
    if dense is not None:
        out["kl"] = byte_kl(logits, *dense, spec.temperature)
    valid = batch.patch_lengths > 0
    if spec.encoder:
        # squared error relative to the teacher state's norm: Llama-family models put activations
        # ~10x larger on the first position (an attention sink), which plain MSE would be all about
        h, t = encoder_half(blt, captured["patch_embeds"], spec.encoder_layers).float(), teacher_k.float()
        err = (h - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-6)
        out["enc"] = (err * valid).sum()
    out["n_bytes"] = int((batch.labels != IGNORE_INDEX).sum())
    out["n_patches"] = int(valid.sum())
    return out


def distill_objective(out: dict, spec, n_bytes: int, n_patches: int) -> torch.Tensor:
    """What a distillation step minimises: (ce + kl_weight * kl) per byte for the decoder half,
    plus encoder_weight * enc per patch for the encoder half; ``n_bytes`` / ``n_patches`` count
    the whole step (all micro-batches), so accumulated micro-steps sum to the step's objective."""
    loss = spec.encoder_weight * out["enc"] / max(n_patches, 1)
    if spec.decoder:
        loss = loss + (out["ce"] + spec.kl_weight * out["kl"]) / max(n_bytes, 1)
    return loss


class DistillStage:
    """The runner of a distillation stage (see :mod:`byteify.train.stages`)."""

    def __init__(self, ctx: StageContext):
        from .teacher import run_teacher

        self.ctx, self.spec = ctx, ctx.stage.distill
        base = run_teacher(ctx)
        shared = ctx.shared.get("distill")
        if shared is None:  # built once per run, reused by later distillation stages
            tok = base["tokenizer"]
            shared = ctx.shared["distill"] = {"cutter": WindowCutter(tok, ctx.recipe.data.seq_len),
                                              "val": self._validation_windows(tok)}
        self.teacher, self.trie, self.val_windows = base["teacher"], base["trie"], shared["val"]
        self.stream = AlignedBatches(ctx.sources, shared["cutter"], ctx.micro_batch, ctx.dist.rank, ctx.dist.world,
                                     ctx.seed, ctx.holdout)

    def _validation_windows(self, tok) -> AlignedWindows:
        """The held-out documents, read until they fill ``run.eval_batches`` micro-batches (every
        process reads the same; each evaluates its slice of every batch)."""
        from ..data.streams import held_out_documents

        need, docs, windows = self.ctx.recipe.run.eval_batches * self.ctx.micro_batch, [], 0
        cutter = WindowCutter(tok, self.ctx.recipe.data.seq_len)
        it = held_out_documents(self.ctx.sources, self.ctx.holdout)
        try:
            for doc in it:
                docs.append(doc)
                windows += len(cutter.windows(doc))
                if windows >= need:
                    break
        finally:
            it.close()
        return AlignedWindows(docs, tok, self.ctx.recipe.data.seq_len)

    def _to(self, b: AlignedBatch) -> AlignedBatch:
        return AlignedBatch(*(self.ctx.to_device(getattr(b, f)) for f in AlignedBatch.__dataclass_fields__))

    def _losses(self, b: AlignedBatch) -> dict:
        k = self.spec.encoder_layers if self.spec.encoder else 0
        trie = self.trie if self.spec.decoder and self.spec.kl_weight > 0 else None
        hk, hl, dense = teacher_states(self.teacher, b, k, trie, self.spec.temperature)
        with self.ctx.autocast():
            return self.ctx.module(b.input_ids, b.labels, distill=lambda blt: distill_losses(blt, b, hk, hl, dense, self.spec))

    def step(self) -> StepResult:
        dist = self.ctx.dist
        micro = [self._to(next(self.stream)) for _ in range(self.ctx.stage.grad_accum)]
        n_bytes, n_patches, step_bytes = dist.all_sum(  # over all processes: the objective's normalisers
            sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro), sum(int((b.patch_lengths > 0).sum()) for b in micro),
            sum(int((b.input_ids >= OFFSET).sum()) for b in micro))
        loss = ce = kl = enc = 0.0
        for i, b in enumerate(micro):
            set_gradient_sync(self.ctx.module, i == len(micro) - 1)
            out = self._losses(b)
            objective = distill_objective(out, self.spec, n_bytes, n_patches)
            (objective * dist.world).backward()  # FSDP averages gradients over processes
            loss += float(objective.detach())
            ce, kl, enc = ce + float(out["ce"].detach()), kl + float(out["kl"].detach()), enc + float(out["enc"].detach())
        loss, ce, kl, enc = dist.all_sum(loss, ce, kl, enc)
        extras = {"distill_ce": ce / max(n_bytes, 1), "distill_kl": kl / max(n_bytes, 1),
                  "encoder_rel_err": enc / max(n_patches, 1)}
        return StepResult(loss, int(step_bytes), extras, bpb=ce / max(n_bytes, 1) / LN2)

    @torch.no_grad()
    def validate(self) -> dict:
        dist, per = self.ctx.dist, self.ctx.micro_batch
        self.ctx.module.eval()
        ce = n = enc = n_p = 0.0
        windows = len(self.val_windows)
        batches = min(self.ctx.recipe.run.eval_batches, -(-windows // per))
        share = per // dist.world
        for s in range(batches):  # this process's slice of each batch (windows repeat to fill the last)
            idx = [(s * per + dist.rank * share + j) % windows for j in range(share)]
            out = self._losses(self._to(self.val_windows.batch(idx)))
            ce, n = ce + float(out["ce"]), n + out["n_bytes"]
            enc, n_p = enc + float(out["enc"]), n_p + out["n_patches"]
        ce, n, enc, n_p = dist.all_sum(ce, n, enc, n_p)
        self.ctx.module.train()
        res = {"val_distill_bpb": ce / max(n, 1) / math.log(2)}
        if self.spec.encoder:
            res["val_encoder_rel_err"] = enc / max(n_p, 1)
        if self.ctx.patcher is not None:
            res["val_bpb"] = validate_bytes(self.ctx)
        return res
