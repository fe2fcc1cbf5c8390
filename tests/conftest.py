"""Session-wide fixtures: tiny random source checkpoints of every supported shape, built once,
and their conversions, cached.  Nothing is downloaded: the hub is switched off for the session."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import llama_config, load_source_model, random_causal_lm, save_hf, write_gguf  # noqa: E402

torch.set_num_threads(2)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> how to build it.  Every shape the convert issue lists; "legacy" ones get a hand-written
# config.json in the pre-transformers-5 layout (top-level rope_theta + rope_scaling).
SHAPES: dict[str, dict] = {
    "mha-untied-fp32": dict(),
    "gqa-tied-fp32": dict(kv_heads=2, tied=True, layers=3),
    "gqa-untied-bf16": dict(kv_heads=2, dtype=torch.bfloat16),
    "mqa-tied-fp16": dict(kv_heads=1, tied=True, dtype=torch.float16),
    "llama3-rope": dict(kv_heads=2, rope_parameters=LLAMA3_ROPE),
    "legacy-llama3-json": dict(kv_heads=2, rope_parameters=LLAMA3_ROPE,
                               legacy={"rope_theta": 500000.0, "rope_scaling": {
                                   "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64, "rope_type": "llama3"}}),
    "legacy-linear-json": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                               legacy={"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "mistral": dict(cls_name="mistral", kv_heads=2, sliding_window=None),
    "sharded": dict(kv_heads=2, tied=False, max_shard_size="100KB"),
    "gguf-tied-gqa": dict(gguf=True, kv_heads=2, tied=True),
    "gguf-untied-mha": dict(gguf=True, tied=False, layers=3),
}
HF_SHAPES = [n for n, s in SHAPES.items() if not s.get("gguf")]
GGUF_SHAPES = [n for n, s in SHAPES.items() if s.get("gguf")]


@dataclass
class Source:
    name: str
    path: Path  # directory, or the .gguf file
    memory_model: object | None = None  # GGUF: the weights that were written (fp32)
    _reference: object | None = field(default=None, repr=False)

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    def reference(self):
        """The source as an fp32 transformers model (HF: read back from disk, so bf16/fp16 sources
        are compared at their stored precision)."""
        if self._reference is None:
            self._reference = self.memory_model if self.is_gguf else load_source_model(self.path)
        return self._reference


def build_source(name: str, root: Path) -> Source:
    spec = dict(SHAPES[name])
    dtype = spec.pop("dtype", torch.float32)
    shard = spec.pop("max_shard_size", None)
    legacy = spec.pop("legacy", None)
    is_gguf = spec.pop("gguf", False)
    model = random_causal_lm(llama_config(**spec), seed=sum(map(ord, name)))
    if is_gguf:
        return Source(name, write_gguf(model, root / f"{name}.gguf"), memory_model=model)
    path = save_hf(model, root / name, dtype=dtype, max_shard_size=shard)
    if legacy:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("rope_parameters", None)
        cfg.update(legacy)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return Source(name, path)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """``sources(name)`` -> :class:`Source`, built on first use."""
    root = tmp_path_factory.mktemp("sources")
    cache: dict[str, Source] = {}

    def get(name: str) -> Source:
        if name not in cache:
            cache[name] = build_source(name, root)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_spec():
    from byteify.convert.presets import load_spec

    return load_spec("tiny")


@pytest.fixture(scope="session")
def converted(sources, tiny_spec, tmp_path_factory):
    """``converted(name)`` -> (source, out_dir, report): the tiny-preset conversion, verified, cached."""
    from byteify.convert.transplant import convert
    from byteify.convert.sources import open_source

    root = tmp_path_factory.mktemp("converted")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            src = sources(name)
            out = root / name
            report = convert(open_source(src.path), out, tiny_spec, progress=False, log=lambda m: None)
            cache[name] = (src, out, report)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory) -> Path:
    """A tiny random GQA Llama converted with the tiny preset: the model the training,
    generation and export tests start from (read-only: tests write elsewhere)."""
    from byteify.convert.transplant import convert
    from byteify.convert.presets import load_spec
    from byteify.convert.sources import open_source
    from helpers import make_hf_source

    root = tmp_path_factory.mktemp("tiny-blt")
    src = make_hf_source(root / "src", layers=2, heads=4, kv_heads=2, vocab=300)
    out = root / "blt"
    convert(open_source(src), out, load_spec("tiny"), progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_warm(tmp_path_factory) -> Path:
    """A tiny converted model with the vocabulary warm start, 8 of its 32 encoder coordinates free
    (what ``keep_warm_start`` stages and the recipes that use it need; read-only)."""
    from helpers import tiny_warm_blt

    return tiny_warm_blt(tmp_path_factory.mktemp("tiny-warm"), free_dims=8)


@pytest.fixture(scope="session")
def tiny_entropy_blt(tmp_path_factory) -> Path:
    """A tiny converted model with a source tokenizer and an entropy model whose entropies spread
    (weights scaled up): what the patching, calibration and viewer tests read (read-only)."""
    from patching_helpers import make_tiny_blt

    return make_tiny_blt(tmp_path_factory.mktemp("tiny-entropy-blt"))
