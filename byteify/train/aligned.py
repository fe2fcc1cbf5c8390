"""Source-token-aligned data for distillation: documents cut into windows whose patches are the
source tokenizer's tokens (BLT patch p = source token p), their batches with the teacher's token
ids and the map from each label byte to the teacher position that predicts it, and the byte trie
over the source vocabulary that turns the teacher's next-token distribution into exact next-byte
distributions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.streams import LaneStream
from ..tokenizer import BOE_ID, BOS_ID, IGNORE_INDEX, OFFSET, token_byte_strings


class ByteTrie:
    """Trie over the token byte strings, stored as tables for vectorised marginals:
    ``node[v, d]`` = trie node after the first d bytes of token v (-1 past its end),
    ``nxt[v, d]`` = byte d of token v (-1 past its end).  Tokens sorted by their bytes put every
    node's subtree in one run ``[lo, hi)`` of the sorted order, so the mass under a node is a
    difference of two prefix sums; each node's children (byte, node) are stored CSR-style."""

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
        # sorted order, and each node's run [lo, hi) in it
        valid = [v for v, b in enumerate(token_bytes) if b]
        order = sorted(valid, key=lambda v: token_bytes[v][:depth])
        rank = np.full(self.vocab, -1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        n_nodes = len(children) + 1
        lo, hi = np.full(n_nodes, len(order), dtype=np.int64), np.zeros(n_nodes, dtype=np.int64)
        rows, cols = np.nonzero(node >= 0)
        np.minimum.at(lo, node[rows, cols], rank[rows])
        np.maximum.at(hi, node[rows, cols], rank[rows] + 1)
        self.order = torch.tensor(order, dtype=torch.long)
        self.lo, self.hi = torch.from_numpy(lo), torch.from_numpy(hi)
        parent = np.array([p for (p, _) in children], dtype=np.int64)
        by = np.argsort(parent, kind="stable")
        self.child_byte = torch.tensor([b for (_, b) in children], dtype=torch.long)[by]
        self.child_node = torch.tensor(list(children.values()), dtype=torch.long)[by]
        self.child_ptr = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n_nodes))]))
        self._on: dict = {}  # device -> the tables there

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The lookup tables on ``device`` (copied there once): marginals run where the teacher's
        probabilities are, so they never leave the GPU."""
        names = ("order", "node", "child_ptr", "child_node", "child_byte", "lo", "hi")
        if device not in self._on:
            self._on[device] = tuple(getattr(self, n).to(device) for n in names)
        return self._on[device]

    def marginals(self, probs: torch.Tensor, token: torch.Tensor, depth: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """Next-byte distributions [Q, 256] for Q queries, on ``probs``' device: ``probs`` [U, V]
        next-token distributions, ``which`` [Q] the row of ``probs`` each query reads (default:
        row q), ``token`` [Q] the actual token, ``depth`` [Q] bytes of it already seen.  Mass of
        the tokens that share those bytes and go on, grouped by their next byte."""
        dev = probs.device
        order, node, child_ptr, child_node, child_byte, lo, hi = self._tables(dev)
        token, depth = token.to(dev), depth.to(dev)
        which = torch.arange(len(token), device=dev) if which is None else which.to(dev)
        if len(token) == 0:
            return torch.zeros(0, 256, dtype=probs.dtype, device=dev)
        cum = torch.zeros(probs.shape[0], len(order) + 1, dtype=torch.float64, device=dev)
        torch.cumsum(probs[:, order].double(), dim=1, out=cum[:, 1:])
        prefix = node[token, depth.clamp(max=self.depth - 1)]  # [Q]
        start, count = child_ptr[prefix], child_ptr[prefix + 1] - child_ptr[prefix]
        q = torch.repeat_interleave(torch.arange(len(token), device=dev), count)
        k = start[q] + torch.arange(len(q), device=dev) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        child, row = child_node[k], which[q]
        mass = cum[row, hi[child]] - cum[row, lo[child]]
        dist = torch.zeros(len(token), 256, dtype=torch.float64, device=dev)
        dist.index_put_((q, child_byte[k]), mass, accumulate=True)
        return (dist / dist.sum(1, keepdim=True).clamp(min=1e-30)).to(probs.dtype)


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


class WindowCutter:
    """Cuts documents into token-aligned windows of at most ``seq_len`` bytes (plus BOS): runs of
    whole source tokens, each window a tuple (bytes, token ids, token byte lengths, the next
    token id or -1, the next byte or -1); and collates windows into an :class:`AlignedBatch`."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.bos
        self.table = token_byte_strings(tokenizer)

    def windows(self, doc: bytes) -> list[tuple]:
        text_bytes = doc.decode("utf-8", errors="replace").encode("utf-8")
        ids, lens = tokenize_document(self.tokenizer, doc, self.table)
        out, i, pos = [], 0, 0
        while i < len(ids):
            j, n = i, 0
            while j < len(ids) and n + lens[j] <= self.seq_len - 1:
                n += lens[j]
                j += 1
            if j == i:  # a single token longer than the window: skip it
                pos += lens[i]
                i += 1
                continue
            nxt_tok = ids[j] if j < len(ids) else -1
            nxt_byte = text_bytes[pos + n] if pos + n < len(text_bytes) else -1
            out.append((text_bytes[pos:pos + n], ids[i:j], lens[i:j], nxt_tok, nxt_byte))
            pos += n
            i = j
        return out

    def collate(self, rows: list[tuple]) -> AlignedBatch:
        B, T = len(rows), self.seq_len
        P = max(len(r[1]) for r in rows) + 1
        input_ids = torch.full((B, T), BOE_ID, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
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


class AlignedWindows:
    """The windows of a list of documents, held in memory (validation text, tests)."""

    def __init__(self, docs: list[bytes], tokenizer, seq_len: int):
        self.cutter = WindowCutter(tokenizer, seq_len)
        self.seq_len = seq_len
        self.windows = [w for doc in docs for w in self.cutter.windows(doc)]

    def __len__(self):
        return len(self.windows)

    def batch(self, indices) -> AlignedBatch:
        return self.cutter.collate([self.windows[i] for i in indices])


class WindowPacker:
    """A :class:`byteify.data.streams.Packer` of token-aligned windows: a document's windows in
    order; offsets count windows (a window never spans documents)."""

    def __init__(self, cutter: WindowCutter):
        self.cutter = cutter
        self.fingerprint = {"packer": "WindowPacker", "seq_len": cutter.seq_len, "vocab": len(cutter.table)}

    def items(self, docs, offset=0):
        for pos, doc in docs:
            windows = self.cutter.windows(doc)
            for k in range(offset, len(windows)):
                yield windows[k], pos, k + 1
            offset = 0


class AlignedBatches:
    """Endless token-aligned training batches of this rank, streamed like byte batches (lanes,
    weights, held-out documents skipped, a resumable position valid for any world size; see
    :class:`byteify.data.streams.LaneStream`)."""

    def __init__(self, sources: list, cutter: WindowCutter, lanes: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, holdout=None):
        self.cutter = cutter
        self.stream = LaneStream(sources, lambda: WindowPacker(cutter), lanes, rank, world_size, seed, holdout)

    def __iter__(self):
        return self

    def __next__(self) -> AlignedBatch:
        return self.cutter.collate(self.stream.next_items())

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, states) -> None:
        self.stream.load_state_dict(states)
