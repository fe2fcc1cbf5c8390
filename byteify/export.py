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

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .card import model_card
from .errors import ByteifyError
from .modelfiles import AtomicDirectory, ShardWriter, check_output_path, dtype_name, parse_dtype, parse_size, write_json
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

    src_dir = inp.config_dir
    try:
        config = BltConfig.from_pretrained(str(src_dir))
    except Exception as exc:
        raise ByteifyError(f"{src_dir / 'config.json'}: transformers cannot parse it: {str(exc).splitlines()[0]}") from None
    weights = inp.weights(merge_lora=merge_lora)  # tensor by tensor, from safetensors or from the shards
    out_dtype = requested or weights.stored_dtype()
    lora = "none" if not inp.has_adapter else ("merged" if merge_lora else "copied")
    meta = inp.metadata
    report = ExportReport(out=out, input=inp, dtype=out_dtype, shards=[], lora=lora)

    with AtomicDirectory(out) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for name in sorted(weights.keys()):
            t = weights.get(name)
            writer.add(name, t.to(out_dtype) if t.is_floating_point() else t)
            del t
        report.shards = writer.close()
        report.merged_modules = getattr(weights, "merged", 0)
        # transformers 5.24's BLT cannot build its cache: stock generate() must run cache-free.
        config.use_cache = False
        config.dtype = dtype_name(out_dtype)
        config.architectures = ["BltForCausalLM"]
        config.save_pretrained(str(tmp))
        gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                               pad_token_id=config.pad_token_id, use_cache=False)
        gen.save_pretrained(str(tmp))
        copied = [f for f in TOKENIZER_FILES if (src_dir / f).exists()]
        if "tokenizer.json" in copied:
            for f in copied:
                shutil.copyfile(src_dir / f, tmp / f)
        else:
            from .tokenizer import save_byte_tokenizer

            save_byte_tokenizer(tmp)
            report.warnings.append(f"{src_dir}: no tokenizer files; wrote byteify's byte tokenizer")
        if lora == "copied":
            copy_adapter(inp, tmp / "adapter")
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


def copy_adapter(inp: Location, out: Path) -> None:
    """The LoRA adapter of a checkpoint as a peft directory (from its sharded tensors if needed)."""
    if inp.adapter_dir is not None:
        shutil.copytree(inp.adapter_dir, out)
        return
    from safetensors.torch import save_file

    from .resolve import TrainingShards

    shards = TrainingShards(inp.sharded_dir)
    out.mkdir()
    shutil.copyfile(inp.sharded_dir / "adapter_config.json", out / "adapter_config.json")
    save_file({k: shards.shards.get(v).contiguous() for k, v in shards.lora.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
