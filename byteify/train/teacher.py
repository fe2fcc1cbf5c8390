"""The source model as a teacher, rebuilt from a converted BLT directory alone: the transplanted
global layers (q/k permuted back to ``rotate_half``), plus the source's embeddings, final norm
and LM head that ``byteify convert`` kept in ``byteify_source/``; the teacher a training run
shares between its stages (with the source tokenizer and its byte trie); and its next-byte
targets (:func:`byte_marginals`), computed a chunk of positions at a time on its device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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


# token logits the teacher's head computes at once (positions x vocabulary): 2^24 is 130 positions
# of Llama 3's 128,256 tokens, ~0.4 GB with the float copies and the float64 prefix sums
HEAD_CHUNK = 2**24


class MarginalHead(nn.Module):
    """The teacher's LM head, which returns next-byte targets instead of token logits while
    :func:`byte_marginals` has set ``queries``: the head runs over the queried positions only, a
    chunk of ``HEAD_CHUNK`` logits at a time, and each chunk is softmaxed and marginalised by the
    byte trie right there, so neither a [positions, vocabulary] tensor nor any probability leaves
    the device.  It runs inside the model's forward, where FSDP2 has gathered the head's weight
    (the root unit), exactly as for the plain head; without queries it *is* the plain head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head, self.queries = head, None

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.queries is None:
            return self.head(hidden)
        trie, at, token, depth, temperature = self.queries
        h = hidden.flatten(0, -2)  # [positions, D]; ``at`` indexes them
        used, which = torch.unique(at.to(h.device), return_inverse=True)
        token, depth = token.to(h.device), depth.to(h.device)
        rows = max(1, HEAD_CHUNK // self.head.weight.shape[0])
        out = torch.empty(len(which), 256, dtype=torch.float32, device=h.device)
        for lo in range(0, len(used), rows):
            sel = torch.nonzero((which >= lo) & (which < lo + rows)).flatten()
            probs = (self.head(h[used[lo:lo + rows]]).float() / temperature).softmax(-1)
            out[sel] = trie.marginals(probs, token[sel], depth[sel], which=which[sel] - lo).float()
        return out


def marginal_head(teacher) -> MarginalHead:
    """The teacher's :class:`MarginalHead`, put in place of its LM head the first time (before
    sharding, in :func:`run_teacher`; a tied head keeps sharing the embeddings' tensor)."""
    if not isinstance(teacher.lm_head, MarginalHead):
        teacher.lm_head = MarginalHead(teacher.lm_head)
    return teacher.lm_head


@torch.no_grad()
def byte_marginals(teacher, trie, at: torch.Tensor, token: torch.Tensor, depth: torch.Tensor,
                   temperature: float, input_ids: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """The teacher's next-byte distributions [Q, 256] (float32, on its device) for Q queries: its
    next-token distribution at flat position ``at`` of ``input_ids`` (temperature applied to the
    token logits), marginalised by ``trie`` over the tokens that extend the first ``depth`` bytes
    of ``token``.  One forward; ``forward_kwargs`` go to it (masks, positions)."""
    head = marginal_head(teacher)
    device = head.weight.device
    head.queries = (trie, at, token, depth, temperature)
    try:
        return teacher(input_ids.to(device), use_cache=False, **forward_kwargs).logits
    finally:
        head.queries = None


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


def run_teacher(ctx) -> dict:
    """``{"teacher", "tokenizer", "trie"}`` of a training run, built once per dtype (the stage's
    ``teacher_dtype``; ``ctx.shared``) and reused by every stage that distils: the frozen source model on the run's
    device, under torchrun sharded like the student (one unit per layer, so no process keeps the
    whole teacher), the source tokenizer and the byte trie over its vocabulary."""
    dtype = torch.bfloat16 if ctx.stage.teacher_dtype == "bf16" else torch.float32
    key = f"teacher-{dtype}"
    shared = ctx.shared.get(key)
    if shared is not None:
        return shared
    from ..resolve import load_source_tokenizer
    from ..tokenizer import token_byte_strings
    from .aligned import ByteTrie

    teacher = load_teacher(ctx.location, dtype=dtype)
    marginal_head(teacher)  # its weight stays in the root unit, gathered with the embeddings
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
