"""Training data: text sources to packed BLT byte-id sequences, the held-out validation split,
and the deterministic, resumable, rank-sliced batch stream.

This module owns everything between a recipe's ``data.sources`` and the ``{"input_ids",
"labels"}`` batches a training step consumes:

* **Sources** (:class:`SourceSpec`): ``"default"`` (the embedded corpus), a ``.txt`` /
  ``.jsonl`` / ``.json`` (JSON lines) file, optionally ``.gz``-compressed, a directory (all
  supported files below it, sorted) or a glob.  A ``.txt`` file is one document, taken as raw
  bytes (invalid UTF-8 is data); a JSON line is one document, its text field encoded as UTF-8.
* **Split**: per source, a seed-derived random ``val_fraction`` of its *documents* (at least one)
  is held out; identical documents always land on the same side, and a training document whose
  bytes equal any held-out document is dropped, so validation text never appears in training.
  A source with a single document has its bytes split instead (the tail is held out).
* **Packing**: each document becomes ``[BOS] + (byte + 4)... + [EOS]``; a source's documents are
  concatenated into one stream per split and cut into rows of ``seq_len + 1`` ids (inputs are
  ``row[:-1]``, labels ``row[1:]``).  The last partial row is *padded* with BOE (id 0) rather
  than dropped, so no text is lost (only a lone final id, which has nothing to predict, is);
  padded positions get label ``-100``, which the loss ignores.  Ids are stored as uint16.
* **Order** (:class:`ByteBatches`): an epoch is ``N`` = all training rows; source ``s`` fills
  ``N * w_s / sum(w)`` slots of it (largest remainder), the slots are shuffled with
  ``(seed, epoch)``, and each source hands out its own rows in seed-shuffled passes, so
  sampling is proportional to weight and a single source sees a fresh permutation per epoch.
  The position is two integers (epoch, index) in *global sequence* units: resuming restores the
  exact following batches, also with another world size if the global batch stays the same.
"""

from __future__ import annotations

import glob as _glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ByteifyError
from ..tokenizer import BOE_ID, BOS_ID, EOS_ID, IGNORE_INDEX, OFFSET
TXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SUPPORTED_SUFFIXES = TXT_SUFFIXES + JSONL_SUFFIXES
# Domain tags that keep the seed-derived random streams independent of each other.
_SPLIT, _ORDER, _PASS, _VAL, ALIGNED_ORDER = 1, 2, 3, 4, 5


class SourceSpec(BaseModel):
    """One entry of a recipe's ``data.sources``."""

    model_config = ConfigDict(extra="forbid")

    path: str = "default"
    weight: float = Field(1.0, gt=0)
    text_field: str = "text"
    format: Literal["auto", "txt", "jsonl"] = "auto"


# --------------------------------------------------------------------------------------------
# Reading sources


def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return Path(name).suffix


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suf = _suffix(path)
    if suf in TXT_SUFFIXES:
        return "txt"
    if suf in JSONL_SUFFIXES:
        return "jsonl"
    raise ByteifyError(
        f"{path}: unsupported file type '{suf or path.name}' (byteify reads "
        f"{', '.join(SUPPORTED_SUFFIXES)}; set format: txt or jsonl to read it anyway)"
    )


def _read_raw(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ByteifyError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None


def _encode_text(text: str) -> bytes:
    try:  # lone surrogates from undecodable bytes (surrogateescape) go back to those bytes
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates ("\ud800" escapes) are kept, not fatal
        return text.encode("utf-8", "surrogatepass")


def _json_document(obj: Any, field: str, where: str) -> bytes:
    if not isinstance(obj, dict):
        raise ByteifyError(f"{where}: expected a JSON object with a '{field}' field, got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise ByteifyError(f"{where}: no '{field}' field (keys: {keys}); set text_field to the right key")
    value = obj[field]
    if not isinstance(value, str):
        raise ByteifyError(f"{where}: field '{field}' is {type(value).__name__}, expected a string")
    return _encode_text(value)


def _read_jsonl(path: Path, field: str) -> list[bytes]:
    raw = _read_raw(path)
    if raw.lstrip()[:1] == b"[":  # a whole-file JSON array of objects (common for .json)
        try:
            items = json.loads(raw.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as exc:
            raise ByteifyError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return [_json_document(obj, field, f"{path}: item {i}") for i, obj in enumerate(items)]
    docs = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as exc:
            raise ByteifyError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from None
        docs.append(_json_document(obj, field, f"{path}:{lineno}"))
    return docs


def _files_in_dir(directory: Path, fmt: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if fmt == "auto" and _suffix(name) not in SUPPORTED_SUFFIXES:
                continue  # a directory may hold other files; explicit format reads them all
            out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(directory).as_posix())


def resolve_files(spec: SourceSpec) -> list[Path]:
    """The files a (non-default) source reads, in order; raises for missing paths."""
    path = os.path.expanduser(spec.path)
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = _files_in_dir(p, spec.format)
        if not files:
            raise ByteifyError(f"{spec.path}: directory has no {', '.join(SUPPORTED_SUFFIXES)} files")
        return files
    if any(c in path for c in "*?["):
        matches = sorted(_glob.glob(path, recursive=True))
        if not matches:
            raise ByteifyError(f"{spec.path}: glob matches no files")
        files = []
        for m in matches:
            mp = Path(m)
            files += _files_in_dir(mp, spec.format) if mp.is_dir() else [mp]
        if not files:
            raise ByteifyError(f"{spec.path}: glob matches no supported files")
        return files
    raise ByteifyError(f"{spec.path}: no such file or directory")


def load_documents(spec: SourceSpec) -> list[bytes]:
    """A source's documents as raw bytes, in a stable order; empty documents are skipped.
    Raises :class:`ByteifyError` (naming the file or pattern) for anything unreadable or empty."""
    if spec.path == "default":
        from .corpus import default_documents

        docs = [_encode_text(text) for _, text in default_documents()]
    else:
        docs = []
        for f in resolve_files(spec):
            if _file_format(f, spec.format) == "txt":
                docs.append(_read_raw(f))
            else:
                docs += _read_jsonl(f, spec.text_field)
    docs = [d for d in docs if d]
    if not docs:
        raise ByteifyError(f"{spec.path}: source has no text (no documents, or only empty ones)")
    return docs


# --------------------------------------------------------------------------------------------
# Framing and packing


def frame_documents(docs: list[bytes]) -> np.ndarray:
    """``[BOS] + (byte + 4)... + [EOS]`` per document, concatenated: one uint16 id stream."""
    if not docs:
        return np.zeros(0, dtype=np.uint16)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum()) + 2 * len(docs)
    stream = np.empty(total, dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]]).astype(np.int64)
    special = np.zeros(total, dtype=bool)
    special[starts] = True
    special[starts + lengths + 1] = True
    stream[starts] = BOS_ID
    stream[starts + lengths + 1] = EOS_ID
    stream[~special] = np.frombuffer(b"".join(docs), dtype=np.uint8).astype(np.uint16) + OFFSET
    return stream


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut an id stream into rows of ``seq_len + 1`` ids; the last partial row is padded with BOE
    (label -100), unless it would hold no target at all (a single id)."""
    row = seq_len + 1
    n_full, rest = divmod(len(stream), row)
    if rest >= 2:
        stream = np.concatenate([stream, np.full(row - rest, BOE_ID, dtype=stream.dtype)])
        n_full += 1
    return np.ascontiguousarray(stream[: n_full * row].reshape(n_full, row))


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), *tags]))


def epoch_permutation(seed: int, tag: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` items in an epoch of a stream (``tag`` keeps streams independent)."""
    return _rng(seed, tag, epoch).permutation(n)


def split_documents(docs: list[bytes], val_fraction: float, seed: int, source_index: int = 0) -> tuple[list[bytes], list[bytes]]:
    """(train, val) documents.  A seed-derived ``val_fraction`` of the distinct documents (at least
    one, never all) is held out, all copies of a held-out text with it; a single distinct document
    is split at a line break near ``1 - val_fraction`` of its bytes instead."""
    if val_fraction <= 0:
        return list(docs), []
    unique = list(dict.fromkeys(docs))
    if len(unique) == 1:
        doc = unique[0]
        if len(doc) < 2:
            return list(docs), []
        cut = min(len(doc) - 1, max(1, len(doc) - max(1, round(len(doc) * val_fraction))))
        nl = doc.rfind(b"\n", 0, cut)
        if nl >= 0 and cut - (nl + 1) <= len(doc) - cut:  # a line boundary, if it at most doubles val
            cut = nl + 1
        return [doc[:cut]] * len(docs), [doc[cut:]] * len(docs)
    n_val = min(len(unique) - 1, max(1, round(len(unique) * val_fraction)))
    order = _rng(seed, _SPLIT, source_index).permutation(len(unique))
    held = {unique[i] for i in order[:n_val]}
    return [d for d in docs if d not in held], [d for d in docs if d in held]


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass
class PackedSource:
    """One source's share of one split: rows of ``seq_len + 1`` ids (uint16)."""

    path: str
    weight: float
    rows: np.ndarray
    documents: int
    bytes: int

    @property
    def num_sequences(self) -> int:
        return int(self.rows.shape[0])


class ByteDataset:
    """One split (``"train"`` or ``"val"``) of packed sources; rows are ``seq_len + 1`` ids."""

    def __init__(self, split: str, sources: list[PackedSource], seq_len: int, seed: int):
        self.split, self.sources, self.seq_len, self.seed = split, sources, seq_len, seed
        self._val_order: np.ndarray | None = None

    @property
    def num_sequences(self) -> int:
        return sum(s.num_sequences for s in self.sources)

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.sources)

    @property
    def stats(self) -> dict:
        """Documents, text bytes and sequences of this split, in total and per source."""
        return {
            "split": self.split,
            "documents": self.documents,
            "bytes": self.num_bytes,
            "sequences": self.num_sequences,
            "seq_len": self.seq_len,
            "sources": [
                {"path": s.path, "weight": s.weight, "documents": s.documents, "bytes": s.bytes, "sequences": s.num_sequences}
                for s in self.sources
            ],
        }

    def rows(self) -> np.ndarray:
        """All rows of all sources, in source order ([num_sequences, seq_len + 1], uint16)."""
        if not self.sources:
            return np.zeros((0, self.seq_len + 1), dtype=np.uint16)
        return np.concatenate([s.rows for s in self.sources])

    def batches(self, batch_size: int, seed: int | None = None, rank: int = 0, world_size: int = 1) -> "ByteBatches":
        return ByteBatches(self, batch_size, seed, rank=rank, world_size=world_size)

    def val_batches(self, batch_size: int, max_batches: int | None = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """The split's rows in one fixed, seed-derived order (mixing the sources, so that the first
        ``max_batches`` are a fair sample), as batches of exactly ``batch_size`` rows: the last is
        filled with all-ignored rows (BOE inputs, labels -100), so shapes are static and rank
        slices equal.  Average the loss over labels != -100, not over rows."""
        _check_slice(batch_size, rank, world_size)
        rows = self.rows()
        if self._val_order is None:
            self._val_order = _rng(self.seed, _VAL).permutation(len(rows))
        n_batches = -(-len(rows) // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        per = batch_size // world_size
        for b in range(n_batches):
            idx = self._val_order[b * batch_size + rank * per: b * batch_size + (rank + 1) * per]
            chunk = rows[idx]
            if len(chunk) < per:
                chunk = np.concatenate([chunk, np.full((per - len(chunk), rows.shape[1]), BOE_ID, dtype=rows.dtype)])
            yield to_batch(chunk)


def to_batch(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows of ``seq_len + 1`` ids to ``input_ids = row[:-1]``, ``labels = row[1:]`` (BOE -> -100)."""
    t = torch.from_numpy(rows.astype(np.int64))
    labels = t[:, 1:].clone()
    labels[labels == BOE_ID] = IGNORE_INDEX
    return {"input_ids": t[:, :-1].contiguous(), "labels": labels}


def as_spec(source: Any) -> SourceSpec:
    if isinstance(source, SourceSpec):
        return source
    if isinstance(source, BaseModel):
        source = source.model_dump()
    elif isinstance(source, str):
        source = {"path": source}
    try:
        return SourceSpec.model_validate(source)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ByteifyError(f"data source {source!r}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def build_datasets(sources: list[SourceSpec], seq_len: int, val_fraction: float = 0.05,
                   seed: int = 0) -> tuple[ByteDataset, ByteDataset]:
    """(train, val) datasets from the sources (specs, dicts, recipe models or plain paths)."""
    specs = [as_spec(s) for s in sources]
    if not specs:
        raise ByteifyError("data: no sources given")
    if seq_len < 1:
        raise ByteifyError(f"data: seq_len must be at least 1, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ByteifyError(f"data: val_fraction must be in [0, 1), got {val_fraction}")
    train_parts, val_parts = [], []
    for spec, (train_docs, val_docs) in zip(specs, _split_each(specs, val_fraction, seed)):
        for docs, parts in ((train_docs, train_parts), (val_docs, val_parts)):
            rows = pack(frame_documents(docs), seq_len) if docs else np.zeros((0, seq_len + 1), np.uint16)
            parts.append(PackedSource(spec.path, spec.weight, rows, len(docs), sum(map(len, docs))))
    return ByteDataset("train", train_parts, seq_len, seed), ByteDataset("val", val_parts, seq_len, seed)


def _split_each(specs: list[SourceSpec], val_fraction: float, seed: int) -> list[tuple[list[bytes], list[bytes]]]:
    """(train, val) documents per source; a training document whose text is held out anywhere
    (the same text in another source) is dropped."""
    splits = [split_documents(load_documents(spec), val_fraction, seed, i) for i, spec in enumerate(specs)]
    held_out = {d for _, val in splits for d in val}
    out = []
    for spec, (train_docs, val_docs) in zip(specs, splits):
        train_docs = [d for d in train_docs if d not in held_out]
        if not train_docs:
            raise ByteifyError(f"{spec.path}: no training text left: all its documents also appear in validation")
        out.append((train_docs, val_docs))
    return out


def split_sources(sources, val_fraction: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    """All sources' (train, val) documents, split exactly as :func:`build_datasets` splits them."""
    splits = _split_each([as_spec(s) for s in sources], val_fraction, seed)
    return [d for t, _ in splits for d in t], [d for _, v in splits for d in v]


def describe(train: ByteDataset, val: ByteDataset) -> str:
    """One line of split sizes for logs."""
    return (f"train: {train.documents} documents, {train.num_bytes:,} bytes, {train.num_sequences} sequences; "
            f"val: {val.documents} documents, {val.num_bytes:,} bytes, {val.num_sequences} sequences "
            f"(seq_len {train.seq_len})")


# --------------------------------------------------------------------------------------------
# Batching


def _check_slice(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ByteifyError(f"data: batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ByteifyError(f"data: rank {rank} is outside world_size {world_size}")
    if batch_size % world_size:
        raise ByteifyError(f"data: global batch of {batch_size} sequences does not split over {world_size} ranks")


class ByteBatches:
    """Infinite, deterministic stream of training batches over a dataset.

    ``batch_size`` is the *global* batch in sequences; rank ``r`` of ``world_size`` gets rows
    ``r*B/W ... (r+1)*B/W`` of each global batch, so the ranks' union is the single-process
    batch.  Batches may straddle epochs (no row is skipped).  :meth:`state_dict` is the position
    in global sequences; :meth:`load_state_dict` restores it exactly.
    """

    def __init__(self, dataset: ByteDataset, batch_size: int, seed: int | None = None, rank: int = 0, world_size: int = 1):
        _check_slice(batch_size, rank, world_size)
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed = dataset.seed if seed is None else seed
        self._sizes = np.array([s.num_sequences for s in dataset.sources], dtype=np.int64)
        self.epoch_size = int(self._sizes.sum())
        if self.epoch_size < batch_size:
            paths = ", ".join(s.path for s in dataset.sources)
            raise ByteifyError(
                f"{paths}: the {dataset.split} split has {self.epoch_size} sequences of {dataset.seq_len} bytes "
                f"({dataset.num_bytes:,} text bytes), fewer than one batch of {batch_size}; "
                f"use a smaller batch or seq_len, or more text"
            )
        weights = np.array([s.weight for s in dataset.sources], dtype=np.float64)
        weights[self._sizes == 0] = 0.0
        self.counts = _apportion(self.epoch_size, weights)
        self.epoch, self.index = 0, 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- order ------------------------------------------------------------------------------

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row) for every slot of an epoch."""
        if epoch in self._cache:
            return self._cache[epoch]
        counts = self.counts
        src = _rng(self.seed, _ORDER, epoch).permutation(np.repeat(np.arange(len(counts), dtype=np.int32), counts))
        row = np.empty(self.epoch_size, dtype=np.int64)
        for s, (c, n) in enumerate(zip(counts.tolist(), self._sizes.tolist())):
            if c == 0:
                continue
            # The source's k-th slot of this epoch is its draw g = epoch*c + k overall; draws run
            # through the source's rows in passes, each pass a fresh seed-derived permutation.
            first, last = epoch * c, (epoch + 1) * c
            out = np.empty(c, dtype=np.int64)
            for p in range(first // n, (last - 1) // n + 1):
                lo, hi = max(first, p * n), min(last, (p + 1) * n)
                out[lo - first: hi - first] = _rng(self.seed, _PASS, s, p).permutation(n)[lo - p * n: hi - p * n]
            row[src == s] = out
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = (src, row)
        return src, row

    def global_rows(self, epoch: int, index: int, count: int) -> np.ndarray:
        """``count`` rows of the global order starting at (epoch, index), across epoch ends."""
        out = []
        pos = epoch * self.epoch_size + index
        for q in range(pos, pos + count):
            e, i = divmod(q, self.epoch_size)
            src, row = self._order(e)
            out.append(self.dataset.sources[src[i]].rows[row[i]])
        return np.stack(out)

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> "ByteBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        per = self.batch_size // self.world_size
        start = self.epoch * self.epoch_size + self.index + self.rank * per
        rows = self.global_rows(*divmod(start, self.epoch_size), per)
        self.epoch, self.index = divmod(self.epoch * self.epoch_size + self.index + self.batch_size, self.epoch_size)
        return to_batch(rows)

    def state_dict(self) -> dict:
        """The exact data position (JSON-serializable) plus what it is only valid for."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "epoch_size": self.epoch_size,
                "sources": [[s.path, s.weight, s.num_sequences] for s in self.dataset.sources]}

    def load_state_dict(self, state: dict) -> None:
        here = self.state_dict()
        for key in ("seed", "epoch_size", "sources"):
            if key in state and json.loads(json.dumps(state[key])) != json.loads(json.dumps(here[key])):
                raise ByteifyError(f"data: cannot resume: the saved data position is for {key} {state[key]}, "
                                   f"but this run has {here[key]}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.epoch_size:
            raise ByteifyError(f"data: cannot resume: position (epoch {epoch}, index {index}) is out of range")
        self.epoch, self.index = epoch, index


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainder, ties to the
    earlier source)."""
    quotas = total * weights / weights.sum()
    counts = np.floor(quotas).astype(np.int64)
    rest = total - int(counts.sum())
    order = sorted((i for i in range(len(weights)) if weights[i] > 0), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts
