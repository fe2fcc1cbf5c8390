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
from .conversion import DTYPES, METADATA_FILE, AtomicDirectory, ShardWriter, check_output_path, parse_size
from .errors import ByteifyError
from .tokenizer import TOKENIZER_FILES

CARD_TAGS = ("byte-latent-transformer", "blt", "byteify", "tokenizer-free")
_ST_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ExportInput:
    """What an export reads: the model directory and, for a LoRA checkpoint, the adapter."""

    path: Path  # as given
    kind: str  # "run", "checkpoint" or "model"
    model_dir: Path
    adapter_dir: Path | None = None
    checkpoint_dir: Path | None = None


@dataclass
class ExportReport:
    out: Path
    input: ExportInput
    dtype: torch.dtype
    shards: list[str]
    lora: str  # "none", "merged" or "copied"
    merged_modules: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
def _is_checkpoint(p: Path) -> bool:
    return (p / "trainer.json").exists() and (p / "model" / "config.json").exists()


def _check_blt_model_dir(model_dir: Path, given: Path) -> None:
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ByteifyError(f"{cfg_path}: unreadable ({exc.__class__.__name__}); {given} is not a BLT model directory") from None
    if cfg.get("model_type") != "blt":
        raise ByteifyError(f"{given}: not a BLT model directory (config.json model_type is {cfg.get('model_type')!r}, "
                           f"expected 'blt')")
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        raise ByteifyError(f"{given}: no model.safetensors or model.safetensors.index.json in {model_dir}")


def resolve_input(path: str | Path) -> ExportInput:
    """Classify ``path`` (run, checkpoint or model directory); one-line errors for anything else."""
    from .checkpoints import latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise ByteifyError(f"{p}: not found (expected a training run, a checkpoint or a BLT model directory)")
    if not p.is_dir():
        raise ByteifyError(f"{p}: not a directory (expected a training run, a checkpoint or a BLT model directory)")
    if _is_checkpoint(p):
        inp = ExportInput(p, "checkpoint", p / "model", checkpoint_dir=p)
    elif (p / "checkpoints").is_dir() and not (p / "config.json").exists():
        ck = latest_checkpoint(p)
        if ck is None:
            raise ByteifyError(f"{p}: a training run with no finished checkpoint under {p / 'checkpoints'}")
        inp = ExportInput(p, "run", ck / "model", checkpoint_dir=ck)
    elif (p / "config.json").exists():
        inp = ExportInput(p, "model", p)
        if p.name == "model" and _is_checkpoint(p.parent):  # a checkpoint's model/: keep its adapter
            inp.checkpoint_dir = p.parent
    else:
        raise ByteifyError(f"{p}: not a BLT model directory (no config.json), a checkpoint (no trainer.json) "
                           f"or a training run (no checkpoints/)")
    if inp.checkpoint_dir is not None and (inp.checkpoint_dir / "adapter" / "adapter_config.json").exists():
        inp.adapter_dir = inp.checkpoint_dir / "adapter"
    _check_blt_model_dir(inp.model_dir, p)
    return inp


# ------------------------------------------------------------------------------------------
class _Weights:
    """The safetensors tensors of a directory (single file or sharded), read one at a time."""

    def __init__(self, model_dir: Path, prefix: str = "model"):
        from safetensors import safe_open

        index = model_dir / f"{prefix}.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ByteifyError(f"{index}: invalid index ({exc})") from None
        else:
            single = model_dir / f"{prefix}.safetensors"
            try:
                with safe_open(str(single), framework="pt") as f:
                    wm = {k: single.name for k in f.keys()}
            except Exception as exc:
                raise ByteifyError(f"{single}: unreadable safetensors file: {str(exc).splitlines()[0]}") from None
        self.dir, self.weight_map = model_dir, wm
        self._handles: dict = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def dtype_of(self, name: str) -> str:
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

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
        return self._handle(self.weight_map[name]).get_tensor(name)


def stored_dtype(weights: _Weights) -> torch.dtype:
    """The dtype most of the floating weights are stored in (by count of tensors)."""
    counts: dict[str, int] = {}
    for k in weights.keys():
        d = weights.dtype_of(k)
        if d in _ST_NAMES:
            counts[d] = counts.get(d, 0) + 1
    return _ST_NAMES[max(counts, key=counts.get)] if counts else torch.float32


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
def _hub_id_from_path(path: str) -> str | None:
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def model_card(meta: dict, config, *, dtype: torch.dtype, lora: str, base_model: str | None = None,
               name: str | None = None) -> str:
    """The README.md of an exported model, from byteify.json (``meta``) and the BLT config."""
    src = meta.get("source") or {}
    src_path = src.get("path")
    base = base_model or (_hub_id_from_path(src_path) if src_path else None) or src_path
    training = meta.get("training") or {}
    recipe = training.get("recipe") or {}
    stages = recipe.get("stages") or []
    front = ["---"]
    if base:
        front.append(f"base_model: {_yaml_str(base)}")
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in CARD_TAGS]
    front.append("---")

    title = name or "Byte Latent Transformer"
    lines = ["", f"# {title}", ""]
    lines.append(f"A [Byte Latent Transformer](https://arxiv.org/abs/2412.09871) (BLT) that reads and writes raw "
                 f"UTF-8 bytes, made with byteify {meta.get('byteify_version', __version__)} "
                 f"from {'`' + base + '`' if base else 'a Llama-family checkpoint'}: the source's decoder layers "
                 f"became the BLT global transformer; the local encoder, local decoder, hash n-gram embeddings and "
                 f"entropy model are new.")
    lines += ["", "## How it was made", ""]
    if src:
        lines.append(f"- **Source**: `{src_path}` ({src.get('format', '?')}, {src.get('architecture', '?')}, "
                     f"{src.get('dtype', '?')}{', tied embeddings' if src.get('tied_embeddings') else ''})")
    g = config.global_config
    lines.append(f"- **Global transformer** (transplanted): {g.num_hidden_layers} layers, hidden {g.hidden_size}, "
                 f"{g.num_attention_heads} heads / {getattr(g, 'num_key_value_heads', g.num_attention_heads)} KV heads")
    e, d, p = config.encoder_config, config.decoder_config, config.patcher_config
    lines.append(f"- **New parts**: local encoder {e.num_hidden_layers} layer(s) x {e.hidden_size}, local decoder "
                 f"{d.num_hidden_layers} layer(s) x {d.hidden_size}, hash n-grams {list(config.encoder_hash_byte_group_size)} "
                 f"x {config.encoder_hash_byte_group_vocab}, entropy model {p.num_hidden_layers} layer(s) x {p.hidden_size}")
    if "seed" in meta:
        lines.append(f"- **Conversion seed**: {meta['seed']}")
    ver = meta.get("verification")
    if isinstance(ver, dict) and ver:
        rel = ver.get("max_rel")
        lines.append(f"- **Transplant verification**: "
                     + (f"max relative difference {rel:.2e} of hidden states " if isinstance(rel, (int, float)) else "")
                     + (f"(tolerance {ver['tolerance']:.0e}) " if isinstance(ver.get("tolerance"), (int, float)) else "")
                     + ("-> PASS" if ver.get("passed", True) else "-> FAIL"))
    else:
        lines.append("- **Transplant verification**: not recorded in byteify.json (`byteify convert` verifies by "
                     "default and refuses to write a failing transplant)")
    if training:
        lines.append("- **Training** (`byteify train`):")
        for s in stages:
            what = ", ".join(s.get("train") or []) or "-"
            lora_s = s.get("lora")
            lines.append(f"  - stage `{s.get('name')}`: {s.get('steps')} steps x {s.get('batch_bytes')} bytes, "
                         f"lr {s.get('lr')}, trains {what}"
                         + (f", LoRA r={lora_s.get('rank')} alpha={lora_s.get('alpha')} on the global transformer"
                            if lora_s else ""))
        data = recipe.get("data") or {}
        if data.get("sources"):
            lines.append(f"  - data: {', '.join(str(x.get('path')) for x in data['sources'])} "
                         f"(seq_len {data.get('seq_len')} bytes)")
        lines.append(f"  - steps: {training.get('global_step')}; bytes seen: {training.get('bytes_seen'):,}"
                     if isinstance(training.get("bytes_seen"), int) else f"  - steps: {training.get('global_step')}")
        lines.append(f"  - last stage: `{training.get('stage')}`")
        bpb = training.get("last_val_bpb")
        lines.append(f"  - final validation bits per byte: {bpb:.4f}" if isinstance(bpb, (int, float))
                     else "  - final validation bits per byte: not measured")
    else:
        lines.append("- **Training**: none: the new parts are at their initialization, so the model does not "
                     "predict text well yet (train it with `byteify train`)")
    lines.append(f"- **Export**: {str(dtype).removeprefix('torch.')}, "
                 + {"merged": "LoRA adapter merged into the weights", "copied":
                    "LoRA adapter not merged (in `adapter/`, load it with peft)", "none": "no LoRA adapter"}[lora])
    lines.append(f"- **Patching**: config `patching_mode` = {config.patching_mode!r}, threshold "
                 f"{config.patching_threshold} (the entropy model ships in the weights)")
    for key in ("calibration", "calibration_monotonic"):
        cal = meta.get(key)
        if isinstance(cal, dict) and isinstance(cal.get("threshold"), (int, float)):
            got, want = cal.get("mean_bytes_per_patch"), cal.get("target_bytes_per_patch")
            lines.append(f"  - `byteify calibrate`: {'monotonic ' if key.endswith('monotonic') else ''}threshold "
                         f"{cal['threshold']:.4f} nats"
                         + (f", {got:.2f} bytes per patch" if isinstance(got, (int, float)) else "")
                         + (f" (target {want:.2f})" if isinstance(want, (int, float)) else ""))
    trained = [((s.get("patching") or recipe.get("patching") or {}).get("mode"), s) for s in stages]
    trained = [(m, s) for m, s in trained if m and m != "entropy" and s.get("train") != ["entropy_model"]]
    if trained:
        mode, s = trained[-1]
        size = ((s.get("patching") or recipe.get("patching") or {}).get("patch_size"))
        lines.append(f"  - trained with `{mode}` patching{f' (patch size {size})' if mode == 'static' else ''}; "
                     f"stock transformers `forward`/`generate` patch "
                     + ("with the entropy model" if config.patching_mode == "entropy" else "one byte per patch")
                     + ", so pass `patch_lengths` to `forward` to reproduce the trained patching")
    where = json.dumps(name or ".")
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained({where})",
              f"tokenizer = AutoTokenizer.from_pretrained({where})",
              "ids = tokenizer(\"The if statement\", return_tensors=\"pt\").input_ids",
              "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
              "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```"]
    if lora == "copied":
        lines += ["", "With the adapter:", "", "```python", "from peft import PeftModel", "",
                  f"model = PeftModel.from_pretrained(model, {json.dumps((name or '.') + '/adapter')})", "```"]
    lines += ["", "Tokens are bytes: id = byte + 4 (0 <boe>, 1 <s>, 2 </s>, 3 <pad>). `use_cache` is off in the "
              "config and generation config because transformers' BLT cannot build its cache; generation recomputes "
              "the whole sequence each step.", ""]
    return "\n".join(front + lines)


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
    if dtype != "auto" and dtype not in DTYPES:
        raise ByteifyError(f"--dtype '{dtype}': expected bf16, fp16 or fp32 (or auto: the input's)")
    max_bytes = parse_size(max_shard_size)
    inp = resolve_input(src)
    out = Path(out)
    check_output_path(inp.path, out, force)
    if inp.checkpoint_dir is not None:
        check_output_path(inp.checkpoint_dir, out, force)

    from transformers import BltConfig, GenerationConfig

    try:
        config = BltConfig.from_pretrained(str(inp.model_dir))
    except Exception as exc:
        raise ByteifyError(f"{inp.model_dir / 'config.json'}: transformers cannot parse it: {str(exc).splitlines()[0]}") from None
    weights = _Weights(inp.model_dir)
    out_dtype = stored_dtype(weights) if dtype == "auto" else DTYPES[dtype]
    merger = LoraMerger(inp.adapter_dir) if inp.adapter_dir is not None and merge_lora else None
    if merger is not None:
        missing = [k for k in merger.pairs if k not in weights.weight_map]
        if missing:
            raise ByteifyError(f"{inp.adapter_dir}: the adapter adapts '{missing[0]}', which the model has no weight for")
    lora = "none" if inp.adapter_dir is None else ("merged" if merge_lora else "copied")
    meta_path = inp.model_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
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
        config.dtype = str(out_dtype).removeprefix("torch.")
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
                          "dtype": str(out_dtype).removeprefix("torch."), "lora": lora,
                          "merged_modules": report.merged_modules}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(meta, config, dtype=out_dtype, lora=lora, base_model=base_model,
                                                  name=out.name))
    report.seconds = time.perf_counter() - t0
    return report
