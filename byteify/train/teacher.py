"""The source model as a teacher, rebuilt from a converted BLT directory alone: the transplanted
global layers (q/k permuted back to ``rotate_half``), plus the source's embeddings, final norm
and LM head that ``byteify convert`` kept in ``byteify_source/``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..convert.sources import load_tensor_map
from ..convert.transplant import interleaved_to_rope_half
from ..errors import ByteifyError
from ..modelfiles import SafetensorsDir
from ..resolve import Location, locate


@torch.no_grad()
def load_teacher(where: str | Path | Location, dtype=torch.float32):
    """The source ``LlamaForCausalLM`` (eval mode, no gradients) of a converted directory, or of
    the converted directory a checkpoint or run was trained from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loc = where if isinstance(where, Location) else locate(where)
    side = loc.side_dir("the source's embeddings, head and norm the teacher needs")
    config = AutoConfig.from_pretrained(str(side))
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    teacher = teacher.to_empty(device="cpu")
    blt = SafetensorsDir(side.parent)
    tmap = load_tensor_map()
    sd = {}
    for i in range(config.num_hidden_layers):
        for e in tmap["layer"]:
            w = blt.get(tmap["layer_target"].format(i=i) + e["blt"])
            if (e.get("transform") or {}).get("hf"):
                w = interleaved_to_rope_half(w, getattr(config, e["transform"]["hf"][1]))
            sd[e["hf"].format(i=i)] = w
    source_weights = SafetensorsDir(side, prefix="source_weights")
    for e in tmap["side"]:
        if e["name"] in source_weights:
            sd[e["hf"]] = source_weights.get(e["name"])
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
