"""Model files on disk: the one dtype table, safetensors headers, a lazy reader of a directory's
safetensors (single file or sharded with an index), a streaming shard writer, and atomic output
(a directory built in a hidden sibling and renamed; a text file written and renamed).

Every command that reads or writes weights goes through this module: convert, train checkpoints,
export, verification, the teacher and the entropy-model loader.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ByteifyError

# torch dtype, safetensors code, names accepted on the command line and in configs
_DTYPE_TABLE = (
    (torch.float64, "F64", ("fp64", "float64")),
    (torch.float32, "F32", ("fp32", "float32")),
    (torch.float16, "F16", ("fp16", "float16")),
    (torch.bfloat16, "BF16", ("bf16", "bfloat16")),
    (torch.int64, "I64", ()), (torch.int32, "I32", ()), (torch.int16, "I16", ()), (torch.int8, "I8", ()),
    (torch.uint8, "U8", ()), (torch.bool, "BOOL", ()), (torch.uint16, "U16", ()), (torch.uint32, "U32", ()),
    (torch.uint64, "U64", ()), (torch.float8_e4m3fn, "F8_E4M3", ()), (torch.float8_e5m2, "F8_E5M2", ()),
)
DTYPES = {name: dt for dt, _, names in _DTYPE_TABLE for name in names if dt != torch.float64}  # user-facing names
ST_CODE = {dt: code for dt, code, _ in _DTYPE_TABLE}
FROM_ST_CODE = {code: dt for dt, code, _ in _DTYPE_TABLE}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, option: str = "--dtype", allowed: tuple[str, ...] = ("fp32", "fp16", "bf16")) -> torch.dtype:
    """A user-facing dtype name (``bf16``, ``bfloat16`` ...) among ``allowed``; one-line error otherwise."""
    if DTYPES.get(name) not in {DTYPES[a] for a in allowed if a in DTYPES}:
        raise ByteifyError(f"{option} '{name}': expected {', '.join(allowed)}")
    return DTYPES[name]


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """``500MB``, ``5GB``, ``1.5GiB`` or a byte count."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise ByteifyError(f"{option} '{text}': expected a size like 500MB or 5GB")


# ---- reading --------------------------------------------------------------------------------
def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise ByteifyError(f"{path}: unreadable safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ByteifyError(f"{path}: unreadable safetensors header")
    header.pop("__metadata__", None)
    return header


def check_length(path: Path, header: dict | None = None) -> None:
    """A safetensors file whose data section is shorter than its header says is truncated."""
    header = read_header(path) if header is None else header
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    size = path.stat().st_size
    if 8 + n + end > size:
        raise ByteifyError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")


def numel(shape) -> int:
    return math.prod(int(d) for d in shape)


class SafetensorsDir:
    """The tensors of ``prefix.safetensors`` or ``prefix.safetensors.index.json`` + shards in a
    directory, read lazily: headers at open, one tensor (or row slice) at a time, one shard mapped
    at a time, so resident memory stays at what the caller holds."""

    def __init__(self, directory: str | Path, prefix: str = "model", validate: bool = False):
        self.dir = Path(directory)
        index = self.dir / f"{prefix}.safetensors.index.json"
        single = self.dir / f"{prefix}.safetensors"
        if index.exists():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ByteifyError(f"{index}: invalid index, expected JSON with a 'weight_map' ({exc})") from None
            for tensor, shard in self.weight_map.items():
                if not (self.dir / shard).exists():
                    raise ByteifyError(f"{index}: shard '{shard}' (holding '{tensor}') not found")
        elif single.exists():
            self.weight_map = None
        else:
            raise ByteifyError(f"{self.dir}: no {prefix}.safetensors or {prefix}.safetensors.index.json")
        shards = sorted(set(self.weight_map.values())) if self.weight_map is not None else [single.name]
        self.files = [self.dir / s for s in shards]
        self.entries: dict[str, dict] = {}
        for f in self.files:
            header = read_header(f)
            if validate:
                check_length(f, header)
            for name, entry in header.items():
                if self.weight_map is None or self.weight_map.get(name) == f.name:
                    self.entries[name] = {**entry, "file": f.name}
        if self.weight_map is None:
            self.weight_map = {k: single.name for k in self.entries}
        missing = [k for k in self.weight_map if k not in self.entries]
        if missing:
            raise ByteifyError(f"{self.dir / self.weight_map[missing[0]]}: tensor '{missing[0]}' listed in the index is not in that shard")
        self._handles: dict = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def code(self, name: str) -> str:
        """The safetensors dtype code (``F32``, ``BF16`` ...)."""
        return self.entries[name]["dtype"]

    def nbytes(self, name: str) -> int:
        a, b = self.entries[name]["data_offsets"]
        return b - a

    def path_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def _handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles.clear()  # one shard mapped at a time
            try:
                self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
            except Exception as exc:
                raise ByteifyError(f"{self.dir / shard}: unreadable safetensors file: {str(exc).splitlines()[0]}") from None
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.weight_map[name]).get_tensor(name)
        except ByteifyError:
            raise
        except Exception as exc:  # truncated data surfaces here on some files
            raise ByteifyError(f"{self.path_of(name)}: cannot read tensor '{name}': {exc}") from None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of one tensor, without reading the rest."""
        try:
            return self._handle(self.weight_map[name]).get_slice(name)[start:stop]
        except ByteifyError:
            raise
        except Exception as exc:
            raise ByteifyError(f"{self.path_of(name)}: cannot read tensor '{name}': {exc}") from None

    def rows(self, name: str, rows: int = 4096):
        """One tensor as consecutive blocks of ``rows`` rows (for tables too large to copy whole)."""
        try:
            sl = self._handle(self.weight_map[name]).get_slice(name)
            n = sl.get_shape()[0]
            for start in range(0, n, rows):
                yield sl[start:start + rows]
        except ByteifyError:
            raise
        except Exception as exc:
            raise ByteifyError(f"{self.path_of(name)}: cannot read tensor '{name}': {exc}") from None

    def stored_dtype(self) -> torch.dtype:
        """The dtype most floating tensors are stored in (by count of tensors)."""
        counts: dict[str, int] = {}
        for k in self.keys():
            c = self.code(k)
            if c in FLOAT_CODES:
                counts[c] = counts.get(c, 0) + 1
        return FROM_ST_CODE[max(counts, key=counts.get)] if counts else torch.float32

    def close(self) -> None:
        self._handles.clear()


# ---- writing --------------------------------------------------------------------------------
class ShardWriter:
    """Writes safetensors shards of at most ``max_bytes`` and the HF index.

    Each tensor goes to disk as soon as it is added (the header's room is reserved at the start
    of the shard and padded with spaces, as the safetensors format allows), so the writer holds no
    tensors: a conversion's memory is one tensor, whatever the shard size.  A shard with more
    tensors than the reserved room holds is rewritten once with the data moved up."""

    def __init__(self, out_dir: Path, max_bytes: int, prefix: str = "model", header_reserve: int = 1 << 18):
        self.out_dir, self.max_bytes, self.prefix = Path(out_dir), max_bytes, prefix
        self.header_reserve = header_reserve
        self.file = None
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0

    def _part_path(self) -> Path:
        return self.out_dir / f"{self.prefix}.part{len(self.shards):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_chunks(name, tuple(tensor.shape), tensor.dtype, [tensor])

    def add_chunks(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, chunks) -> None:
        """Write one tensor given as consecutive row blocks (each written as it arrives)."""
        n = numel(shape) * dtype.itemsize
        if self.entries and self.offset + n > self.max_bytes:
            self.flush()
        if self.file is None:
            self.file = open(self._part_path(), "wb")
            self.file.seek(8 + self.header_reserve)
        start, written = self.file.tell(), 0
        try:
            for chunk in chunks:
                t = chunk.detach().cpu().contiguous()
                if t.dtype != dtype:
                    raise ValueError(f"{name}: chunk dtype {t.dtype}, expected {dtype}")
                if t.numel():
                    self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
                written += t.numel() * t.element_size()
                del chunk, t  # before the next chunk is made
            if written != n:
                raise ValueError(f"{name}: {written} bytes written for shape {list(shape)} ({n} expected)")
        except BaseException:
            self.file.seek(start)  # the shard stays valid without this tensor
            self.file.truncate()
            raise
        self.entries[name] = {"dtype": ST_CODE[dtype], "shape": list(shape), "data_offsets": [self.offset, self.offset + n]}
        self.offset += n
        self.total += n

    def flush(self) -> None:
        if self.file is None:
            return
        path = self._part_path()
        raw = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(raw) <= self.header_reserve:
            raw += b" " * (self.header_reserve - len(raw))
            self.file.seek(0)
            self.file.write(len(raw).to_bytes(8, "little") + raw)
            self.file.close()
        else:
            self.file.close()
            raw += b" " * (-len(raw) % 8)
            moved = path.with_name(path.name + ".tmp")
            with open(path, "rb") as src, open(moved, "wb") as dst:
                dst.write(len(raw).to_bytes(8, "little") + raw)
                src.seek(8 + self.header_reserve)
                shutil.copyfileobj(src, dst, 1 << 24)
            os.replace(moved, path)
        self.shards.append((path.name, list(self.entries)))
        self.file, self.entries, self.offset = None, {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out_dir / self.shards[0][0], self.out_dir / f"{self.prefix}.safetensors")
            return [f"{self.prefix}.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self.shards):
            final = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp_name, self.out_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_tensors(out_dir: Path, tensors, max_bytes: int = 5 << 30, prefix: str = "model") -> list[str]:
    """``(name, tensor)`` pairs -> safetensors shards, one tensor in memory at a time."""
    writer = ShardWriter(Path(out_dir), max_bytes, prefix)
    for name, t in tensors:
        writer.add(name, t)
        del t
    return writer.close()


# ---- atomic output --------------------------------------------------------------------------
def check_output_path(src: Path, out: Path, force: bool) -> None:
    """OUT must not lie inside SRC, and must be empty unless ``force``."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    src_dir = src_r if src_r.is_dir() else src_r.parent
    if out_r == src_dir or src_dir in out_r.parents:
        if src_r.is_dir() or out_r == src_dir:
            raise ByteifyError(f"{out}: output directory is inside the source {src_dir}; choose a path outside it")
    if out_r.exists():
        if not out_r.is_dir():
            raise ByteifyError(f"{out}: exists and is not a directory")
        if any(out_r.iterdir()) and not force:
            raise ByteifyError(f"{out}: exists and is not empty; pass --force to replace it")


class AtomicDirectory:
    """``with AtomicDirectory(out) as tmp:`` build in a hidden sibling; renamed over ``out`` only
    when the block succeeds; removed on any error or Ctrl-C."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: dict, atomic: bool = False, **kw) -> None:
    text = json.dumps(data, indent=2, **kw) + "\n"
    atomic_write_text(path, text) if atomic else Path(path).write_text(text)


def read_json(path: Path) -> dict:
    """A JSON file as a dict; {} when it does not exist; one-line error when it is not JSON."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ByteifyError(f"{path}: unreadable JSON ({exc.__class__.__name__})") from None


# ---- sharded (torch.distributed.checkpoint) -------------------------------------------------
def dcp_call(fn, *args, **kwargs):
    """A torch.distributed.checkpoint save/load; in one process without a process group it runs
    with ``no_dist`` (and without the warning torch prints about assuming so)."""
    import warnings

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        kwargs["no_dist"] = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        return fn(*args, **kwargs)


class ShardedTensors:
    """The tensors of a ``torch.distributed.checkpoint`` directory whose keys start with
    ``prefix``, read one at a time in any process (no process group needed): memory is one
    tensor, whatever the number of shards and processes that wrote it."""

    def __init__(self, directory: str | Path, prefix: str = "model."):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir, self.prefix = Path(directory), prefix
        try:
            meta = FileSystemReader(str(self.dir)).read_metadata()
        except Exception as exc:
            raise ByteifyError(f"{self.dir}: unreadable sharded checkpoint ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.entries = {k[len(prefix):]: v for k, v in meta.state_dict_metadata.items()
                        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name].size)

    def get(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        e = self.entries[name]
        t = torch.empty(tuple(e.size), dtype=e.properties.dtype)
        dcp_call(dcp.load, {self.prefix + name: t}, storage_reader=FileSystemReader(str(self.dir)))
        return t
