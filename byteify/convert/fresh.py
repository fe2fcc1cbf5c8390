"""Fresh BLT parts: everything a conversion does not transplant (local encoder, hash n-gram
table, local decoder, entropy model), initialised the BLT way (transformers' own init) and
streamed in row blocks, plus the one deliberate deviation: the encoder's outputs scaled to the
source embeddings' RMS, the input scale the transplanted layers were trained on."""

from __future__ import annotations

import contextlib
import importlib
import math

import torch

from ..parts import HASH_TABLE
from ..tokenizer import BOS_ID, OFFSET
from .memory import release_freed_memory


def fresh_parts(config, seed: int, dtype: torch.dtype = torch.float32, rows: int = 8192,
                patch_rms: float | None = None, warm=None):
    """Every BLT tensor except the global layers, initialised the BLT way (transformers' init:
    truncated normals), reproducibly from ``seed``, as ``(name, shape, chunks)`` with ``chunks``
    an iterator of row blocks in ``dtype``: nothing is held longer than the writer needs it.
    The small parts come from a BLT with a zero-layer global transformer (so the transplanted
    layers are never allocated twice); the hash n-gram table, by far the largest fresh tensor, is
    drawn ``rows`` rows at a time (its values depend on ``seed`` and ``rows``) with the same
    truncated normal (std = encoder hidden^-0.5, cut at 3 std): torch's ``trunc_normal_`` on the
    whole table needs several times its size in temporaries, and holding it whole would double a
    conversion's peak memory.

    ``patch_rms``: rescale the local encoder's output projections so that its patch outputs (the
    global transformer's inputs) have this root-mean-square on probe text; convert passes the
    source embeddings' RMS (Bolmo's ``fix_init`` does the same), since transplanted layers expect
    inputs at that scale and BLT's init gives ~10x more.

    ``warm``: a :class:`byteify.convert.warmstart.WarmStart`; its encoder tensors replace the
    drawn ones (every other tensor is drawn as without it, from the same seed; the decoder's
    readers in ``warm.centred`` get each row's mean removed) and the hash table is its sparse
    entries, streamed in the same row blocks.  ``patch_rms`` must then be None."""
    from transformers import BltForCausalLM

    cfg = _without_global(config)
    saved_rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with _fast_trunc_normal():
            model = BltForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(saved_rng)
    if patch_rms is not None:
        if warm is not None:
            raise ValueError("the warm start sets the encoder's output scale itself: patch_rms must be None")
        match_patch_rms(model, patch_rms)
    small = {k: v for k, v in model.state_dict().items() if k != HASH_TABLE}
    del model
    if warm is not None:
        for name, value in warm.small_tensors().items():
            value = torch.zeros_like(small[name]) if value is None else value
            if tuple(value.shape) != tuple(small[name].shape):
                raise ValueError(f"warm start: {name} has shape {tuple(value.shape)}, expected {tuple(small[name].shape)}")
            small[name] = value
        for name in warm.centred:  # blind to the length offsets in the byte states
            small[name] = small[name] - small[name].mean(dim=1, keepdim=True)
    for name in sorted(small):
        t = small.pop(name)
        yield name, tuple(t.shape), iter([t.detach().to(dtype)])
        del t
    release_freed_memory()
    total_rows, hidden = hash_table_shape(config)
    chunks = (warm.table_chunks(total_rows, dtype, rows) if warm is not None
              else _hash_table_chunks(total_rows, hidden, seed, dtype, rows))
    yield HASH_TABLE, (total_rows, hidden), chunks


@torch.no_grad()
def patch_output_rms(model, hash_std: float | None = None, n_bytes: int = 512, patch: int = 4) -> float:
    """RMS of the local encoder's patch outputs (what the global transformer receives) on probe
    text cut into static ``patch``-byte patches, the BOS patch left out.  ``hash_std``: measure
    with a stand-in n-gram table drawn from N(0, hash_std) (a model built by :func:`fresh_parts`
    holds a one-row placeholder table)."""
    from ..data.corpus import probe_text

    m = model.model
    data = probe_text().encode("utf-8")[: n_bytes - 1]
    ids = torch.tensor([[BOS_ID] + [b + OFFSET for b in data]])
    n = ids.shape[1]
    lengths = [1] + [patch] * ((n - 1) // patch) + ([(n - 1) % patch] if (n - 1) % patch else [])
    lengths[-1] += 1  # BLT's include-next-byte convention
    captured = {}
    hook = m.global_transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.__setitem__("x", kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        lengths = torch.tensor([lengths])
        if hash_std is None:
            m(input_ids=ids, patch_lengths=lengths, use_cache=False)
        else:
            from transformers.models.blt.modeling_blt import compute_hash_embeddings

            cfg, buckets = model.config, 1024
            tables = cfg.encoder_hash_byte_group_nb_functions * len(cfg.encoder_hash_byte_group_size)
            stand_in = torch.nn.Embedding(tables * buckets, m.encoder_hash_tok_embedding.embedding_dim)
            stand_in.weight.normal_(0.0, hash_std, generator=torch.Generator().manual_seed(0))
            embeds = compute_hash_embeddings(ids, m.local_encoder, stand_in, cfg.encoder_hash_byte_group_nb_functions,
                                             cfg.encoder_hash_byte_group_size, buckets)
            m(inputs_embeds=embeds, patch_lengths=lengths, use_cache=False)
    finally:
        hook.remove()
    return float(captured["x"][0, 1:].float().pow(2).mean().sqrt())


@torch.no_grad()
def match_patch_rms(model, target: float) -> float:
    """Scale the encoder's output projections (patch projection and cross-attention output) so
    that :func:`patch_output_rms`, measured with the n-gram table's init std, equals ``target``;
    returns the factor applied."""
    enc = model.model.local_encoder
    hidden = model.config.encoder_config.hidden_size
    factor = target / max(patch_output_rms(model, hash_std=hidden**-0.5), 1e-12)
    enc.patch_embedding_projection.weight.mul_(factor)
    for layer in enc.cross_attn_layers:
        layer.o_proj.weight.mul_(factor)
    return factor


def _hash_table_chunks(total_rows: int, hidden: int, seed: int, dtype: torch.dtype, rows: int):
    std = hidden**-0.5
    gen = torch.Generator().manual_seed(seed + 1)
    for start in range(0, total_rows, rows):  # drawn in fp32, stored in the output dtype
        part = torch.empty(min(rows, total_rows - start), hidden)
        trunc_normal_by_rejection_(part, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
        yield part.to(dtype)
        del part


def fresh_shapes(config) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors :func:`fresh_parts` yields (from a model on the meta device)."""
    from transformers import BltForCausalLM

    with torch.device("meta"):
        model = BltForCausalLM(_without_global(config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != HASH_TABLE}
    shapes[HASH_TABLE] = hash_table_shape(config)
    return shapes


def hash_table_shape(config) -> tuple[int, int]:
    """Shape of the fused hash n-gram table: (functions x n-gram sizes x buckets, encoder hidden)."""
    n_tables = config.encoder_hash_byte_group_nb_functions * len(config.encoder_hash_byte_group_size)
    return n_tables * config.encoder_hash_byte_group_vocab, config.encoder_config.hidden_size


def _without_global(config):
    """A copy of ``config`` with a zero-layer global transformer and a one-row hash table."""
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.global_config.num_hidden_layers = 0
    cfg.encoder_hash_byte_group_vocab = 1
    return cfg


def trunc_normal_by_rejection_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """The truncated normal of ``torch.nn.init.trunc_normal_`` (same distribution), drawn by
    rejection: sample N(mean, std) and redraw the few values outside [a, b].  Several times
    faster than torch's inverse-CDF method (which is most of a conversion's time otherwise).
    Falls back to torch's method on meta tensors and when [a, b] keeps less than half the mass."""
    kept = 0.5 * (math.erf((b - mean) / (std * math.sqrt(2))) - math.erf((a - mean) / (std * math.sqrt(2))))
    if tensor.is_meta or kept < 0.5:
        return _TORCH_TRUNC_NORMAL(tensor, mean=mean, std=std, a=a, b=b, generator=generator)
    with torch.no_grad():
        tensor.normal_(mean, std, generator=generator)
        bad = (tensor < a) | (tensor > b)
        while bad.any():
            redraw = torch.empty(int(bad.sum()), dtype=tensor.dtype, device=tensor.device)
            tensor[bad] = redraw.normal_(mean, std, generator=generator)
            bad = (tensor < a) | (tensor > b)
    return tensor


_TORCH_TRUNC_NORMAL = torch.nn.init.trunc_normal_


@contextlib.contextmanager
def _fast_trunc_normal():
    """Route transformers' weight init through :func:`trunc_normal_by_rejection_` while a model is
    built.  transformers offers no hook to choose how its init samples (BLT's ``_init_weights``
    calls ``transformers.initialization.trunc_normal_``, which dispatches through the table
    ``TORCH_INIT_FUNCTIONS``), so the table's entry is swapped for the duration and restored;
    the distribution is the same (tested).  If a future version moves the table, init simply
    stays on torch's slower method."""
    table = getattr(importlib.import_module("transformers.initialization"), "TORCH_INIT_FUNCTIONS", None)
    if not isinstance(table, dict) or "trunc_normal_" not in table:
        yield
        return
    saved = table["trunc_normal_"]
    table["trunc_normal_"] = trunc_normal_by_rejection_
    try:
        yield
    finally:
        table["trunc_normal_"] = saved
