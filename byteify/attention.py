"""Memory-efficient attention for transformers' ``BltForCausalLM``, registered through
transformers' public interfaces (no BLT class or function is patched).

This module owns the attention implementation named :data:`MEMORY_EFFICIENT` and the mask
function that goes with it:

* ``transformers.AttentionMaskInterface.register(MEMORY_EFFICIENT, local_attention_mask)``:
  ``masking_utils.create_sliding_window_causal_mask`` (called by ``BltModel.forward`` for the local
  encoder/decoder and by ``BltPatcher.forward`` for the entropy model) asks this function for the
  mask of a config whose ``_attn_implementation`` is ours.  Instead of the dense ``[B,1,S,S]`` mask
  it returns a :class:`LocalWindow` (the window size, a few bytes).  Anything that is not the plain
  sliding-window pattern over a whole sequence (padding in a 2D ``attention_mask``, a cache offset,
  packed sequences, extra and/or mask functions) gets transformers' own dense ``sdpa_mask``.
  Full causal masks (the global transformer, an entropy model without a window) also get
  ``sdpa_mask``, which returns ``None`` there, so they run as stock ``sdpa`` (``is_causal``).
* ``transformers.AttentionInterface.register(MEMORY_EFFICIENT, memory_efficient_attention_forward)``:
  every ``BltSelfAttention`` / ``BltCrossAttention`` looks its function up by
  ``config._attn_implementation``.  Ours

  - runs sliding-window self-attention (a :class:`LocalWindow` mask) as SDPA over query blocks,
    each against the bounded key range its window can see (views, no copies), with one small
    additive ``[block, block + window]`` band mask shared by all blocks: memory O(S * window) and
    ~2x the window's work instead of O(S^2) (stock SDPA also turns the dense bool mask into a
    float copy per layer and keeps it for the backward pass);
  - runs BLT's patch cross-attention by patch ids instead of SDPA over the dense
    ``[B,1,P*k,S]`` / ``[B,1,S,P*k]`` mask: O(S * k) scores, a segment softmax (encoder: slots of
    patch p over the bytes of p) or a k-way softmax (decoder: byte t over the k slots of its
    patch), as two ``torch.autograd.Function`` kernels that walk the bytes in chunks and recompute
    the scores in the backward pass (flash-attention style: keep q, k, v, the output and the
    log-sum-exp), with fp32 accumulation; with attention dropout on, stock ``sdpa`` is used;
  - hands everything else to transformers' stock ``sdpa_attention_forward``.

What no supported hook reaches: BLT's cross-attention masks are built by
``modeling_blt._prepare_patch_cross_attention_mask`` inside ``BltModel.forward`` whatever the
attention implementation, as dense fp32 ``[B,1,P*k,S]`` and ``[B,1,S,P*k]`` tensors, and held until
the forward returns.  The attention function only receives that tensor; it reads the patch ids
back from it (one ``argmax`` over the already-built mask, no new large tensor) and does not keep it
for the backward pass, but it cannot stop it being built.

Numerics: logits equal stock ``sdpa``/``eager`` within 1e-5 in fp32 (tests/test_attention.py),
including BLT's all-masked rows (zero-length, right-padded patches), which stock turns into a
uniform average over all keys because the additive mask is ``finfo.min``, not ``-inf``.

API: :data:`MEMORY_EFFICIENT`, :func:`register`, :func:`use_memory_efficient_attention`,
:func:`use_attention`, :func:`default_attention` (CUDA: ours; ``$BYTEIFY_ATTENTION`` overrides),
:func:`configure_attention`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    fast_all,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.models.blt.configuration_blt import BltLocalDecoderConfig, BltLocalEncoderConfig
from transformers.models.blt.modeling_blt import BltCrossAttention

MEMORY_EFFICIENT = "byteify_local"
"""The name this module registers with transformers' attention and mask interfaces."""

MAX_BLOCK = 1024
MIN_BLOCK = 128


@dataclass(frozen=True)
class LocalWindow:
    """What a plain sliding-window causal mask encodes, without the ``[B,1,S,S]`` tensor: query i
    attends to keys j with ``i - window < j <= i`` (transformers' ``sliding_window_overlay``)."""

    window: int


# ---- the mask function (AttentionMaskInterface) ---------------------------------------------
def _is_plain_sliding(mask_function, window: int, q_length: int) -> bool:
    """Does ``mask_function`` give exactly causal & ``kv > q - window`` on a probe that covers a
    whole window (the pattern is translation invariant)?"""
    n = min(q_length, window + 2)
    try:
        b = torch.zeros((1, 1, 1, 1), dtype=torch.long)
        q = torch.arange(n).view(1, 1, n, 1)
        k = torch.arange(n).view(1, 1, 1, n)
        got = mask_function(b, b, q, k)
        got = torch.as_tensor(got).to(torch.bool).expand(1, 1, n, n)
    except Exception:  # an index-based function that does not broadcast: not ours to judge
        return False
    want = (k <= q) & (k > q - window)
    return bool(torch.equal(got, want))


def local_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                         mask_function=None, attention_mask=None, local_size: int | None = None,
                         allow_is_causal_skip: bool = True, use_vmap: bool = False, **kwargs):
    """transformers mask-interface function: a :class:`LocalWindow` for the plain sliding-window
    causal pattern, transformers' own ``sdpa_mask`` for anything else."""
    mask_function = mask_function or causal_mask_function
    if (local_size is not None and allow_is_causal_skip and not use_vmap
            and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
            and q_length == kv_length and q_length > 1):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if (padding is None or bool(fast_all(padding))) and _is_plain_sliding(mask_function, int(local_size), q_length):
            return LocalWindow(int(local_size))
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, **kwargs)


# ---- sliding-window self-attention ---------------------------------------------------------
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups <= 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def block_size(window: int) -> int:
    """Query block length for the windowed SDPA: the window, kept within [128, 1024]."""
    return max(MIN_BLOCK, min(MAX_BLOCK, int(window)))


def windowed_attention(query, key, value, window: int, *, scale: float | None = None, dropout: float = 0.0,
                       block: int | None = None) -> torch.Tensor:
    """Causal sliding-window attention ``[B,H,S,D] -> [B,S,H,D]`` (query i sees keys
    ``i - window < j <= i``), computed block by block: each query block runs SDPA against the key
    slice its window reaches (views of ``key``/``value``, no copies), with one additive band mask
    ``[block, block + window]`` shared by all full blocks (the key slice starts one key early so
    its length stays a multiple of 8 for the CUDA kernels; that key is masked)."""
    bsz, heads, seq, dim = query.shape
    if key.shape[2] != seq:
        raise ValueError(f"windowed attention needs as many keys as queries, got {key.shape[2]} and {seq}")
    if window >= seq:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale, is_causal=True)
        return out.transpose(1, 2).contiguous()
    block = block or block_size(window)
    band = None
    outs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        if end <= window:  # every key before the query is inside the window: plain causal
            k0, mask = 0, None
        elif start >= window:  # key j = k0 + c for query i = start + r: attend iff r < c <= r + window
            k0 = start - window
            if band is None:
                r = torch.arange(block, device=query.device)[:, None]
                c = torch.arange(block + window, device=query.device)[None, :]
                band = torch.zeros((block, block + window), dtype=query.dtype, device=query.device)
                band = band.masked_fill(~((c > r) & (c <= r + window)), float("-inf"))
            mask = band[: end - start, : end - k0]
        else:  # the first block, longer than the window: its own (small) mask
            k0 = 0
            qi = torch.arange(start, end, device=query.device)[:, None]
            kj = torch.arange(0, end, device=query.device)[None, :]
            mask = (kj <= qi) & (kj > qi - window)
        out = F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, k0:end], value[:, :, k0:end],
                                             attn_mask=mask, dropout_p=dropout, scale=scale,
                                             is_causal=mask is None)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)


# ---- patch cross-attention by patch ids ------------------------------------------------------
CHUNK = 1024
"""Bytes per chunk in the cross-attention kernels (transients are O(CHUNK * k * head_dim) per head)."""


def _patch_ids_from_mask(mask: torch.Tensor, k: int, patches_as_queries: bool):
    """BLT's cross mask is additive: 0 where a (patch slot, byte) pair attends, ``finfo.min``
    elsewhere, the same for the k slots of a patch.  Returns each byte's patch id ``[B,S]`` and
    whether the byte attends any patch at all (an ``argmax`` over the already-built mask)."""
    if patches_as_queries:
        m = mask[:, 0, ::k, :]  # [B,P,S]
        ids = m.argmax(dim=1)
        hit = m.gather(1, ids[:, None, :])[:, 0]
    else:
        m = mask[:, 0, :, ::k]  # [B,S,P]
        ids = m.argmax(dim=-1)
        hit = m.gather(-1, ids[..., None])[..., 0]
    return ids, hit > torch.finfo(mask.dtype).min / 2


def _take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, h, ids[b, s]]`` for ``x`` ``[B,H,N,*rest]`` and ``ids`` ``[B,S]`` -> ``[B,H,S,*rest]``."""
    b, h = x.shape[:2]
    rest = x.shape[3:]
    idx = ids.view(ids.shape[0], 1, ids.shape[1], *([1] * len(rest))).expand(b, h, ids.shape[1], *rest)
    return torch.gather(x, 2, idx)


def _add_at(dst: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[b, h, ids[b, s]] += src[b, h, s]`` in place (``dst`` ``[B,H,N,*rest]``, ``src`` ``[B,H,S,*rest]``)."""
    idx = ids.view(ids.shape[0], 1, ids.shape[1], *([1] * (src.dim() - 3))).expand_as(src)
    dst.scatter_add_(2, idx, src)


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or the input's if wider."""
    return torch.promote_types(x.dtype, torch.float32)


class _PatchesQueryBytes(torch.autograd.Function):
    """Encoder cross-attention: slot j of patch p attends to the bytes s with ``seg[s] == p``
    (a softmax per segment).  q ``[B,H,P,k,D]``, k/v ``[B,H,S,D]``, seg ``[B,S]`` in [0, P]
    (P: a byte of no patch).  Returns ``[B,H,P,k,D]`` in q's dtype (fp32 accumulation), and the
    per-slot denominators (0 for
    a slot whose patch is empty).  Two passes over byte chunks (segment max, then sums); the
    backward pass recomputes the scores chunk by chunk, as flash attention does."""

    @staticmethod
    def forward(ctx, q, k, v, seg, scale):
        acc = _acc(q)
        bsz, heads, npatch, slots, dim = q.shape
        seq = k.shape[2]
        gid = seg.clamp(max=npatch - 1)
        qf = q.to(acc)
        top = qf.new_full((bsz, heads, npatch + 1, slots), float("-inf"))
        for a in range(0, seq, CHUNK):
            s = torch.einsum("bhcjd,bhcd->bhcj", _take(qf, gid[:, a:a + CHUNK]), k[:, :, a:a + CHUNK].to(acc)) * scale
            idx = seg[:, None, a:a + CHUNK, None].expand_as(s)
            top.scatter_reduce_(2, idx, s, "amax", include_self=True)
        den = qf.new_zeros((bsz, heads, npatch + 1, slots))
        num = qf.new_zeros((bsz, heads, npatch + 1, slots, dim))
        for a in range(0, seq, CHUNK):
            sg = seg[:, a:a + CHUNK]
            s = torch.einsum("bhcjd,bhcd->bhcj", _take(qf, gid[:, a:a + CHUNK]), k[:, :, a:a + CHUNK].to(acc)) * scale
            e = torch.exp(s - _take(top, sg))
            den.scatter_add_(2, sg[:, None, :, None].expand_as(e), e)
            _add_at(num, sg, e[..., None] * v[:, :, a:a + CHUNK, None, :].to(acc))
        out = (num / den.clamp(min=torch.finfo(den.dtype).tiny)[..., None]).to(q.dtype)
        lse = top + den.log()  # -inf for empty slots: their bytes do not exist
        ctx.save_for_backward(q, k, v, seg, out, lse)
        ctx.scale = scale
        den = den[:, :, :npatch]
        ctx.mark_non_differentiable(den)
        return out[:, :, :npatch], den

    @staticmethod
    def backward(ctx, g_out, _g_den):
        q, k, v, seg, out, lse = ctx.saved_tensors
        scale, acc = ctx.scale, _acc(q)
        bsz, heads, npatch, slots, dim = q.shape
        seq = k.shape[2]
        gid = seg.clamp(max=npatch - 1)
        qf = q.to(acc)
        g = torch.cat([g_out.to(acc), g_out.new_zeros((bsz, heads, 1, slots, dim), dtype=acc)], 2)
        delta = (g * out.to(acc)).sum(-1)  # [B,H,P+1,k]
        dq = qf.new_zeros((bsz, heads, npatch + 1, slots, dim))
        dk = torch.empty(k.shape, dtype=acc, device=k.device)
        dv = torch.empty(v.shape, dtype=acc, device=v.device)
        for a in range(0, seq, CHUNK):
            sg = seg[:, a:a + CHUNK]
            kc, vc = k[:, :, a:a + CHUNK].to(acc), v[:, :, a:a + CHUNK].to(acc)
            qg = _take(qf, gid[:, a:a + CHUNK])  # [B,H,c,k,D]
            s = torch.einsum("bhcjd,bhcd->bhcj", qg, kc) * scale
            w = torch.exp(s - _take(lse, sg))  # 0 for bytes of no patch (lse of the dummy row: -inf - ... )
            w = torch.where((sg < npatch)[:, None, :, None], w, 0.0)
            gg = _take(g, sg)  # [B,H,c,k,D]
            dv[:, :, a:a + CHUNK] = torch.einsum("bhcj,bhcjd->bhcd", w, gg)
            ds = w * (torch.einsum("bhcjd,bhcd->bhcj", gg, vc) - _take(delta, sg)) * scale
            dk[:, :, a:a + CHUNK] = torch.einsum("bhcj,bhcjd->bhcd", ds, qg)
            _add_at(dq, sg, ds[..., None] * kc[:, :, :, None, :])
        return dq[:, :, :npatch].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _BytesQueryPatches(torch.autograd.Function):
    """Decoder cross-attention: byte s attends to the k slots of patch ``ids[s]``.  q ``[B,H,S,D]``,
    k/v ``[B,H,P,k,D]``.  Returns ``[B,H,S,D]`` in q's dtype (fp32 accumulation); chunked over
    bytes, scores recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, ids, scale):
        acc = _acc(q)
        bsz, heads, seq, dim = q.shape
        out = torch.empty((bsz, heads, seq, dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((bsz, heads, seq), dtype=acc, device=q.device)
        kf, vf = k.to(acc), v.to(acc)
        for a in range(0, seq, CHUNK):
            ic = ids[:, a:a + CHUNK]
            s = torch.einsum("bhcd,bhcjd->bhcj", q[:, :, a:a + CHUNK].to(acc), _take(kf, ic)) * scale
            lse[:, :, a:a + CHUNK] = torch.logsumexp(s, -1)
            w = torch.exp(s - lse[:, :, a:a + CHUNK, None])
            out[:, :, a:a + CHUNK] = torch.einsum("bhcj,bhcjd->bhcd", w, _take(vf, ic))
        ctx.save_for_backward(q, k, v, ids, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g_out):
        q, k, v, ids, out, lse = ctx.saved_tensors
        scale, acc = ctx.scale, _acc(q)
        seq = q.shape[2]
        g = g_out.to(acc)
        kf, vf = k.to(acc), v.to(acc)
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for a in range(0, seq, CHUNK):
            ic = ids[:, a:a + CHUNK]
            qc, gc_ = q[:, :, a:a + CHUNK].to(acc), g[:, :, a:a + CHUNK]
            kg, vg = _take(kf, ic), _take(vf, ic)  # [B,H,c,k,D]
            w = torch.exp(torch.einsum("bhcd,bhcjd->bhcj", qc, kg) * scale - lse[:, :, a:a + CHUNK, None])
            _add_at(dv, ic, w[..., None] * gc_[:, :, :, None, :])
            delta = torch.einsum("bhcd,bhcd->bhc", gc_, out[:, :, a:a + CHUNK].to(acc))
            ds = w * (torch.einsum("bhcd,bhcjd->bhcj", gc_, vg) - delta[..., None]) * scale
            dq[:, :, a:a + CHUNK] = torch.einsum("bhcj,bhcjd->bhcd", ds, kg)
            _add_at(dk, ic, ds[..., None] * qc[:, :, :, None, :])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else contextlib.nullcontext()


def patch_cross_attention(query, key, value, mask: torch.Tensor, slots: int, patches_as_queries: bool, *,
                          scale: float | None = None) -> torch.Tensor:
    """BLT's patch cross-attention ``-> [B,Q,H,D]`` from the patch ids in its dense mask, without
    the ``[Q, K]`` scores: O(S * k) scores, byte chunks of :data:`CHUNK`, fp32 softmax."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        ids, valid = _patch_ids_from_mask(mask, slots, patches_as_queries)
    bsz, heads = query.shape[:2]
    with _no_autocast(query.device.type):
        if patches_as_queries:
            npatch, dim = query.shape[2] // slots, query.shape[3]
            seg = torch.where(valid, ids, torch.full_like(ids, npatch))  # bytes of no patch: a dummy segment
            q = query.reshape(bsz, heads, npatch, slots, dim)
            out, den = _PatchesQueryBytes.apply(q, key, value, seg, scale)
            # A slot of an empty patch: stock's mask row is all finfo.min -> uniform over all bytes.
            out = torch.where((den == 0)[..., None], value.to(out.dtype).mean(2)[:, :, None, None, :], out)
            out = out.reshape(bsz, heads, npatch * slots, dim)
        else:
            npatch, dim = key.shape[2] // slots, key.shape[3]
            kv = (key.reshape(bsz, heads, npatch, slots, dim), value.reshape(bsz, heads, npatch, slots, dim))
            out = _BytesQueryPatches.apply(query, *kv, ids, scale)
            # A byte that sees no patch: stock's mask row is all finfo.min -> uniform over all slots.
            # (BLT's decoder ids always name a patch, so this is a check, not a full-size copy.)
            if not bool(valid.all()):
                out = torch.where(valid[:, None, :, None], out, value.to(out.dtype).mean(2, keepdim=True))
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _cross_orientation(module, query, key, mask) -> bool | None:
    """True: BLT encoder cross-attention (patch slots query bytes); False: decoder (bytes query
    patch slots); None: not a BLT patch cross-attention with its dense mask."""
    if not isinstance(module, BltCrossAttention) or not isinstance(mask, torch.Tensor):
        return None
    if mask.ndim != 4 or not mask.is_floating_point() or mask.shape[1] != 1:
        return None
    bsz, _, nq, _ = query.shape
    nk = key.shape[2]
    if tuple(mask.shape) != (bsz, 1, nq, nk):
        return None
    slots = getattr(module.config, "cross_attn_k", None) or 1
    if isinstance(module.config, BltLocalEncoderConfig) and nq % slots == 0:
        return True
    if isinstance(module.config, BltLocalDecoderConfig) and nk % slots == 0:
        return False
    return None


# ---- the attention function (AttentionInterface) --------------------------------------------
def memory_efficient_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                       scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention-interface function (same signature and return as ``sdpa``)."""
    if isinstance(attention_mask, LocalWindow):
        groups = getattr(module, "num_key_value_groups", 1)
        out = windowed_attention(query, _repeat_kv(key, groups), _repeat_kv(value, groups), attention_mask.window,
                                 scale=scaling, dropout=dropout)
        return out, None
    orientation = _cross_orientation(module, query, key, attention_mask)
    if orientation is not None and not dropout:  # (attention dropout: stock sdpa on the dense mask)
        groups = getattr(module, "num_key_value_groups", 1)
        out = patch_cross_attention(query, _repeat_kv(key, groups), _repeat_kv(value, groups), attention_mask,
                                    module.config.cross_attn_k or 1, orientation, scale=scaling)
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


# ---- API -------------------------------------------------------------------------------------
def register() -> str:
    """Register :data:`MEMORY_EFFICIENT` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` (idempotent; done on import).  Returns the name."""
    AttentionInterface.register(MEMORY_EFFICIENT, memory_efficient_attention_forward)
    AttentionMaskInterface.register(MEMORY_EFFICIENT, local_attention_mask)
    return MEMORY_EFFICIENT


def _pretrained(model):
    """The transformers model inside a peft model / byteify ``TrainModule``."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "set_attn_implementation") and hasattr(model, "blt"):
        model = model.blt
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers model (no set_attn_implementation)")
    return model


def use_attention(model, name: str) -> str:
    """Set attention implementation ``name`` on ``model`` and all its sub-models/sub-configs
    (transformers' ``set_attn_implementation``).  Returns the name in effect."""
    if name == MEMORY_EFFICIENT:
        register()
    model = _pretrained(model)
    model.set_attn_implementation(name)
    return model.config._attn_implementation


def use_memory_efficient_attention(model) -> str:
    """Switch a ``BltForCausalLM`` / ``BltModel`` / ``BltPatcher`` (or a peft/TrainModule wrapper
    of one) to :data:`MEMORY_EFFICIENT`.  Returns the name it set."""
    return use_attention(model, MEMORY_EFFICIENT)


ENV_VAR = "BYTEIFY_ATTENTION"
"""Overrides :func:`default_attention` on every device: an implementation name (``sdpa``,
``eager``, :data:`MEMORY_EFFICIENT`), or ``stock`` for transformers' own choice."""


def default_attention(device) -> str | None:
    """The attention implementation to use on ``device``: :data:`MEMORY_EFFICIENT` on CUDA,
    ``None`` (leave transformers' stock choice, ``sdpa``) elsewhere; ``$BYTEIFY_ATTENTION``
    overrides both (``stock`` -> ``None``)."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        return None if forced == "stock" else forced
    return MEMORY_EFFICIENT if torch.device(device).type == "cuda" else None


def configure_attention(model, device) -> str:
    """Apply :func:`default_attention` for ``device`` to ``model``; returns the implementation in
    effect (for the trainer's log)."""
    name = default_attention(device)
    if name is not None:
        return use_attention(model, name)
    return _pretrained(model).config._attn_implementation


register()
