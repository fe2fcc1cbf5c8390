"""Source-aligned distillation (the first stage of byte-ifying, as in Bolmo): patches at the
source tokenizer's token boundaries, the source model as teacher, the global transformer frozen,
and its two halves trained apart:

* decoder half: the local decoder reads the teacher's final (pre-norm) hidden state of patch j in
  place of the global output and predicts the bytes of patch j+1, with byte cross-entropy plus
  a dense term: the teacher's next-token distribution marginalised byte by byte over the tokens
  whose bytes extend the current prefix (a byte trie over the source vocabulary), i.e. an exact
  teacher distribution for every byte of the next token;
* encoder half: the local encoder's patch outputs, passed through the first k frozen global
  layers, match the teacher's hidden states after layer k (mean squared error).

BLT patch p holds source token p (patch 0 = BOS = the teacher's BOS position), so global state p
and teacher position p describe the same prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .tokenizer import BOE_ID, BOS_ID, OFFSET

IGNORE = -100


# ---------------------------------------------------------------------------------------------
def token_byte_strings(tokenizer) -> list[bytes | None]:
    """The bytes each vocabulary entry stands for (None for special/control tokens)."""
    from tokenizers import decoders

    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
    if byte_level:
        from .tokenizer import _byte_level_alphabet

        inverse = {ch: b for b, ch in enumerate(_byte_level_alphabet())}
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for piece, idx in vocab.items():
        if idx in specials:
            continue
        if byte_level:
            try:
                out[idx] = bytes(inverse[c] for c in piece)
            except KeyError:
                out[idx] = None
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out[idx] = bytes([int(piece[3:5], 16)])
        else:
            out[idx] = piece.replace("\u2581", " ").encode("utf-8")
    return out


class ByteTrie:
    """Trie over the token byte strings, stored as tables for vectorised marginals:
    ``node[v, d]`` = trie node after the first d bytes of token v (-1 past its end),
    ``nxt[v, d]`` = byte d of token v (-1 past its end)."""

    def __init__(self, token_bytes: list[bytes | None], max_depth: int = 32):
        self.vocab = len(token_bytes)
        lengths = [len(b) if b else 0 for b in token_bytes]
        depth = min(max_depth, max(lengths))
        node = np.full((self.vocab, depth + 1), -1, dtype=np.int64)
        nxt = np.full((self.vocab, depth + 1), -1, dtype=np.int64)
        children: dict[tuple[int, int], int] = {}
        for v, b in enumerate(token_bytes):
            if not b:
                continue
            cur = 0
            node[v, 0] = 0
            for d, byte in enumerate(b[:depth]):
                nxt[v, d] = byte
                cur = children.setdefault((cur, byte), len(children) + 1)
                node[v, d + 1] = cur
        self.node = torch.from_numpy(node)
        self.nxt = torch.from_numpy(nxt)
        self.depth = depth

    def marginals(self, probs: torch.Tensor, token: torch.Tensor, depth: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """Next-byte distributions [Q, 256] for Q queries: ``probs`` [Q, V] the teacher's
        next-token distribution, ``token`` [Q] the actual token, ``depth`` [Q] bytes of it already
        seen.  Mass of the tokens that share those bytes and go on, grouped by their next byte."""
        out = []
        depth = depth.clamp(max=self.depth - 1)
        for s in range(0, len(token), chunk):
            t, d, p = token[s:s + chunk], depth[s:s + chunk], probs[s:s + chunk]
            prefix_node = self.node[t, d]  # [q]
            nodes_at = self.node[:, d].T  # [q, V]
            nxt_at = self.nxt[:, d].T  # [q, V]
            mask = (nodes_at == prefix_node[:, None]) & (nxt_at >= 0)
            vals = torch.where(mask, p, torch.zeros((), dtype=p.dtype))
            dist = torch.zeros(len(t), 256, dtype=p.dtype)
            dist.scatter_add_(1, nxt_at.clamp(min=0), vals)
            out.append(dist / dist.sum(1, keepdim=True).clamp(min=1e-30))
        return torch.cat(out) if out else torch.zeros(0, 256)


# ---------------------------------------------------------------------------------------------
@dataclass
class AlignedBatch:
    input_ids: torch.Tensor  # [B, T] BLT ids (BOS + bytes, BOE padding)
    labels: torch.Tensor  # [B, T] next byte ids, -100 where unknown/padding
    patch_lengths: torch.Tensor  # [B, P] BOS patch, one patch per token, last + 1 (next byte)
    teacher_ids: torch.Tensor  # [B, P] source token ids (BOS first), padded
    next_token: torch.Tensor  # [B, P] the token after position p (-1 unknown)
    byte_patch: torch.Tensor  # [B, T] teacher position whose prediction covers label byte t (-1 none)
    byte_depth: torch.Tensor  # [B, T] depth of the label byte inside its token


def tokenize_document(tokenizer, doc: bytes, token_bytes: list[bytes | None] | None = None) -> tuple[list[int], list[int]]:
    """Token ids and the number of document bytes each covers.  Byte-level BPE tokens can split a
    UTF-8 character; their own byte strings (``token_bytes``) then give exact lengths.  Otherwise
    (e.g. sentencepiece's added prefix space) lengths come from the fast tokenizer's offsets."""
    text = doc.decode("utf-8", errors="replace")
    raw = text.encode("utf-8")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if token_bytes is not None:
        pieces = [token_bytes[i] if i < len(token_bytes) else None for i in ids]
        if all(p is not None for p in pieces) and b"".join(pieces) == raw:
            return ids, [len(p) for p in pieces]
    char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum([len(c.encode("utf-8")) for c in text], out=char_to_byte[1:])
    out_ids, lens, pos = [], [], 0
    for tid, (a, b) in zip(ids, enc["offset_mapping"]):
        end = int(char_to_byte[b])
        if end <= pos:
            continue  # a token covering no new bytes: fold it into the previous patch
        out_ids.append(tid)
        lens.append(end - pos)
        pos = end
    if lens and pos < len(raw):
        lens[-1] += len(raw) - pos
    return out_ids, lens


class AlignedWindows:
    """Documents cut into token-aligned windows of at most ``seq_len`` bytes (plus BOS)."""

    def __init__(self, docs: list[bytes], tokenizer, seq_len: int):
        self.seq_len = seq_len
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.bos
        self.windows = []  # (bytes, token ids, token lengths, next token id or -1, next byte or -1)
        table = token_byte_strings(tokenizer)
        for doc in docs:
            text_bytes = doc.decode("utf-8", errors="replace").encode("utf-8")
            ids, lens = tokenize_document(tokenizer, doc, table)
            i, pos = 0, 0
            while i < len(ids):
                j, n = i, 0
                while j < len(ids) and n + lens[j] <= seq_len - 1:
                    n += lens[j]
                    j += 1
                if j == i:  # a single token longer than the window: skip it
                    pos += lens[i]
                    i += 1
                    continue
                nxt_tok = ids[j] if j < len(ids) else -1
                nxt_byte = text_bytes[pos + n] if pos + n < len(text_bytes) else -1
                self.windows.append((text_bytes[pos:pos + n], ids[i:j], lens[i:j], nxt_tok, nxt_byte))
                pos += n
                i = j

    def __len__(self):
        return len(self.windows)

    def batch(self, indices) -> AlignedBatch:
        rows = [self.windows[i] for i in indices]
        B, T = len(rows), self.seq_len
        P = max(len(r[1]) for r in rows) + 1
        input_ids = torch.full((B, T), BOE_ID, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        lengths = torch.zeros((B, P), dtype=torch.long)
        teacher_ids = torch.full((B, P), self.pad, dtype=torch.long)
        next_token = torch.full((B, P), -1, dtype=torch.long)
        byte_patch = torch.full((B, T), -1, dtype=torch.long)
        byte_depth = torch.zeros((B, T), dtype=torch.long)
        for b, (data, ids, lens, nxt_tok, nxt_byte) in enumerate(rows):
            n = len(data)
            seq = [BOS_ID] + [x + OFFSET for x in data]
            input_ids[b, : n + 1] = torch.tensor(seq)
            labels[b, :n] = torch.tensor(seq[1:])
            if nxt_byte >= 0:
                labels[b, n] = nxt_byte + OFFSET
            lengths[b, : len(ids) + 1] = torch.tensor([1] + list(lens))
            lengths[b, len(ids)] += 1  # BLT's include-next-byte convention
            teacher_ids[b, 0] = self.bos
            teacher_ids[b, 1: len(ids) + 1] = torch.tensor(ids)
            next_token[b, : len(ids)] = torch.tensor(ids)
            next_token[b, len(ids)] = nxt_tok
            # label byte at input position t is byte t+1 of the sequence: token q's byte (t+1 - start_q)
            pos = 1
            for q, ln in enumerate(lens, start=1):
                for d in range(ln):
                    byte_patch[b, pos - 1 + d] = q - 1
                    byte_depth[b, pos - 1 + d] = d
                pos += ln
            if nxt_byte >= 0 and nxt_tok >= 0:
                byte_patch[b, n] = len(ids)
                byte_depth[b, n] = 0
        return AlignedBatch(input_ids, labels, lengths, teacher_ids, next_token, byte_patch, byte_depth)


# ---------------------------------------------------------------------------------------------
def teacher_states(teacher, teacher_ids: torch.Tensor, k: int):
    """Teacher forward: (hidden after layer k, final pre-norm hidden, next-token logits)."""
    captured = {}
    hooks = []
    if k > 0:
        hooks.append(teacher.model.layers[k - 1].register_forward_hook(
            lambda mod, args, out: captured.__setitem__("k", out[0] if isinstance(out, tuple) else out)))
    hooks.append(teacher.model.layers[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            logits = teacher(teacher_ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return captured.get("k"), captured["last"], logits


def dense_targets(trie: ByteTrie, logits: torch.Tensor, batch: AlignedBatch, temperature: float):
    """(flat byte positions, teacher next-byte distributions [Q, 256]) for every label byte that
    has a teacher prediction."""
    b_idx, t_idx = torch.nonzero(batch.byte_patch >= 0, as_tuple=True)
    p_idx = batch.byte_patch[b_idx, t_idx]
    token = batch.next_token[b_idx, p_idx]
    keep = token >= 0
    b_idx, t_idx, p_idx, token = b_idx[keep], t_idx[keep], p_idx[keep], token[keep]
    probs = (logits[b_idx, p_idx].float() / temperature).softmax(-1)
    dist = trie.marginals(probs, token, batch.byte_depth[b_idx, t_idx])
    return b_idx, t_idx, dist


def byte_kl(student_logits: torch.Tensor, b_idx, t_idx, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over queries of KL(teacher || student) on the 256 byte ids, at temperature T
    (scaled by T^2 as usual)."""
    s = student_logits[b_idx, t_idx, OFFSET:OFFSET + 256].float() / temperature
    logq = F.log_softmax(s, dim=-1)
    kl = (target * (target.clamp(min=1e-30).log() - logq)).sum(-1)
    return kl.sum() * temperature**2


class _TeacherGlobal(torch.nn.Module):
    """Stands in for the global transformer during the decoder half: records the encoder's patch
    outputs and returns the teacher's final hidden states."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states, self.inputs = states, None

    def forward(self, inputs_embeds, **kwargs):
        self.inputs = inputs_embeds
        return self.states.to(inputs_embeds.dtype)


def distill_losses(blt, batch: AlignedBatch, teacher_k, teacher_last, teacher_logits, trie: ByteTrie, spec) -> dict:
    """Summed losses of one batch: byte cross-entropy and dense KL of the decoder half, squared
    error of the encoder half (plus the counts to normalise them)."""
    from .generation import _window_mask

    m = blt.model
    real_global = m.global_transformer
    stub = _TeacherGlobal(teacher_last)
    m.global_transformer = stub
    try:
        logits = blt(input_ids=batch.input_ids, patch_lengths=batch.patch_lengths, use_cache=False).logits
    finally:
        m.global_transformer = real_global
    zero = logits.new_zeros(())
    out = {"ce": zero, "kl": zero, "enc": zero}
    n_bytes = int((batch.labels != IGNORE).sum())
    out["ce"] = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    if spec.decoder and spec.kl_weight > 0:
        b_idx, t_idx, target = dense_targets(trie, teacher_logits, batch, spec.temperature)
        out["kl"] = byte_kl(logits, b_idx, t_idx, target, spec.temperature)
    valid = batch.patch_lengths > 0
    if spec.encoder:
        h = real_global.token_embedding_projection(stub.inputs)
        P = h.shape[1]
        pos = torch.arange(P, device=h.device)
        pe = real_global.rotary_emb(h, pos[None])
        mask = _window_mask(pos, pos, None, h.dtype)
        for layer in real_global.layers[: spec.encoder_layers]:
            h = layer(h, position_embeddings=pe, attention_mask=mask)
        # squared error relative to the teacher state's norm: Llama-family models put activations
        # ~10x larger on the first position (an attention sink), which plain MSE would be all about
        t = teacher_k.float()
        err = (h.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-6)
        out["enc"] = (err * valid).sum()
    out["n_bytes"] = n_bytes
    out["n_patches"] = int(valid.sum())
    out["loss"] = (out["ce"] + spec.kl_weight * out["kl"]) / max(n_bytes, 1) * (1.0 if spec.decoder else 0.0) \
        + spec.encoder_weight * out["enc"] / max(out["n_patches"], 1)
    return out


# ---------------------------------------------------------------------------------------------
class AlignedBatches:
    """Deterministic, resumable order over token-aligned windows (a permutation per epoch)."""

    def __init__(self, windows: AlignedWindows, batch_size: int, seed: int):
        if len(windows) < batch_size:
            from .errors import ByteifyError

            raise ByteifyError(f"distillation: {len(windows)} token-aligned windows, fewer than one batch of {batch_size}")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.windows))

    def __iter__(self):
        return self

    def __next__(self) -> AlignedBatch:
        order, picked = self._order(self.epoch), []
        while len(picked) < self.batch_size:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            picked.append(int(order[self.index]))
            self.index += 1
        return self.windows.batch(picked)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.index = st["epoch"], st["index"]


def split_sources(recipe) -> tuple[list[bytes], list[bytes]]:
    """The recipe's documents split exactly as the byte pipeline splits them (same held-out docs)."""
    from .data import _as_spec, load_documents, split_documents

    train, val = [], []
    for i, src in enumerate(recipe.data.sources):
        t, v = split_documents(load_documents(_as_spec(src)), recipe.data.val_fraction, recipe.seed, i)
        train += t
        val += v
    held = set(val)
    return [d for d in train if d not in held], val


class DistillStage:
    """Step and validation functions of a distillation stage, for ``Trainer._run_stage``."""

    def __init__(self, trainer, module, stage, stage_index: int, val=None, patcher=None):
        from .errors import ByteifyError
        from .teacher import load_source_tokenizer, load_teacher

        if trainer.dist.world > 1:
            raise ByteifyError(f"stage '{stage.name}': distillation stages run in a single process")
        self.trainer, self.module, self.stage, self.spec = trainer, module, stage, stage.distill
        cache = trainer.__dict__.setdefault("_distill_cache", {})
        if "teacher" not in cache:
            tok = load_source_tokenizer(trainer.base_model_dir)
            cache["teacher"] = load_teacher(trainer.base_model_dir).to(trainer.dist.device)
            cache["trie"] = ByteTrie(token_byte_strings(tok))
            train_docs, val_docs = split_sources(trainer.recipe)
            seq_len = trainer.recipe.data.seq_len
            cache["train"] = AlignedWindows(train_docs, tok, seq_len)
            cache["val"] = AlignedWindows(val_docs, tok, seq_len)
        self.teacher, self.trie = cache["teacher"], cache["trie"]
        self.val_windows = cache["val"]
        self.per_micro = max(1, stage.batch_bytes // trainer.recipe.data.seq_len // stage.grad_accum)
        self.batches = AlignedBatches(cache["train"], self.per_micro, trainer.recipe.seed + stage_index)
        self.val, self.patcher = val, patcher

    def _to(self, b: AlignedBatch) -> AlignedBatch:
        dev = self.trainer.dist.device
        return AlignedBatch(*(getattr(b, f).to(dev) for f in AlignedBatch.__dataclass_fields__))

    def _losses(self, b: AlignedBatch) -> dict:
        hk, hl, logits = teacher_states(self.teacher, b.teacher_ids, self.spec.encoder_layers if self.spec.encoder else 0)
        with self.trainer._autocast():
            return distill_losses(self.module.blt, b, hk, hl, logits, self.trie, self.spec)

    def step(self):
        micro = [self._to(next(self.batches)) for _ in range(self.stage.grad_accum)]
        n_bytes = sum(int((b.labels != IGNORE).sum()) for b in micro)
        n_patches = sum(int((b.patch_lengths > 0).sum()) for b in micro)
        ce = kl = enc = 0.0
        for b in micro:
            out = self._losses(b)
            loss = (out["ce"] + self.spec.kl_weight * out["kl"]) / max(n_bytes, 1) * float(self.spec.decoder)
            loss = loss + self.spec.encoder_weight * out["enc"] / max(n_patches, 1)
            loss.backward()
            ce, kl, enc = (ce + float(out["ce"].detach()), kl + float(out["kl"].detach()), enc + float(out["enc"].detach()))
        extras = {"distill_kl": kl / max(n_bytes, 1), "encoder_rel_err": enc / max(n_patches, 1)}
        step_bytes = sum(int((b.input_ids >= OFFSET).sum()) for b in micro)
        return ce / max(n_bytes, 1), extras, step_bytes

    @torch.no_grad()
    def validate(self) -> dict:
        self.module.eval()
        ce = n = enc = n_p = 0.0
        idx = list(range(len(self.val_windows)))[: self.trainer.recipe.run.eval_batches * self.per_micro]
        for s in range(0, len(idx), self.per_micro):
            b = self._to(self.val_windows.batch(idx[s:s + self.per_micro]))
            out = self._losses(b)
            ce += float(out["ce"])
            n += out["n_bytes"]
            enc += float(out["enc"])
            n_p += out["n_patches"]
        self.module.train()
        res = {"val_distill_bpb": ce / max(n, 1) / math.log(2)}
        if self.spec.encoder:
            res["val_encoder_rel_err"] = enc / max(n_p, 1)
        if self.val is not None and self.patcher is not None:
            res["val_bpb"] = self.trainer.validate(self.module, self.patcher, self.stage, self.val)
        return res
