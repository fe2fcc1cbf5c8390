"""The model card (``README.md``) of an exported model: YAML front matter the Hugging Face hub
reads (``base_model`` only when the source's hub id is known, never a local path), then how the
model was made (source, transplant check, stages, data, bytes seen, validation bits per byte,
patching) and how to use it, all from ``byteify.json`` and the BLT config."""

from __future__ import annotations

import json
import re

import torch

from . import __version__
from .modelfiles import dtype_name

CARD_TAGS = ("byte-latent-transformer", "blt", "byteify", "tokenizer-free")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id_from_path(path: str) -> str | None:
    """The hub id of a file or directory inside a Hugging Face hub cache (``models--org--name``)."""
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path or "")
    return f"{m.group(1)}/{m.group(2)}" if m else None


def is_hub_id(text: str | None) -> bool:
    return bool(text) and bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "/", "~"))


def base_model_id(meta: dict, given: str | None = None) -> str | None:
    """``--base-model``, else the source's hub id recorded at conversion (or readable from a hub
    cache path); None when unknown (a local file is never named)."""
    if given:
        return given
    src = meta.get("source") or {}
    for cand in (src.get("hub_id"), hub_id_from_path(src.get("path") or "")):
        if is_hub_id(cand):
            return cand
    return None


def model_card(meta: dict, config, *, dtype: torch.dtype, lora: str, base_model: str | None = None,
               name: str | None = None) -> str:
    """The README.md of an exported model, from byteify.json (``meta``) and the BLT config."""
    base = base_model_id(meta, base_model)
    front = ["---"] + ([f"base_model: {json.dumps(base)}"] if base else [])  # a JSON string is a YAML scalar
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in CARD_TAGS] + ["---"]
    lines = ["", f"# {name or 'Byte Latent Transformer'}", "",
             f"A [Byte Latent Transformer](https://arxiv.org/abs/2412.09871) (BLT) that reads and writes raw UTF-8 "
             f"bytes, made with byteify {meta.get('byteify_version', __version__)} from "
             f"{'`' + base + '`' if base else 'a Llama-family checkpoint'}: the source's decoder layers became the BLT "
             f"global transformer; the local encoder, local decoder, hash n-gram embeddings and entropy model are new.",
             "", "## How it was made", ""]
    lines += _architecture(meta, config, base) + _training(meta) + _export_and_patching(meta, config, dtype, lora)
    return "\n".join(front + lines + _usage(name, lora))


def _architecture(meta: dict, config, base: str | None) -> list[str]:
    src = meta.get("source") or {}
    lines = []
    if src:
        shown = base or (src.get("path") or "?").replace("\\", "/").rsplit("/", 1)[-1]  # never a local path
        lines.append(f"- **Source**: `{shown}` ({src.get('format', '?')}, {src.get('architecture', '?')}, "
                     f"{src.get('dtype', '?')}{', tied embeddings' if src.get('tied_embeddings') else ''})")
    g, e, d, p = config.global_config, config.encoder_config, config.decoder_config, config.patcher_config
    lines.append(f"- **Global transformer** (transplanted): {g.num_hidden_layers} layers, hidden {g.hidden_size}, "
                 f"{g.num_attention_heads} heads / {getattr(g, 'num_key_value_heads', g.num_attention_heads)} KV heads")
    lines.append(f"- **New parts**: local encoder {e.num_hidden_layers} layer(s) x {e.hidden_size}, local decoder "
                 f"{d.num_hidden_layers} layer(s) x {d.hidden_size}, hash n-grams {list(config.encoder_hash_byte_group_size)} "
                 f"x {config.encoder_hash_byte_group_vocab}, entropy model {p.num_hidden_layers} layer(s) x {p.hidden_size}")
    if "seed" in meta:
        lines.append(f"- **Conversion seed**: {meta['seed']}")
    ver = meta.get("verification")
    if isinstance(ver, dict) and ver:
        rel, tol = ver.get("max_rel"), ver.get("tolerance")
        lines.append("- **Transplant verification**: "
                     + (f"max relative difference {rel:.2e} of hidden states " if isinstance(rel, (int, float)) else "")
                     + (f"(tolerance {tol:.0e}) " if isinstance(tol, (int, float)) else "")
                     + ("-> PASS" if ver.get("passed", True) else "-> FAIL"))
    else:
        lines.append("- **Transplant verification**: not recorded in byteify.json (`byteify convert` verifies by "
                     "default and refuses to write a failing transplant)")
    return lines


def _training(meta: dict) -> list[str]:
    training = meta.get("training") or {}
    if not training:
        return ["- **Training**: none: the new parts are at their initialization, so the model does not "
                "predict text well yet (train it with `byteify train`)"]
    recipe = training.get("recipe") or {}
    lines = ["- **Training** (`byteify train`):"]
    for s in recipe.get("stages") or []:
        lora = s.get("lora")
        lines.append(f"  - stage `{s.get('name')}`: {s.get('steps')} steps x {s.get('batch_bytes')} bytes, "
                     f"lr {s.get('lr')}, trains {', '.join(s.get('train') or []) or '-'}"
                     + (f", LoRA r={lora.get('rank')} alpha={lora.get('alpha')} on the global transformer" if lora else ""))
    data = recipe.get("data") or {}
    if data.get("sources"):
        names = [str(x.get("path")) if not str(x.get("path")).startswith("/") else str(x.get("path")).rsplit("/", 1)[-1]
                 for x in data["sources"]]
        lines.append(f"  - data: {', '.join(names)} (seq_len {data.get('seq_len')} bytes)")
    seen = training.get("bytes_seen")
    lines.append(f"  - steps: {training.get('global_step')}" + (f"; bytes seen: {seen:,}" if isinstance(seen, int) else ""))
    lines.append(f"  - last stage: `{training.get('stage')}`")
    bpb = training.get("last_val_bpb")
    lines.append(f"  - final validation bits per byte: {bpb:.4f}" if isinstance(bpb, (int, float))
                 else "  - final validation bits per byte: not measured")
    return lines


def _export_and_patching(meta: dict, config, dtype: torch.dtype, lora: str) -> list[str]:
    lines = [f"- **Export**: {dtype_name(dtype)}, " + {
        "merged": "LoRA adapter merged into the weights", "copied": "LoRA adapter not merged (in `adapter/`, load it "
        "with peft)", "none": "no LoRA adapter"}[lora],
        f"- **Patching**: config `patching_mode` = {config.patching_mode!r}, threshold {config.patching_threshold} "
        f"(the entropy model ships in the weights)"]
    for key in ("calibration", "calibration_monotonic"):
        cal = meta.get(key)
        if isinstance(cal, dict) and isinstance(cal.get("threshold"), (int, float)):
            got, want = cal.get("mean_bytes_per_patch"), cal.get("target_bytes_per_patch")
            lines.append(f"  - `byteify calibrate`: {'monotonic ' if key.endswith('monotonic') else ''}threshold "
                         f"{cal['threshold']:.4f} nats"
                         + (f", {got:.2f} bytes per patch" if isinstance(got, (int, float)) else "")
                         + (f" (target {want:.2f})" if isinstance(want, (int, float)) else ""))
    recipe = (meta.get("training") or {}).get("recipe") or {}
    trained = [((s.get("patching") or recipe.get("patching") or {}), s) for s in recipe.get("stages") or []]
    trained = [(p, s) for p, s in trained if p.get("mode") and p["mode"] != "entropy" and s.get("train") != ["entropy_model"]]
    if trained:
        p, _ = trained[-1]
        lines.append(f"  - trained with `{p['mode']}` patching"
                     + (f" (patch size {p.get('patch_size')})" if p["mode"] == "static" else "")
                     + "; stock transformers `forward`/`generate` patch "
                     + ("with the entropy model" if config.patching_mode == "entropy" else "one byte per patch")
                     + ", so pass `patch_lengths` to `forward` to reproduce the trained patching")
    return lines


def _usage(name: str | None, lora: str) -> list[str]:
    where = json.dumps(name or ".")
    lines = ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"model = AutoModelForCausalLM.from_pretrained({where})",
             f"tokenizer = AutoTokenizer.from_pretrained({where})",
             "ids = tokenizer(\"The if statement\", return_tensors=\"pt\").input_ids",
             "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
             "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```"]
    if lora == "copied":
        lines += ["", "With the adapter:", "", "```python", "from peft import PeftModel", "",
                  f"model = PeftModel.from_pretrained(model, {json.dumps((name or '.') + '/adapter')})", "```"]
    return lines + ["", "Tokens are bytes: id = byte + 4 (0 <boe>, 1 <s>, 2 </s>, 3 <pad>). `use_cache` is off in the "
                    "config and generation config because transformers' BLT cannot build its cache; generation "
                    "recomputes the whole sequence each step.", ""]
