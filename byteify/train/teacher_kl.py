"""End-to-end distillation targets (a byte stage's ``teacher_kl``): for packed byte rows, the
source model's exact next-byte distribution at every byte it can predict.

Each run of bytes in a row (a document, or the part of one the row holds) is tokenized with the
source tokenizer (cut to whole UTF-8 characters: a row can start or end inside one) and fed to
the teacher after its BOS (all runs of a micro-batch in one packed teacher sequence, attention
kept inside each run); the teacher's next-token distribution at token q, marginalised by the
byte trie over the tokens that extend the bytes of token q seen so far, is the target for each
byte of token q (the distillation stage's dense term, :func:`byteify.train.distill.teacher_states`,
on packed rows instead of token-aligned windows).  The BLT predicts those bytes under its own
patching and through its own global transformer; only the targets come from the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenizer import OFFSET
from .aligned import ByteTrie, tokenize_document
from .teacher import byte_marginals


@dataclass
class TeacherQueries:
    teacher_ids: torch.Tensor  # [1, N] BOS + source tokens of each byte run, runs one after another
    position_ids: torch.Tensor  # [1, N] positions inside each run
    run: torch.Tensor  # [N] which run each teacher position belongs to
    b: torch.Tensor  # [Q] row of the label byte
    t: torch.Tensor  # [Q] input position whose label it is
    at: torch.Tensor  # [Q] teacher position whose next-token distribution covers it
    token: torch.Tensor  # [Q] the source token the byte belongs to
    depth: torch.Tensor  # [Q] bytes of that token before it

    def attention_mask(self) -> torch.Tensor:
        """[1, 1, N, N] causal attention inside each run."""
        n = self.run.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return (causal & (self.run[:, None] == self.run[None, :]))[None, None]


def whole_characters(data: bytes) -> tuple[int, int]:
    """(start, end) of the longest valid UTF-8 stretch of ``data`` that starts at its first
    character boundary (leading continuation bytes skipped)."""
    lo = 0
    while lo < min(len(data), 3) and data[lo] & 0xC0 == 0x80:
        lo += 1
    try:
        data[lo:].decode("utf-8")
        return lo, len(data)
    except UnicodeDecodeError as e:
        return lo, lo + e.start


def teacher_queries(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer, table: list[bytes | None],
                    max_depth: int) -> TeacherQueries:
    """Where the teacher predicts the labels of packed rows ``input_ids`` / ``labels`` [B, T]:
    one query per label byte inside a tokenized run (bytes of tokens whose byte string is not the
    text's, or deeper than ``max_depth``, get none)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    B, T = input_ids.shape
    full = torch.cat([input_ids, labels[:, -1:].clamp(min=0)], 1).tolist()  # ids 0..T (padding -> BOE)
    seqs, q, offset = [], [], 0  # offset: where the next run starts in the packed teacher sequence
    for b, row in enumerate(full):
        i = 0
        while i <= T:
            if not OFFSET <= row[i] < OFFSET + 256:
                i += 1
                continue
            j = i
            while j <= T and OFFSET <= row[j] < OFFSET + 256:
                j += 1
            data = bytes(v - OFFSET for v in row[i:j])
            lo, hi = whole_characters(data)
            ids, lens = tokenize_document(tokenizer, data[lo:hi], table) if hi > lo else ([], [])
            at = i + lo  # index in ``row`` of the token's first byte; its label position is at - 1
            for k, (tid, n) in enumerate(zip(ids, lens)):
                if tid >= len(table) or table[tid] is None or len(table[tid]) != n:
                    at += n
                    continue
                q.extend((b, at + d - 1, offset + k, tid, d) for d in range(min(n, max_depth)) if at + d >= 1)
                at += n
            if ids:
                seqs.append([bos] + ids)
                offset += len(ids) + 1
            i = j
    seqs = seqs or [[bos]]  # the teacher runs on every micro-batch (sharded, every process must)
    teacher_ids = torch.tensor([x for s in seqs for x in s])[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    run = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])
    cols = torch.tensor(q, dtype=torch.long).reshape(-1, 5).T
    return TeacherQueries(teacher_ids, position_ids, run, *cols)


def teacher_targets(teacher, trie: ByteTrie, queries: TeacherQueries, temperature: float) -> torch.Tensor:
    """The teacher's next-byte distributions [Q, 256] (float32, on the teacher's device) at
    ``queries`` (temperature applied to its token logits)."""
    dev = next(teacher.parameters()).device
    return byte_marginals(teacher, trie, queries.at, queries.token, queries.depth, temperature, queries.teacher_ids,
                          attention_mask=queries.attention_mask().to(dev), position_ids=queries.position_ids.to(dev))


class PackedTeacher:
    """A run's teacher (:func:`byteify.train.teacher.run_teacher`) turned into a ``byte_kl``
    callable for :class:`byteify.train.model.TrainModule`, one micro-batch at a time."""

    def __init__(self, shared: dict, spec):
        from ..tokenizer import token_byte_strings

        self.teacher, self.trie, self.tokenizer = shared["teacher"], shared["trie"], shared["tokenizer"]
        self.table, self.spec = token_byte_strings(self.tokenizer), spec

    def byte_kl(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """``fn(logits) -> summed KL`` for this micro-batch (teacher run here, outside the
        student's forward)."""
        from .distill import byte_kl

        q = teacher_queries(input_ids.cpu(), labels.cpu(), self.tokenizer, self.table, self.trie.depth)
        target = teacher_targets(self.teacher, self.trie, q, self.spec.temperature)

        def fn(logits: torch.Tensor) -> torch.Tensor:
            dev = logits.device
            return byte_kl(logits, q.b.to(dev), q.t.to(dev), target.to(dev), self.spec.temperature)

        return fn
