"""The source model as a teacher, rebuilt from a converted BLT directory alone: the transplanted
global layers (q/k permuted back to ``rotate_half``), plus the source's embeddings, final norm
and LM head that ``byteify convert`` kept in ``byteify_source/``; and the teacher a training run
shares between its stages (with the source tokenizer and its byte trie)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..convert.sources import load_tensor_map
from ..convert.transplant import interleaved_to_rope_half
from ..errors import ByteifyError
from ..modelfiles import SafetensorsDir
from ..resolve import Location, locate


def teacher_on_meta(loc: Location):
    """The source model's architecture, built on the meta device from ``byteify_source/config.json``
    (no weights): what :func:`load_teacher` fills and what the dry run counts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    side = loc.side_dir("the source's config, embeddings, head and norm the teacher needs")
    if not (side / "config.json").is_file():
        raise ByteifyError(f"{side / 'config.json'}: not found; the teacher (the source model) is rebuilt from it "
                           "(re-convert the source with 'byteify convert')")
    config = AutoConfig.from_pretrained(str(side))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def load_teacher(where: str | Path | Location, dtype=torch.float32):
    """The source ``LlamaForCausalLM`` (eval mode, no gradients) of a converted directory, or of
    the converted directory a checkpoint or run was trained from."""
    loc = where if isinstance(where, Location) else locate(where)
    teacher = teacher_on_meta(loc)
    config = teacher.config
    side = loc.side_dir()
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


def run_teacher(ctx, dtype=torch.float32) -> dict:
    """``{"teacher", "tokenizer", "trie"}`` of a training run, built once per dtype
    (``ctx.shared``) and reused by every stage that distils: the frozen source model on the run's
    device, under torchrun sharded like the student (one unit per layer, so no process keeps the
    whole teacher), the source tokenizer and the byte trie over its vocabulary."""
    key = f"teacher-{dtype}"
    shared = ctx.shared.get(key)
    if shared is not None:
        return shared
    from ..resolve import load_source_tokenizer
    from ..tokenizer import token_byte_strings
    from .aligned import ByteTrie

    teacher = load_teacher(ctx.location, dtype=dtype)
    if ctx.dist.sharded:
        from torch.distributed.fsdp import fully_shard

        from .distributed import mixed_precision

        policy = mixed_precision(ctx.recipe.run, ctx.dist.device)
        if dtype != torch.float32:  # a low-precision teacher computes in its own dtype
            policy = type(policy)(param_dtype=dtype, reduce_dtype=policy.reduce_dtype)
        kw = {"mesh": ctx.dist.mesh, "mp_policy": policy}
        for layer in teacher.model.layers:
            fully_shard(layer, **kw)
        fully_shard(teacher, **kw)
    other = next((v for k, v in ctx.shared.items() if k.startswith("teacher-")), None)
    tok = other["tokenizer"] if other else load_source_tokenizer(ctx.location)
    trie = other["trie"] if other else ByteTrie(token_byte_strings(tok))
    shared = ctx.shared[key] = {"teacher": teacher.to(ctx.dist.device), "tokenizer": tok, "trie": trie}
    return shared
