"""Training streams: the held-out split, lanes, packers and the batches a training step reads.

This module owns everything between opened sources (:mod:`byteify.data.readers`) and the
``{"input_ids", "labels"}`` batches, streaming, with memory independent of the corpus size:

* **Holdout** (:class:`Holdout`, :func:`validation_rows`): a document is held out when a seeded
  blake2b hash of its bytes falls below ``val_fraction`` (identical texts always land on the same
  side, in every source); training skips held-out documents everywhere.  A *small* source (at
  most ``SMALL_SOURCE_DOCS`` documents, found by reading at most that many) that would hold out
  none of its documents holds out its smallest-hash one, one that would hold out all keeps its
  largest-hash one, and a source with a single document holds out its tail (cut at a line break
  near ``1 - val_fraction`` of its bytes).  These decisions depend only on the sources, the
  fraction and the seed, so every rank reaches the same :class:`Holdout` (it is also JSON).
  :func:`validation_rows` reads the sources in turn, a document at a time, only until its rows
  are full: never a full pass of a big corpus.
* **Lanes** (:class:`LaneStream`): a global micro-batch has ``lanes`` slots and slot ``j`` is
  always fed by lane ``j``; rank ``r`` of ``W`` owns lanes ``[r*lanes/W, (r+1)*lanes/W)`` and
  reads only their data.  Per source, when it has at least ``lanes`` units, unit ``i`` belongs to
  lane ``i % lanes`` and each lane visits its units in an order shuffled by (seed, source, lane,
  epoch) (a keyed permutation computed per step, O(1) memory), documents inside a unit in order.  With fewer units (a small corpus, one big
  compressed file) a lane reads the whole source in order and keeps the training documents
  whose index is ``lane (mod lanes)``, or ``lane (mod n)`` when the source has only ``n < lanes``
  of them (learnt from a pass that found nothing, so there is no loop and no lane without data;
  a lane whose units hold no training text falls back to the same rule).  Each lane draws the
  source of its k-th row from the weights with a hash of (seed, lane, k).  The global rows are
  therefore the same for every world size, and a lane's state (rows drawn, and per source the
  position of the next item) restores it exactly without reading anything before it.
* **Packers** (:class:`Packer`): ``items(docs, offset)`` turns a lane's ``(position, bytes)``
  documents into ``(item, next_position, next_offset)``; :class:`ByteRowPacker` makes rows of
  ``seq_len + 1`` ids, each document framed ``[BOS] + (byte + 4)... + [EOS]``, packed across
  documents with no padding (the stream is endless over epochs).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import struct
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from ..errors import ByteifyError
from ..tokenizer import BOE_ID, BOS_ID, EOS_ID, IGNORE_INDEX, OFFSET
from .readers import Source, as_spec, open_source

SMALL_SOURCE_DOCS = 1024  # sources with at most this many documents get the small-corpus guarantee
_ORDER, _MIX = b"byteify-order", b"byteify-mix"


# --------------------------------------------------------------------------------------------
# Holdout


class Holdout:
    """Which documents are validation text: by seeded hash, plus the small-source decisions
    (hex digests held out or kept whatever their hash, and ``cuts``: training gets ``doc[:cut]``,
    validation ``doc[cut:]``).  ``Holdout()`` holds out nothing."""

    def __init__(self, val_fraction: float = 0.0, seed: int = 0, forced: Iterable[str] = (),
                 kept: Iterable[str] = (), cuts: dict[str, int] | None = None):
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.forced, self.kept, self.cuts = frozenset(forced), frozenset(kept), dict(cuts or {})
        self._key = (self.seed % (1 << 64)).to_bytes(8, "little")
        self._limit = int(self.val_fraction * (1 << 64))
        self._active = bool(self._limit or self.forced or self.cuts)

    def digest(self, doc: bytes) -> bytes:
        return hashlib.blake2b(doc, digest_size=16, key=self._key, person=b"byteify-holdout").digest()

    def split(self, doc: bytes) -> tuple[bytes | None, bytes | None]:
        """(training part, validation part) of a document; either may be None."""
        if not self._active:
            return doc, None
        d = self.digest(doc)
        if self.cuts or self.kept or self.forced:
            h = d.hex()
            if h in self.cuts:
                cut = self.cuts[h]
                return doc[:cut] or None, doc[cut:] or None
            if h in self.kept:
                return doc, None
            if h in self.forced:
                return None, doc
        return (None, doc) if int.from_bytes(d[:8], "big") < self._limit else (doc, None)

    def to_dict(self) -> dict:
        return {"val_fraction": self.val_fraction, "seed": self.seed, "forced": sorted(self.forced),
                "kept": sorted(self.kept), "cuts": dict(sorted(self.cuts.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> "Holdout":
        return cls(d["val_fraction"], d["seed"], d.get("forced", ()), d.get("kept", ()), d.get("cuts"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Holdout) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Holdout({self.to_dict()})"


def _tail_cut(doc: bytes, val_fraction: float) -> int:
    """Where a single document's held-out tail starts: near ``1 - val_fraction`` of its bytes,
    moved back to a line start if that at most doubles the tail."""
    cut = min(len(doc) - 1, max(1, len(doc) - max(1, round(len(doc) * val_fraction))))
    nl = doc.rfind(b"\n", 0, cut)
    if nl >= 0 and cut - (nl + 1) <= len(doc) - cut:
        cut = nl + 1
    return cut


def decide_holdout(sources: list, val_fraction: float, seed: int) -> Holdout:
    """The :class:`Holdout` of these sources, reading at most ``SMALL_SOURCE_DOCS + 1`` documents
    of each (from its start)."""
    base = Holdout(val_fraction, seed)
    if val_fraction <= 0:
        return base
    forced, kept, cuts = set(), set(), {}
    for src in (open_source(s) for s in sources):
        seen: dict[bytes, None] = {}
        first, count = None, 0
        docs = src.documents()
        try:
            for _, doc in docs:
                count += 1
                if count > SMALL_SOURCE_DOCS:
                    break
                first = doc if first is None else first
                seen[base.digest(doc)] = None
        finally:
            docs.close()
        if count > SMALL_SOURCE_DOCS:
            continue
        if first is None:
            raise ByteifyError(f"{src.name}: source has no text (no documents, or only empty ones)")
        if len(seen) == 1:
            if len(first) >= 2:
                cuts[base.digest(first).hex()] = _tail_cut(first, val_fraction)
            continue
        held = [d for d in seen if int.from_bytes(d[:8], "big") < base._limit]
        if not held:
            forced.add(min(seen).hex())
        elif len(held) == len(seen):
            kept.add(max(seen).hex())
    return Holdout(val_fraction, seed, forced, kept, cuts)


def frame(doc: bytes) -> np.ndarray:
    """``[BOS] + (byte + 4)... + [EOS]`` as uint16 ids."""
    ids = np.empty(len(doc) + 2, dtype=np.uint16)
    ids[0], ids[-1] = BOS_ID, EOS_ID
    ids[1:-1] = np.frombuffer(doc, dtype=np.uint8)
    ids[1:-1] += OFFSET
    return ids


def _round_robin(sources: list[Source]) -> Iterator[bytes]:
    """One document of each source in turn (canonical order within a source) until all end."""
    its = [s.documents() for s in sources]
    try:
        live = list(its)
        while live:
            for it in list(live):
                item = next(it, None)
                if item is None:
                    live.remove(it)
                else:
                    yield item[1]
    finally:
        for it in its:
            it.close()


def held_out_documents(sources: list, holdout: Holdout) -> Iterator[bytes]:
    """The held-out parts of the sources' documents, one source after another in turn (a
    document of each), read lazily: consume only what you need."""
    docs = _round_robin([open_source(s) for s in sources])
    try:
        for doc in docs:
            _, val = holdout.split(doc)
            if val:
                yield val
    finally:
        docs.close()


def pack_rows(docs: Iterable[bytes], seq_len: int, max_rows: int | None = None) -> np.ndarray:
    """Documents framed and packed into at most ``max_rows`` rows of ``seq_len + 1`` ids (uint16),
    the last partial row padded with BOE (labels -100); reads ``docs`` only until the rows are full."""
    row = seq_len + 1
    limit = max_rows if max_rows is not None else float("inf")
    out: list[np.ndarray] = []
    pending, fill = [], 0
    for doc in docs:
        if len(out) >= limit:
            break
        pending.append(frame(doc))
        fill += len(pending[-1])
        if fill >= row:
            cat = np.concatenate(pending)
            k = int(min(fill // row, limit - len(out)))
            out.extend(cat[: k * row].reshape(k, row))
            pending, fill = [cat[k * row:]], len(cat) - k * row
    if len(out) < limit and fill >= 2:  # pad the last partial row (a lone id has no target)
        cat = np.concatenate(pending)
        out.append(np.concatenate([cat, np.full(row - len(cat), BOE_ID, dtype=np.uint16)]))
    return np.stack(out) if out else np.zeros((0, row), dtype=np.uint16)


def validation_rows(sources: list, seq_len: int, val_fraction: float, seed: int,
                    max_rows: int | None = None) -> tuple[np.ndarray, Holdout]:
    """(rows, holdout): held-out text packed into at most ``max_rows`` rows of ``seq_len + 1``
    ids (uint16; the last row padded with BOE, whose labels become -100), found by reading the
    sources in turn, a document at a time, only until the rows are full (``None``: all of them),
    and the :class:`Holdout` the training streams must take."""
    _check_args(seq_len, val_fraction)
    opened = [open_source(s) for s in sources]
    holdout = decide_holdout(opened, val_fraction, seed)
    if val_fraction <= 0 or max_rows == 0:
        return np.zeros((0, seq_len + 1), dtype=np.uint16), holdout
    docs = held_out_documents(opened, holdout)
    try:
        return pack_rows(docs, seq_len, max_rows), holdout
    finally:
        docs.close()


def validation_batches(rows: np.ndarray, batch_size: int, max_batches: int | None = None, rank: int = 0,
                       world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Validation rows in their fixed order as batches of exactly ``batch_size`` rows (global;
    this rank gets its slice), the last filled with all-ignored rows (BOE inputs, labels -100)
    so that shapes are static and rank slices equal.  Average the loss over labels != -100."""
    if batch_size % world_size:
        raise ByteifyError(f"data: {batch_size} validation sequences do not split over {world_size} ranks")
    per = batch_size // world_size
    n_batches = -(-len(rows) // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        chunk = rows[b * batch_size + rank * per: b * batch_size + (rank + 1) * per]
        if len(chunk) < per:
            chunk = np.concatenate([chunk, np.full((per - len(chunk), rows.shape[1]), BOE_ID, dtype=rows.dtype)])
        yield to_batch(chunk)


def _check_args(seq_len: int, val_fraction: float) -> None:
    if seq_len < 1:
        raise ByteifyError(f"data: seq_len must be at least 1, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ByteifyError(f"data: val_fraction must be in [0, 1), got {val_fraction}")


# --------------------------------------------------------------------------------------------
# Packers


class Packer(Protocol):
    """Turns a lane's documents into items.  ``docs`` yields ``(position, bytes)`` from some
    position; ``offset`` is how much of the first document was already consumed (in the
    packer's own units); after each item the packer reports where the next one starts (a
    document position and an offset in it; an offset equal to the document's length means the
    next document).  ``fingerprint`` (JSON) must change whenever the items would."""

    fingerprint: dict

    def items(self, docs: Iterator[tuple[Any, bytes]], offset: int) -> Iterator[tuple[Any, Any, int]]: ...


class ByteRowPacker:
    """Rows of ``seq_len + 1`` uint16 ids (input ``row[:-1]``, labels ``row[1:]``), packing framed
    documents back to back across document boundaries; offsets count framed ids (length + 2)."""

    def __init__(self, seq_len: int):
        if seq_len < 1:
            raise ByteifyError(f"data: seq_len must be at least 1, got {seq_len}")
        self.seq_len = seq_len
        self.fingerprint = {"packer": "ByteRowPacker", "seq_len": seq_len}

    def items(self, docs, offset=0):
        width = self.seq_len + 1
        buf, fill = np.empty(width, dtype=np.uint16), 0
        for pos, doc in docs:
            n, start, offset = len(doc) + 2, offset, 0
            while start < n:
                take = min(width - fill, n - start)
                _frame_into(buf[fill: fill + take], doc, start)
                fill, start = fill + take, start + take
                if fill == width:
                    yield buf.copy(), pos, start
                    fill = 0


def _frame_into(out: np.ndarray, doc: bytes, start: int) -> None:
    """Framed ids ``[start, start + len(out))`` of ``doc`` into ``out``, without framing all of it."""
    i, a, stop = 0, start, start + len(out)
    if a == 0:
        out[0], i, a = BOS_ID, 1, 1
    hi = min(stop, len(doc) + 1)
    if hi > a:
        out[i: i + hi - a] = np.frombuffer(doc, dtype=np.uint8, count=hi - a, offset=a - 1)
        out[i: i + hi - a] += OFFSET
    if stop == len(doc) + 2:
        out[-1] = EOS_ID


# --------------------------------------------------------------------------------------------
# Lanes


class _LaneDocs:
    """The training documents one lane reads from one source, endless over epochs, as
    ``(position, bytes)``; a position restarts the sequence at its document.  Positions are
    ``["u", epoch, k, within]`` (k-th unit of the epoch's order) or ``["s", epoch, [unit,
    within], t, n]`` (t: the document's index among the source's training documents; n: their
    number, once a pass found nothing for this lane)."""

    def __init__(self, source: Source, source_index: int, lane: int, lanes: int, seed: int, holdout: Holdout):
        self.source, self.index, self.lane, self.lanes = source, source_index, lane, lanes
        self.seed, self.holdout = seed, holdout
        n = source.num_units()
        self.count = (n - lane + lanes - 1) // lanes if n >= lanes else None  # units i = lane (mod lanes)

    def documents(self, position=None) -> Iterator[tuple[list, bytes]]:
        if position is None:
            position = ["u", 0, 0, None] if self.count is not None else ["s", 0, None, 0, None]
        if position[0] == "u":
            epoch = yield from self._by_units(*position[1:])
            position = ["s", epoch, None, 0, None]
        yield from self._by_stride(*position[1:])

    def _by_units(self, epoch, k, within):
        while True:
            key = struct.pack("<QQQQ", self.seed % (1 << 64), self.index, self.lane, epoch)
            found = False
            for kk in range(k, self.count):
                unit = self.lane + self.lanes * _permuted(kk, self.count, key)
                for at, doc in self.source.read_unit(unit, within if kk == k else None):
                    train, _ = self.holdout.split(doc)
                    if train:
                        found = True
                        yield ["u", epoch, kk, at], train
            if not found and k == 0 and within is None:
                return epoch  # these units hold no training text: read the whole source instead
            epoch, k, within = epoch + 1, 0, None

    def _by_stride(self, epoch, at, t, n):
        while True:
            m = self.lanes if n is None else min(self.lanes, n)
            count, found = t, False
            for pos, doc in self.source.documents(at):
                train, _ = self.holdout.split(doc)
                if not train:
                    continue
                if count % m == self.lane % m:
                    found = True
                    yield ["s", epoch, pos, count, n], train
                count += 1
            if not found and at is None:
                if count == 0:
                    raise ByteifyError(f"{self.source.name}: no training text left: every document is held out for validation")
                if n is not None:
                    raise ByteifyError(f"{self.source.name}: the source changed while it was being read")
                n = count  # fewer training documents than lanes: this lane reads document lane % n
            epoch, at, t = epoch + 1, None, 0


def _permuted(k: int, m: int, key: bytes) -> int:
    """Element ``k`` of a keyed pseudorandom permutation of ``range(m)`` in O(1) memory (a
    4-round Feistel network on the next even power of two, cycle-walking back into range)."""
    half = max(1, ((m - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = k
    while True:
        left, right = x >> half, x & mask
        for rnd in range(4):
            f = hashlib.blake2b(struct.pack("<QB", right, rnd), digest_size=8, key=key, person=_ORDER).digest()
            left, right = right, left ^ (int.from_bytes(f, "little") & mask)
        x = (left << half) | right
        if x < m:
            return x


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _difference(saved, here, path: str = "") -> str | None:
    if isinstance(saved, dict) and isinstance(here, dict):
        for key in sorted(set(saved) | set(here), key=str):
            d = _difference(saved.get(key), here.get(key), f"{path}.{key}" if path else str(key))
            if d:
                return d
        return None
    if isinstance(saved, list) and isinstance(here, list) and len(saved) == len(here):
        for i, (a, b) in enumerate(zip(saved, here)):
            d = _difference(a, b, f"{path}.{i}")
            if d:
                return d
        return None
    return None if saved == here else f"{path} is {json.dumps(saved)} in the saved position, {json.dumps(here)} here"


def merge_states(states: Iterable[dict]) -> dict:
    """The union of several ranks' :meth:`LaneStream.state_dict` results."""
    merged: dict = {}
    for state in states:
        if not merged:
            merged = {"fingerprint": state["fingerprint"], "lanes": {}}
        elif _jsonable(state["fingerprint"]) != _jsonable(merged["fingerprint"]):
            raise ByteifyError("data: cannot resume: the ranks' saved data positions are for different runs "
                               f"({_difference(state['fingerprint'], merged['fingerprint'])})")
        merged["lanes"].update(state["lanes"])
    if not merged:
        raise ByteifyError("data: cannot resume: no saved data position given")
    return merged


class LaneStream:
    """The items of this rank's lanes, one per lane per micro-batch (see the module docstring).

    ``sources``: specs, dicts, paths or opened :class:`Source` objects (weights from the specs,
    or a ``weight`` attribute, default 1); ``packer_factory()`` makes one packer per lane and
    source; ``lanes``: sequences per global micro-batch; ``holdout``: from :func:`validation_rows`
    (None: nothing held out)."""

    def __init__(self, sources: list, packer_factory: Callable[[], Packer], lanes: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, holdout: Holdout | None = None):
        if lanes < 1:
            raise ByteifyError(f"data: need at least one sequence per micro-batch, got {lanes}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ByteifyError(f"data: rank {rank} is outside world_size {world_size}")
        if lanes % world_size:
            raise ByteifyError(f"data: {lanes} sequences per micro-batch do not split over {world_size} ranks")
        if not sources:
            raise ByteifyError("data: no sources given")
        weights = [float(getattr(s, "weight", 1.0)) if isinstance(s, Source) else as_spec(s).weight for s in sources]
        self.sources = [open_source(s, min_units=lanes) for s in sources]
        for src in self.sources:
            src.first_document()
        self.holdout = holdout or Holdout()
        self.lanes, self.seed, self.weights = lanes, int(seed), weights
        self._cum = np.cumsum(weights) / sum(weights)
        self._factory = packer_factory
        per = lanes // world_size
        self.my_lanes = list(range(rank * per, (rank + 1) * per))
        packer = packer_factory()
        self.fingerprint = _jsonable({
            "seed": self.seed, "lanes": lanes,
            "sources": [dict(src.fingerprint, weight=w, units=src.num_units()) for src, w in zip(self.sources, weights)],
            "packer": getattr(packer, "fingerprint", {"packer": type(packer).__name__}),
            "holdout": self.holdout.to_dict(),
        })
        self._state = {lane: {"rows": 0, "sources": [[None, 0] for _ in self.sources]} for lane in self.my_lanes}
        self._gens: dict[tuple[int, int], Iterator] = {}

    def _pick(self, lane: int, row: int) -> int:
        """The source of a lane's ``row``-th item, drawn from the weights."""
        if len(self.sources) == 1:
            return 0
        h = hashlib.blake2b(struct.pack("<QQQ", self.seed % (1 << 64), lane, row), digest_size=8, person=_MIX).digest()
        return min(bisect.bisect_right(self._cum, int.from_bytes(h, "little") / (1 << 64)), len(self.sources) - 1)

    def next_items(self) -> list:
        """One item per lane of this rank, in lane order (this rank's slice of a micro-batch)."""
        items = []
        for lane in self.my_lanes:
            state = self._state[lane]
            s = self._pick(lane, state["rows"])
            gen = self._gens.get((lane, s))
            if gen is None:
                pos, offset = state["sources"][s]
                docs = _LaneDocs(self.sources[s], s, lane, self.lanes, self.seed, self.holdout).documents(pos)
                gen = self._gens[(lane, s)] = self._factory().items(docs, offset)
            item, pos, offset = next(gen)
            state["sources"][s] = [pos, offset]
            state["rows"] += 1
            items.append(item)
        return items

    def state_dict(self) -> dict:
        """JSON: this rank's lanes' positions (keyed by lane) and what they are valid for."""
        return _jsonable({"fingerprint": self.fingerprint, "lanes": {str(k): v for k, v in self._state.items()}})

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Restore from the union of all ranks' state dicts (one merged dict or a list of them);
        this rank takes its own lanes, whatever the world size that saved them."""
        merged = merge_states([states] if isinstance(states, dict) else states)
        diff = _difference(_jsonable(merged["fingerprint"]), self.fingerprint)
        if diff:
            raise ByteifyError(f"data: cannot resume: the saved data position is for another setup ({diff})")
        missing = [lane for lane in self.my_lanes if str(lane) not in merged["lanes"]]
        if missing:
            have = ", ".join(sorted(merged["lanes"], key=int)) or "none"
            raise ByteifyError(f"data: cannot resume: the saved data position has no state for lane {missing[0]} "
                               f"(it has lanes {have}); pass the union of all ranks' states")
        self.close()
        self._state = {lane: _jsonable(merged["lanes"][str(lane)]) for lane in self.my_lanes}

    def close(self) -> None:
        """Close the open readers (they reopen at the saved positions on the next call)."""
        for gen in self._gens.values():
            gen.close()
        self._gens.clear()


def to_batch(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows of ``seq_len + 1`` ids to ``input_ids = row[:-1]``, ``labels = row[1:]`` (BOE -> -100)."""
    t = torch.from_numpy(rows.astype(np.int64))
    labels = t[:, 1:].clone()
    labels[labels == BOE_ID] = IGNORE_INDEX
    return {"input_ids": t[:, :-1].contiguous(), "labels": labels}


class ByteBatches:
    """Endless training batches of this rank: ``{"input_ids", "labels"}``, LongTensors of shape
    ``[lanes / world_size, seq_len]``; the ranks' batches stacked in rank order are the
    single-process batch.  ``state_dict``/``load_state_dict`` as :class:`LaneStream`."""

    def __init__(self, sources: list, seq_len: int, lanes: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, holdout: Holdout | None = None):
        self.seq_len = seq_len
        self.stream = LaneStream(sources, functools.partial(ByteRowPacker, seq_len), lanes, rank, world_size, seed, holdout)

    def __iter__(self) -> "ByteBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return to_batch(np.stack(self.stream.next_items()))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, states: dict | list[dict]) -> None:
        self.stream.load_state_dict(states)

    def close(self) -> None:
        self.stream.close()
