"""The source model as a teacher, rebuilt from a converted BLT directory alone: the transplanted
global layers (q/k permuted back to ``rotate_half``), plus the source's embeddings, final norm
and LM head that ``byteify convert`` kept in ``byteify_source/``.  Also the source tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .conversion import SIDE_DIR, interleaved_to_rope_half
from .errors import ByteifyError
from .sources import load_tensor_map


def converted_dir(model_dir: str | Path) -> Path:
    """The directory holding ``byteify_source/``: the model dir itself or, for a training
    checkpoint, the converted directory it came from (``byteify.json``)."""
    d = Path(model_dir)
    if (d / SIDE_DIR).exists():
        return d
    meta = d / "byteify.json"
    if meta.exists():
        src = json.loads(meta.read_text()).get("converted_model_dir")
        if src and (Path(src) / SIDE_DIR).exists():
            return Path(src)
    raise ByteifyError(f"{d}: no {SIDE_DIR}/ (source embeddings, head, tokenizer); convert the source with 'byteify convert'")


def load_source_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok_dir = converted_dir(model_dir) / SIDE_DIR / "tokenizer"
    if not tok_dir.exists():
        raise ByteifyError(f"{tok_dir}: the source had no tokenizer; source-token patches and distillation need one")
    return AutoTokenizer.from_pretrained(str(tok_dir))


@torch.no_grad()
def load_teacher(model_dir: str | Path, dtype=torch.float32):
    """The source ``LlamaForCausalLM`` (eval mode, no gradients)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .verification import BltWeights

    root = converted_dir(model_dir)
    side = root / SIDE_DIR
    config = AutoConfig.from_pretrained(str(side))
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    teacher = teacher.to_empty(device="cpu")
    blt = BltWeights(root)
    tmap = load_tensor_map()
    sd = {}
    for i in range(config.num_hidden_layers):
        for e in tmap["layer"]:
            w = blt.get(tmap["layer_target"].format(i=i) + e["blt"])
            if (e.get("transform") or {}).get("hf"):
                w = interleaved_to_rope_half(w, getattr(config, e["transform"]["hf"][1]))
            sd[e["hf"].format(i=i)] = w
    with safe_open(str(side / "source_weights.safetensors"), framework="pt") as f:
        for e in tmap["side"]:
            if e["name"] in f.keys():
                sd[e["hf"]] = f.get_tensor(e["name"])
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = teacher.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ByteifyError(f"{side}: cannot rebuild the teacher (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        teacher.tie_weights()
    teacher.model.rotary_emb.__init__(config)  # buffers were created on meta
    teacher = teacher.to(dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
