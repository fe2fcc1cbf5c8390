"""``byteify export``: a training run, a checkpoint or a converted model directory -> a directory
that plain ``transformers`` loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (no
``trust_remote_code``), ready to share.

* **Input**: a run directory (its newest checkpoint), a checkpoint directory
  (``step-XXXXXXXX/`` with ``model/`` and, during LoRA stages, a peft ``adapter/``), or a model
  directory (from ``byteify convert``, or a checkpoint's ``model/``).
* **LoRA**: merged by default, tensor by tensor (``W + B @ A * alpha / r``, rsLoRA's
  ``alpha / sqrt(r)``, peft's ``rank_pattern`` / ``alpha_pattern``); with ``merge_lora=False``
  the adapter is copied beside as ``OUT/adapter`` and the weights are the base's.
* **Weights** are streamed one tensor at a time into safetensors shards (memory: one tensor),
  cast to the requested dtype; the entropy model (``model.patcher.*``) and its threshold travel
  with the BLT weights and config.
* **Generation**: transformers 5.24's ``BltForCausalLM`` cannot build its cache, so
  ``use_cache`` is false in ``config.json`` and ``generation_config.json``: stock
  ``model.generate(...)`` works as-is.
* **Model card**: ``README.md`` with YAML front matter (``base_model``, ``library_name``, tags)
  and how the model was made (source, recipe stages, steps, bytes seen, validation bits per byte,
  transplant verification), from ``byteify.json``.

Like ``convert``, the output is built in a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .card import model_card
from .errors import ByteifyError
from .modelfiles import (AtomicDirectory, SafetensorsDir, ShardWriter, check_output_path, dtype_name, parse_dtype,
                         parse_size, write_json)
from .resolve import METADATA_FILE, Location, locate
from .tokenizer import TOKENIZER_FILES


@dataclass
class ExportReport:
    out: Path
    input: Location
    dtype: torch.dtype
    shards: list[str]
    lora: str  # "none", "merged" or "copied"
    merged_modules: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


class LoraMerger:
    """Plain LoRA deltas of a peft adapter, per base weight name: ``B @ A * scaling``."""

    def __init__(self, adapter_dir: Path):
        cfg_path = adapter_dir / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ByteifyError(f"{cfg_path}: unreadable ({exc.__class__.__name__})") from None
        unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora") if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported or cfg.get("modules_to_save") \
                or cfg.get("trainable_token_indices") or cfg.get("layer_replication"):
            what = unsupported[0] if unsupported else f"peft_type {cfg.get('peft_type')}"
            if cfg.get("modules_to_save"):
                what = "modules_to_save"
            raise ByteifyError(f"{cfg_path}: the adapter uses {what}; byteify export merges plain LoRA only "
                               f"(pass --no-merge-lora to copy the adapter beside the weights instead)")
        self.cfg = cfg
        self.rslora = bool(cfg.get("use_rslora"))
        from safetensors.torch import load_file

        f = adapter_dir / "adapter_model.safetensors"
        if not f.exists():
            raise ByteifyError(f"{adapter_dir}: no adapter_model.safetensors")
        tensors = load_file(str(f))
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
        a_suffix = re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$")
        for k, a in tensors.items():
            if not a_suffix.search(k):
                continue
            module = a_suffix.sub("", k).removeprefix("base_model.model.")
            b_key = a_suffix.sub(lambda m: m.group(0).replace("lora_A", "lora_B"), k)
            if b_key not in tensors:
                raise ByteifyError(f"{f}: '{k}' has no matching lora_B tensor")
            self.pairs[module + ".weight"] = (a, tensors[b_key], module)
        others = [k for k in tensors if "lora_A" not in k and "lora_B" not in k]
        if others:
            raise ByteifyError(f"{f}: tensor '{others[0]}' is not a LoRA A/B matrix; byteify export merges plain LoRA "
                               f"only (pass --no-merge-lora)")

    def _pattern_value(self, patterns: dict, module: str, default):
        for key, value in (patterns or {}).items():  # peft's get_pattern_key
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def scaling(self, module: str, rank: int) -> float:
        alpha = self._pattern_value(self.cfg.get("alpha_pattern"), module, self.cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the adapter's delta added (in fp32 for half-precision weights)."""
        a, b, module = self.pairs[name]
        if b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1]:
            raise ByteifyError(f"adapter: LoRA for '{module}' has shapes {list(b.shape)} @ {list(a.shape)}, "
                               f"the weight is {list(weight.shape)}")
        work = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        delta = (b.to(work) @ a.to(work)) * self.scaling(module, a.shape[0])
        return (weight.to(work) + delta).to(weight.dtype)


# ------------------------------------------------------------------------------------------
def export(
    src: str | Path,
    out: str | Path,
    *,
    merge_lora: bool = True,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    base_model: str | None = None,
    log=print,
) -> ExportReport:
    """Write the shareable model directory for ``src`` to ``out``; see the module docstring."""
    t0 = time.perf_counter()
    requested = None if dtype == "auto" else parse_dtype(dtype, allowed=("bf16", "fp16", "fp32", "auto"))
    max_bytes = parse_size(max_shard_size)
    inp = locate(src)
    out = Path(out)
    check_output_path(inp.given, out, force)
    if inp.checkpoint_dir is not None:
        check_output_path(inp.checkpoint_dir, out, force)

    from transformers import BltConfig, GenerationConfig

    try:
        config = BltConfig.from_pretrained(str(inp.model_dir))
    except Exception as exc:
        raise ByteifyError(f"{inp.model_dir / 'config.json'}: transformers cannot parse it: {str(exc).splitlines()[0]}") from None
    weights = SafetensorsDir(inp.model_dir)
    out_dtype = requested or weights.stored_dtype()
    merger = LoraMerger(inp.adapter_dir) if inp.adapter_dir is not None and merge_lora else None
    if merger is not None:
        missing = [k for k in merger.pairs if k not in weights.weight_map]
        if missing:
            raise ByteifyError(f"{inp.adapter_dir}: the adapter adapts '{missing[0]}', which the model has no weight for")
    lora = "none" if inp.adapter_dir is None else ("merged" if merge_lora else "copied")
    meta = inp.metadata
    report = ExportReport(out=out, input=inp, dtype=out_dtype, shards=[], lora=lora)

    with AtomicDirectory(out) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for name in sorted(weights.keys()):
            t = weights.get(name)
            if merger is not None and name in merger.pairs:
                t = merger.merge(name, t)
                report.merged_modules += 1
            writer.add(name, t.to(out_dtype) if t.is_floating_point() else t)
            del t
        report.shards = writer.close()
        # transformers 5.24's BLT cannot build its cache: stock generate() must run cache-free.
        config.use_cache = False
        config.dtype = dtype_name(out_dtype)
        config.architectures = ["BltForCausalLM"]
        config.save_pretrained(str(tmp))
        gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                               pad_token_id=config.pad_token_id, use_cache=False)
        gen.save_pretrained(str(tmp))
        copied = [f for f in TOKENIZER_FILES if (inp.model_dir / f).exists()]
        if "tokenizer.json" in copied:
            for f in copied:
                shutil.copyfile(inp.model_dir / f, tmp / f)
        else:
            from .tokenizer import save_byte_tokenizer

            save_byte_tokenizer(tmp)
            report.warnings.append(f"{inp.model_dir}: no tokenizer files; wrote byteify's byte tokenizer")
        if lora == "copied":
            shutil.copytree(inp.adapter_dir, tmp / "adapter")
        meta = dict(meta)
        meta.pop("side_files", None)  # byteify_source/ (convert's side files) is not part of an export
        meta["export"] = {"byteify_version": __version__, "from": str(Path(src).resolve()), "kind": inp.kind,
                          "checkpoint": str(inp.checkpoint_dir.resolve()) if inp.checkpoint_dir else None,
                          "dtype": dtype_name(out_dtype), "lora": lora, "merged_modules": report.merged_modules}
        write_json(tmp / METADATA_FILE, meta)
        (tmp / "README.md").write_text(model_card(meta, config, dtype=out_dtype, lora=lora, base_model=base_model,
                                                  name=out.name))
    report.seconds = time.perf_counter() - t0
    return report
