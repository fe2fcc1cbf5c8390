"""Text sources as streams of documents with resumable positions.

This module owns a recipe's ``data.sources`` entry (:class:`SourceSpec`), opening and checking a
source (:func:`open_source`), and reading its documents, as raw bytes, from any saved position.

* A source is a list of **units**, listed cheaply (file names, parquet footers, an arrow stream's
  schema; never a pass over the text): the embedded corpus has one unit per document, a ``.txt``
  file is one unit (one document, its raw bytes: invalid UTF-8 is data), a plain JSON-lines file
  is cut into byte ranges (a range owns the lines that start in it; 64 KiB to 32 MiB, aiming at
  ``2 * min_units`` ranges), a compressed (``.gz``/``.zst``) JSON-lines file or a whole-file JSON
  array is one unit, a parquet file has one unit per row group (row ranges of them when the
  source has fewer than ``min_units`` row groups), an arrow file (``datasets.save_to_disk``) is
  one unit, and a hub dataset (``format: hf``) has one unit per streaming shard.
* Every document has a **position** ``[unit, within]`` (JSON) from which reading restarts at that
  document without reading the source from its start: ``within`` is the document index (embedded
  corpus), 0 (``.txt``), the byte offset of the line (plain JSON lines), the line number
  (compressed JSON lines: the one file is decompressed again up to that line), the item index
  (JSON array: the file is parsed again), the row in the row group (parquet: that row group is
  decoded again up to the row), ``[batch, row]`` (arrow, memory-mapped: skipping is free), or the
  ``IterableDataset.state_dict()`` before the document (hub).
* Memory is bounded by one read buffer per open unit (1 MiB of a file, 256 parquet rows, one
  arrow batch) and a bounded cache of parsed parquet footers, never by the corpus size; a
  ``.txt`` document and a JSON array are held whole.
* Bad input is a one-line :class:`ByteifyError` naming the file (and line or row): at open time a
  path that matches nothing, an empty directory or glob, an unsupported extension, a parquet or
  arrow file without the text column, a corrupt parquet footer or a corrupt first gzip/zstd
  block; while streaming, a corrupt block deep in a file or an invalid JSON line.  Empty
  documents (and null texts) are skipped; :meth:`Source.first_document` raises for a source
  without any text.
"""

from __future__ import annotations

import glob as _glob
import gzip
import io
import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ByteifyError

TXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
SUPPORTED_SUFFIXES = TXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
CHUNK_BYTES = 32 << 20  # the largest byte range of a plain JSON-lines file that is one unit
MIN_CHUNK_BYTES = 64 << 10
BATCH_ROWS = 256  # parquet rows decoded at a time
FOOTER_CACHE_BYTES = 64 << 20  # parsed parquet footers kept, shared by all lanes (serialized size)
_BUFFER = 1 << 20


class SourceSpec(BaseModel):
    """One entry of a recipe's ``data.sources``."""

    model_config = ConfigDict(extra="forbid")

    path: str = "default"
    weight: float = Field(1.0, gt=0)
    text_field: str = "text"
    format: Literal["auto", "txt", "jsonl", "parquet", "arrow", "hf"] = "auto"
    name: str | None = None
    split: str = "train"


def as_spec(source: Any) -> SourceSpec:
    """A :class:`SourceSpec` from a spec, a dict, another pydantic model or a plain path."""
    if isinstance(source, SourceSpec):
        return source
    if isinstance(source, BaseModel):
        source = source.model_dump()
    if isinstance(source, (str, os.PathLike)):
        return SourceSpec(path=str(source))
    return SourceSpec(**source)


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of a decoded text; lone surrogates go back to the bytes they came from."""
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
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ByteifyError(f"{where}: field '{field}' is {type(value).__name__}, expected a string")
    return encode_text(value)


# --------------------------------------------------------------------------------------------
# Sources


class Source:
    """A source: ``num_units()`` units, each read by ``read_unit(unit, within)`` as
    ``(within, document_bytes)`` from the document at ``within`` (``None``: the unit's start).
    Subclass it (``num_units``, ``_read_unit``) for a custom source; ``docs_read`` and
    ``units_opened`` count the documents produced and the units opened (for tests and logs)."""

    def __init__(self, name: str, fingerprint: dict | None = None):
        self.name = name
        self.fingerprint = fingerprint if fingerprint is not None else {"path": name}
        self.docs_read = 0
        self.units_opened = 0

    def num_units(self) -> int:
        raise NotImplementedError

    def _read_unit(self, unit: int, within: Any) -> Iterator[tuple[Any, bytes]]:
        raise NotImplementedError

    def read_unit(self, unit: int, within: Any = None) -> Iterator[tuple[Any, bytes]]:
        self.units_opened += 1
        for at, doc in self._read_unit(unit, within):
            if doc:
                self.docs_read += 1
                yield at, doc

    def documents(self, start: Any = None) -> Iterator[tuple[list, bytes]]:
        """All documents in canonical order as ``([unit, within], bytes)``, from ``start``."""
        first, within = start if start is not None else (0, None)
        for unit in range(first, self.num_units()):
            for at, doc in self.read_unit(unit, within if unit == first else None):
                yield [unit, at], doc

    def first_document(self) -> tuple[list, bytes]:
        docs = self.documents()
        try:
            for item in docs:
                return item
        finally:
            docs.close()
        raise ByteifyError(f"{self.name}: source has no text (no documents, or only empty ones)")


class DefaultSource(Source):
    """The embedded corpus (``byteify.data.corpus``), one unit per document."""

    def __init__(self):
        super().__init__("default")
        self._docs = _default_documents()

    def num_units(self) -> int:
        return len(self._docs)

    def _read_unit(self, unit, within):
        yield 0, self._docs[unit]


_DEFAULT: list[bytes] = []


def _default_documents() -> list[bytes]:
    if not _DEFAULT:
        from .corpus import default_documents

        _DEFAULT.extend(encode_text(text) for _, text in default_documents())
    return _DEFAULT


class FileSource(Source):
    """Files on disk: units are ``(kind, path, a, b)`` tuples read by the ``_read_<kind>`` functions."""

    def __init__(self, spec: SourceSpec, units: list[tuple]):
        super().__init__(spec.path, _spec_fingerprint(spec))
        self.field = spec.text_field
        self.units = units

    def num_units(self) -> int:
        return len(self.units)

    def _read_unit(self, unit, within):
        kind, path, a, b = self.units[unit]
        return _READERS[kind](path, a, b, self.field, within)


def _spec_fingerprint(spec: SourceSpec) -> dict:
    return spec.model_dump(exclude={"weight"})


# --------------------------------------------------------------------------------------------
# Resolving paths to units


def _suffix(name: str) -> str:
    name = name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return Path(name).suffix


def _kind(path: Path, fmt: str) -> str:
    if fmt in ("txt", "jsonl", "parquet", "arrow"):
        return fmt
    suf = _suffix(path.name)
    for kind, sufs in (("txt", TXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES),
                       ("arrow", ARROW_SUFFIXES)):
        if suf in sufs:
            return kind
    raise ByteifyError(
        f"{path}: unsupported file type '{suf or path.name}' (byteify reads {', '.join(SUPPORTED_SUFFIXES)}; "
        f"set format: txt, jsonl, parquet or arrow to read it anyway)"
    )


def _files_in_dir(directory: Path, fmt: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if fmt == "auto" and _suffix(name) not in SUPPORTED_SUFFIXES:
                continue  # a directory may hold other files; an explicit format reads them all
            out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(directory).as_posix())


def _saved_dataset_files(directory: Path, split: str) -> list[Path] | None:
    """The arrow files of a ``datasets.save_to_disk`` directory (a split of a saved DatasetDict),
    or None when ``directory`` is not one."""
    if (directory / "dataset_dict.json").is_file():
        try:
            splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ByteifyError(f"{directory}/dataset_dict.json: cannot read ({exc})") from None
        if split not in splits:
            raise ByteifyError(f"{directory}: saved dataset has no split '{split}' (splits: {', '.join(splits)})")
        directory = directory / split
    if not ((directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()):
        return None
    try:
        names = [f["filename"] for f in json.loads((directory / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ByteifyError(f"{directory}/state.json: cannot read the list of data files ({exc})") from None
    return [directory / n for n in names]


def resolve_files(spec: SourceSpec) -> list[Path]:
    """The files a local source reads, in order; raises for paths that match nothing."""
    path = os.path.expanduser(spec.path)
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        saved = _saved_dataset_files(p, spec.split) if spec.format in ("auto", "arrow") else None
        if saved is not None:
            return saved
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
    hint = " (for a Hugging Face hub dataset set format: hf)" if path.count("/") == 1 else ""
    raise ByteifyError(f"{spec.path}: no such file or directory{hint}")


def open_source(source: Any, min_units: int = 1) -> Source:
    """Open and check a source (a spec, dict, path or an already opened :class:`Source`).
    ``min_units``: plain JSON-lines files are cut into at least about this many byte ranges
    (down to 64 KiB), so that few big files still give every lane its own units."""
    if isinstance(source, Source):
        return source
    spec = as_spec(source)
    if spec.format == "hf":
        return HubSource(spec)
    if spec.path == "default":
        return DefaultSource()
    files = resolve_files(spec)
    kinds = [_kind(f, spec.format) for f in files]
    total = sum(f.stat().st_size for f, k in zip(files, kinds) if k == "jsonl" and not _compressed(f))
    chunk = max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, -(-total // max(1, 2 * min_units))))
    units: list[tuple] = []
    for f, kind in zip(files, kinds):
        units += _LISTERS[kind](f, spec.text_field, chunk)
    groups = sum(u[0] == "parquet" for u in units)
    if groups and len(units) < min_units:  # few row groups: row ranges of them are units too
        parts = -(-min_units // groups)
        units = [part for u in units for part in (_row_ranges(u, parts) if u[0] == "parquet" else [u])]
    return FileSource(spec, units)


def _compressed(path: Path) -> str | None:
    name = path.name.lower()
    return "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else None


# --------------------------------------------------------------------------------------------
# Plain and compressed files: txt, JSON lines, JSON arrays


def _open_bytes(path: Path, buffer: int = _BUFFER):
    """A buffered binary reader of a (possibly compressed) file."""
    comp = _compressed(path)
    try:
        if comp == "gzip":
            return gzip.open(path, "rb")
        if comp == "zstd":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), buffer)
        return open(path, "rb", buffering=buffer)
    except OSError as exc:
        raise ByteifyError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _corrupt(path: Path, where: str, exc: Exception) -> ByteifyError:
    what = {"gzip": "gzip", "zstd": "zstd"}.get(_compressed(path) or "", "file")
    return ByteifyError(f"{path}{where}: corrupt {what} data or cannot read ({exc.__class__.__name__}: {exc})")


def _decode_errors():
    errors: tuple = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is needed only for .zst files
        pass
    return errors


def _peek(path: Path) -> bytes:
    """The first non-blank bytes (decompressing the first block): checks the file opens."""
    try:
        with _open_bytes(path, 1 << 13) as fh:
            return fh.read(4096).lstrip()[:1]
    except ImportError:
        raise ByteifyError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") from None
    except _decode_errors() as exc:
        raise _corrupt(path, "", exc) from None


def _list_txt(path: Path, field: str, chunk: int) -> list[tuple]:
    _peek(path)
    return [("txt", path, 0, 0)]


def _list_jsonl(path: Path, field: str, chunk: int) -> list[tuple]:
    if _peek(path) == b"[":  # a whole-file JSON array of objects (common for .json)
        return [("jsonarray", path, 0, 0)]
    if _compressed(path):
        return [("jsonz", path, 0, 0)]
    size = path.stat().st_size
    return [("jsonl", path, a, min(size, a + chunk)) for a in range(0, max(size, 1), chunk)]


def _whole(path) -> bytes:
    """The file's bytes, decompressed; a corrupt file is one line naming it."""
    try:
        with _open_bytes(path) as fh:
            return fh.read()
    except _decode_errors() as exc:
        raise _corrupt(path, "", exc) from None


def _read_txt(path, a, b, field, within):
    yield 0, _whole(path)


def _parse_line(line: bytes, field: str, where: Callable[[], str]) -> bytes:
    try:
        obj = json.loads(line.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise ByteifyError(f"{where()}: invalid JSON line ({exc.msg})") from None
    if type(obj) is dict and type(obj.get(field)) is str:  # the common case, without naming the line
        return encode_text(obj[field])
    return _json_document(obj, field, where())


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at ``offset`` (only computed for error messages)."""
    count = 1
    with open(path, "rb") as fh:
        while offset > 0:
            block = fh.read(min(offset, _BUFFER))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _read_jsonl(path, start, stop, field, within):
    """Lines that start in ``[start, stop)`` of a plain file; ``within`` = a line's byte offset."""
    with _open_bytes(path) as fh:
        if within is not None:
            pos = int(within)
            fh.seek(pos)
        elif start > 0:
            fh.seek(start - 1)
            pos = start - 1 + len(fh.readline())  # the line that started before belongs to the range before
        else:
            pos = 0
        while pos < stop:
            line = fh.readline()
            if not line:
                break
            here, pos = pos, pos + len(line)
            if line.strip():
                yield here, _parse_line(line, field, lambda: f"{path}:{_line_number(path, here)}")


def _read_jsonz(path, a, b, field, within):
    """A compressed JSON-lines file; ``within`` = line index (skipping decompresses up to it)."""
    skip = int(within or 0)
    lineno = 0
    try:
        with _open_bytes(path) as fh:
            while True:
                line = fh.readline()
                if not line:
                    break
                lineno += 1
                if lineno <= skip or not line.strip():
                    continue
                yield lineno - 1, _parse_line(line, field, lambda: f"{path}:{lineno}")
    except _decode_errors() as exc:
        raise _corrupt(path, f":{lineno + 1}", exc) from None


def _read_jsonarray(path, a, b, field, within):
    raw = _whole(path)
    try:
        items = json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise ByteifyError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise ByteifyError(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
    for i in range(int(within or 0), len(items)):
        yield i, _json_document(items[i], field, f"{path}: item {i}")


# --------------------------------------------------------------------------------------------
# Columnar files: parquet (row groups) and arrow (datasets.save_to_disk)


def _check_column(path: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise ByteifyError(f"{path}: no column '{field}' (columns: {', '.join(schema.names)}); set text_field to the right column")
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
            or pa.types.is_large_binary(typ) or pa.types.is_string_view(typ)):
        raise ByteifyError(f"{path}: column '{field}' is {typ}, expected strings")


def _bytes_list(column) -> list:
    import pyarrow as pa

    return column.cast(pa.large_binary()).to_pylist()


def _list_parquet(path: Path, field: str, chunk: int) -> list[tuple]:
    import pyarrow as pa

    try:
        meta = _footer(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        raise ByteifyError(f"{path}: not a valid parquet file ({exc})") from None
    _check_column(path, schema, field)
    return [("parquet", path, rg, (0, meta.row_group(rg).num_rows)) for rg in range(meta.num_row_groups)
            if meta.row_group(rg).num_rows]


_FOOTERS: OrderedDict = OrderedDict()


def _footer(path: Path):
    """A parquet file's parsed footer, from a small process-wide LRU cache: a big file's footer
    (thousands of row groups) takes tens of MB and ms to parse, and every lane reading that file
    shares one copy instead of parsing its own for every row group."""
    import pyarrow.parquet as pq

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _FOOTERS:
        _FOOTERS.move_to_end(key)
        return _FOOTERS[key]
    meta = _FOOTERS[key] = pq.read_metadata(path)
    while len(_FOOTERS) > 1 and sum(m.serialized_size for m in _FOOTERS.values()) > FOOTER_CACHE_BYTES:
        _FOOTERS.popitem(last=False)
    return meta


def _row_ranges(unit: tuple, parts: int) -> list[tuple]:
    """A parquet unit cut into ``parts`` row ranges (each decodes its row group up to its end)."""
    kind, path, rg, (lo, hi) = unit
    cuts = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return [(kind, path, rg, (a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]


def _read_parquet(path, rg, rows, field, within):
    """Rows ``[lo, hi)`` of a row group; ``within`` = a row of the row group (decoded up to it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lo, hi = rows
    skip, row = int(within if within is not None else lo), 0
    try:
        pf = pq.ParquetFile(path, metadata=_footer(path))
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=[field], use_threads=False):
            n = batch.num_rows
            if row + n > skip:
                a = max(0, skip - row)
                values = _bytes_list(batch.column(0).slice(a, min(n, hi - row) - a))
                for i, value in enumerate(values, start=row + a):
                    yield i, value or b""
            row += n
            if row >= hi:
                break
    except (pa.ArrowException, OSError) as exc:
        raise ByteifyError(f"{path}: row group {rg}, row {row}: cannot read ({exc})") from None


def _open_arrow(path: Path):
    """(reader, is_file_format) for an arrow IPC stream (datasets) or IPC file."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    if source.read(6) == b"ARROW1":
        source.seek(0)
        return pa.ipc.open_file(source), True
    source.seek(0)
    return pa.ipc.open_stream(source), False


def _list_arrow(path: Path, field: str, chunk: int) -> list[tuple]:
    import pyarrow as pa

    try:
        reader, _ = _open_arrow(path)
    except (pa.ArrowException, OSError) as exc:
        raise ByteifyError(f"{path}: not a valid arrow file ({exc})") from None
    _check_column(path, reader.schema, field)
    return [("arrow", path, 0, 0)]


def _read_arrow(path, a, b, field, within):
    import pyarrow as pa

    first, row = within if within is not None else (0, 0)
    try:
        reader, is_file = _open_arrow(path)
        index = reader.schema.get_field_index(field)
        batches = (reader.get_batch(i) for i in range(first, reader.num_record_batches)) if is_file else reader
        for bi, batch in enumerate(batches, start=first if is_file else 0):
            if bi < first:
                continue
            lo = row if bi == first else 0
            for i, value in enumerate(_bytes_list(batch.column(index).slice(lo)), start=lo):
                yield [bi, i], value or b""
    except (pa.ArrowException, OSError) as exc:
        raise ByteifyError(f"{path}: cannot read ({exc})") from None


_LISTERS = {"txt": _list_txt, "jsonl": _list_jsonl, "parquet": _list_parquet, "arrow": _list_arrow}
_READERS = {"txt": _read_txt, "jsonl": _read_jsonl, "jsonz": _read_jsonz, "jsonarray": _read_jsonarray,
            "parquet": _read_parquet, "arrow": _read_arrow}


# --------------------------------------------------------------------------------------------
# Hugging Face hub datasets in streaming mode


def _load_hub(path: str, name: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise ByteifyError(f"{path}: format: hf needs the datasets package (pip install datasets)") from None
    try:
        return datasets.load_dataset(path, name, split=split, streaming=True)
    except Exception as exc:  # network, missing dataset/config/split: all one line for the user
        raise ByteifyError(f"{path}: cannot stream this hub dataset ({exc.__class__.__name__}: {exc})".splitlines()[0]) from None


# Replaceable for tests (offline: ``datasets.load_dataset("parquet", data_files=..., streaming=True)``).
HUB_LOADER: Callable[[str, str | None, str], Any] = _load_hub


class HubSource(Source):
    """A ``datasets`` streaming ``IterableDataset``: one unit per shard; a document's position
    within its shard is the shard's ``state_dict()`` before it."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec.path, _spec_fingerprint(spec))
        self.field = spec.text_field
        self.dataset = HUB_LOADER(spec.path, spec.name, spec.split)
        features = getattr(self.dataset, "features", None)
        if features is not None and self.field not in features:
            raise ByteifyError(f"{spec.path}: no column '{self.field}' (columns: {', '.join(features)}); "
                               f"set text_field to the right column")
        self._shards = max(1, int(getattr(self.dataset, "num_shards", 1)))

    def num_units(self) -> int:
        return self._shards

    def _read_unit(self, unit, within):
        ds = self.dataset
        if self._shards > 1:
            ds = ds.shard(num_shards=self._shards, index=unit, contiguous=True)
        if within is not None:
            ds.load_state_dict(within)
        state = within if within is not None else ds.state_dict()
        examples = iter(ds)
        try:
            for example in examples:
                value = example.get(self.field)
                if isinstance(value, str):
                    value = encode_text(value)
                yield state, value or b""
                state = ds.state_dict()
        finally:
            close = getattr(examples, "close", None)
            if close is not None:
                close()
