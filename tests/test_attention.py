"""byteify.attention: the memory-efficient BLT attention gives stock logits and gradients.

Tiny random BLTs built from ``BltConfig``; every comparison is against transformers' own ``sdpa``
(and ``eager``) on the same weights.  Windows are smaller than the sequence and the query block
is shrunk (``MIN_BLOCK``) so the windowed path runs over several blocks; patch lengths follow
BLT's include-next-byte convention (rows sum to T + 1, right-padded with zeros).  Sensitivity
checks show the 1e-5 tolerance would catch an off-by-one window or a wrong patch assignment."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import byteify.attention as attn
from byteify.attention import (
    MEMORY_EFFICIENT,
    LocalWindow,
    default_attention,
    patch_cross_attention,
    use_attention,
    use_memory_efficient_attention,
    windowed_attention,
)

TOL = 1e-5
T = 40
WINDOW = 8
# Row 0: 11 patches of varied lengths; row 1: 8 patches, right-padded with zeros.  Both sum to T + 1.
PATCH_LENGTHS = torch.tensor([[1, 3, 5, 2, 7, 4, 1, 6, 3, 4, 5],
                              [2, 9, 1, 4, 3, 8, 7, 7, 0, 0, 0]])


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(attn, "MIN_BLOCK", 4)  # window 8 -> blocks of 8 -> 5 blocks over T = 40
    monkeypatch.setattr(attn, "CHUNK", 7)  # several byte chunks in the cross-attention kernels


def blt_config(window=WINDOW, k=2, kv_heads=None):
    from transformers import BltConfig

    local = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=64,
                 hidden_size_global=64, cross_attn_k=k, max_position_embeddings=256)
    return BltConfig(
        vocab_size=260, patch_in_forward=False, local_attention_window_len=window, cross_attn_k=k,
        encoder_hash_byte_group_size=[3, 4], encoder_hash_byte_group_vocab=64, max_position_embeddings=256,
        encoder_config=dict(local, num_hidden_layers=1), decoder_config=dict(local, num_hidden_layers=2),
        global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=96,
                           max_position_embeddings=256),
        patcher_config=dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                            sliding_window=window, max_position_embeddings=256))


def random_blt(config, seed=0):
    from transformers import BltForCausalLM

    torch.manual_seed(seed)
    model = BltForCausalLM(config)
    with torch.no_grad():  # move away from the init so every part matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def ids(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 260, (batch, T), generator=g)


def logits(model, input_ids, patch_lengths, impl, **kw):
    use_attention(model, impl)
    with torch.no_grad():
        return model(input_ids=input_ids, patch_lengths=patch_lengths, use_cache=False, **kw).logits


@pytest.fixture(scope="module")
def model():
    return random_blt(blt_config())


# ---- the building blocks against dense references -------------------------------------------
def dense_window(seq, window):
    i = torch.arange(seq)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


@pytest.mark.parametrize("window,block", [(8, 8), (8, 5), (8, 13), (3, 128), (40, 8), (64, 8)])
def test_windowed_attention_matches_dense_mask(window, block):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window(T, window)).transpose(1, 2)
    out = windowed_attention(q, k, v, window, block=block)
    assert (out - ref).abs().max() < TOL
    if window < T:  # the check can tell an off-by-one window apart
        wrong = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window(T, window + 1)).transpose(1, 2)
        assert (out - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("k", [1, 2])
def test_patch_cross_attention_matches_dense_mask(k):
    from transformers.models.blt.modeling_blt import BltModel, _prepare_patch_cross_attention_mask

    torch.manual_seed(0)
    B, H, D, P = 2, 3, 8, PATCH_LENGTHS.shape[1]
    for as_queries, lengths in ((True, PATCH_LENGTHS), (False, PATCH_LENGTHS[:, 1:])):
        pid = BltModel._patch_ids_from_lengths(None, lengths, T)
        mask = _prepare_patch_cross_attention_mask(pid, P, T, as_queries, k, torch.float32)
        nq, nk = (P * k, T) if as_queries else (T, P * k)
        q, key, v = torch.randn(B, H, nq, D), torch.randn(B, H, nk, D), torch.randn(B, H, nk, D)
        ref = F.scaled_dot_product_attention(q, key, v, attn_mask=mask).transpose(1, 2)
        out = patch_cross_attention(q, key, v, mask, k, as_queries)
        assert (out - ref).abs().max() < TOL
        # a patch assignment shifted by one byte is visibly different
        shifted = torch.cat([pid[:, :1], pid[:, :-1]], 1)
        bad = _prepare_patch_cross_attention_mask(shifted, P, T, as_queries, k, torch.float32)
        wrong = F.scaled_dot_product_attention(q, key, v, attn_mask=bad).transpose(1, 2)
        assert (out - wrong).abs().max() > 1e-2


def test_patch_cross_attention_gradcheck():
    """The hand-written backward passes against autograd's numerical gradients (float64), with
    an empty (zero-length) patch, a byte outside every patch, and several byte chunks."""
    torch.manual_seed(0)
    B, H, D, S, P, k = 2, 2, 4, 11, 5, 2
    pid = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3], [0, 1, 1, 1, 1, 1, 3, 3, 4, 4, 4]])  # row 1: patch 2 empty
    enc = torch.zeros(B, 1, P * k, S, dtype=torch.float64)
    enc.masked_fill_(pid[:, None, None, :] != torch.arange(P).repeat_interleave(k)[None, None, :, None],
                     torch.finfo(torch.float64).min)
    enc[0, 0, :, 4] = torch.finfo(torch.float64).min  # byte 4 of row 0 belongs to no patch
    dec = enc.transpose(-1, -2).contiguous()
    for as_queries, mask in ((True, enc), (False, dec)):
        nq, nk = mask.shape[-2:]
        q = torch.randn(B, H, nq, D, dtype=torch.float64, requires_grad=True)
        key, v = (torch.randn(B, H, nk, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
        ref = F.scaled_dot_product_attention(q, key, v, attn_mask=mask).transpose(1, 2)
        assert (patch_cross_attention(q, key, v, mask, k, as_queries) - ref).abs().max() < 1e-10
        assert torch.autograd.gradcheck(lambda *t: patch_cross_attention(*t, mask, k, as_queries), (q, key, v))


# ---- the registered implementation inside BltForCausalLM ---------------------------------------
def test_logits_match_stock_sdpa_and_eager(model, monkeypatch):
    x = ids()
    sdpa = logits(model, x, PATCH_LENGTHS, "sdpa")
    eager = logits(model, x, PATCH_LENGTHS, "eager")
    calls = {"window": 0, "cross": 0}
    real_win, real_cross = attn.windowed_attention, attn.patch_cross_attention

    def count(key, fn):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(attn, "windowed_attention", count("window", real_win))
    monkeypatch.setattr(attn, "patch_cross_attention", count("cross", real_cross))
    ours = logits(model, x, PATCH_LENGTHS, MEMORY_EFFICIENT)
    dec = model.config.decoder_config
    n_dec_cross = dec.num_hidden_layers if dec.cross_attn_all_layers else 1
    assert calls == {"window": 3, "cross": 1 + n_dec_cross}  # self: 1 encoder + 2 decoder layers
    assert (ours - sdpa).abs().max() < TOL
    assert (ours - eager).abs().max() < TOL
    # the tolerance is meaningful here: a window one byte wider changes the stock logits far more
    wider = random_blt(blt_config(window=WINDOW + 1))
    assert (logits(wider, x, PATCH_LENGTHS, "sdpa") - sdpa).abs().max() > 1e-3
    # each row alone, without the zero padding, also matches stock.  (Stock itself is not
    # batch-invariant at the last byte of a padded row: BLT's decoder patch ids send it to the last,
    # zero-length patch; ours reproduces that, as the batched comparison above shows.)
    for r in range(2):
        n = int((PATCH_LENGTHS[r] > 0).sum())
        one = (x[r:r + 1], PATCH_LENGTHS[r:r + 1, :n])
        assert (logits(model, *one, MEMORY_EFFICIENT) - logits(model, *one, "sdpa")).abs().max() < TOL


def test_training_gradients_match_stock(model):
    x = ids()
    grads = {}
    names = ("model.local_encoder.layers.0.self_attn.q_proj.weight",
             "model.local_encoder.cross_attn_layers.0.k_proj.weight",
             "model.local_decoder.cross_attn_layers.0.q_proj.weight",
             "model.local_decoder.layers.1.self_attn.v_proj.weight",
             "model.encoder_hash_tok_embedding.weight")
    params = dict(model.named_parameters())
    for impl in ("sdpa", MEMORY_EFFICIENT):
        use_attention(model, impl)
        model.train()
        model.zero_grad()
        out = model(input_ids=x, patch_lengths=PATCH_LENGTHS, labels=x, use_cache=False)
        out.loss.backward()
        grads[impl] = {n: params[n].grad.clone() for n in names}
        model.eval()
    for n in names:
        ref, got = grads["sdpa"][n], grads[MEMORY_EFFICIENT][n]
        assert ref.abs().max() > 0, n
        assert (got - ref).abs().max() < TOL, n


def test_gradient_checkpointing_and_gqa_k1():
    m = random_blt(blt_config(k=1, kv_heads=2), seed=3)
    x = ids(seed=4)
    ref = logits(m, x, PATCH_LENGTHS, "sdpa")
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_attention(m, MEMORY_EFFICIENT)
    m.train()
    out = m(input_ids=x, patch_lengths=PATCH_LENGTHS, labels=x, use_cache=False)
    out.loss.backward()
    assert (out.logits.detach() - ref).abs().max() < TOL
    assert all(p.grad is not None for n, p in m.named_parameters() if "local_" in n and p.requires_grad)


def test_entropy_model_matches_stock():
    from transformers.models.blt.modeling_blt import BltPatcher

    cfg = blt_config().patcher_config
    torch.manual_seed(5)
    patcher = BltPatcher(cfg)
    x = ids(seed=6)
    w = patcher.layers[0].self_attn.q_proj.weight
    outs = {}
    for impl in ("sdpa", MEMORY_EFFICIENT):
        use_attention(patcher, impl)
        patcher.zero_grad()
        _, _, lg = patcher(x)
        lg.logsumexp(-1).sum().backward()
        outs[impl] = (lg.detach(), w.grad.clone())
    assert (outs["sdpa"][0] - outs[MEMORY_EFFICIENT][0]).abs().max() < TOL
    assert (outs["sdpa"][1] - outs[MEMORY_EFFICIENT][1]).abs().max() < TOL


# ---- mask interface: what is replaced, what falls back ---------------------------------------
def test_mask_function_replaces_only_the_plain_window(model):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    use_memory_efficient_attention(model)
    cfg = model.config.encoder_config
    emb = torch.zeros(2, T, 4)
    pos = torch.arange(T)[None]
    assert create_sliding_window_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None,
                                             position_ids=pos) == LocalWindow(WINDOW)
    # padding in a 2D mask: transformers' dense mask, the same as stock sdpa builds
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, -5:] = 0
    dense = create_sliding_window_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=pad, cache=None,
                                              position_ids=pos)
    assert isinstance(dense, torch.Tensor) and dense.shape == (2, 1, T, T)
    assert torch.equal(dense[0, 0], dense_window(T, WINDOW)) and not dense[1, 0, :, -5:].any()
    # full causal (global transformer): stock sdpa's answer (None -> is_causal)
    assert create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=None, cache=None) is None
    # an extra and-mask (custom pattern): not ours to shortcut
    extra = create_sliding_window_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None,
                                              position_ids=pos, and_mask_function=lambda b, h, q, k: k != 3)
    assert isinstance(extra, torch.Tensor) and not extra[0, 0, 5, 3]


def test_padding_mask_falls_back_to_stock(model):
    x = ids()
    pad = torch.ones(2, T, dtype=torch.long)
    pad[0, :3] = 0
    ref = logits(model, x, PATCH_LENGTHS, "sdpa", attention_mask=pad)
    ours = logits(model, x, PATCH_LENGTHS, MEMORY_EFFICIENT, attention_mask=pad)
    assert (ours - ref).abs().max() < TOL


def test_api_and_saved_config(model, tmp_path, monkeypatch):
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    assert default_attention("cpu") is None
    assert default_attention("cuda") == MEMORY_EFFICIENT
    assert default_attention(torch.device("cuda", 0)) == MEMORY_EFFICIENT
    assert use_memory_efficient_attention(model) == MEMORY_EFFICIENT
    cfg = model.config
    for sub in (cfg, cfg.encoder_config, cfg.decoder_config, cfg.global_config, cfg.patcher_config):
        assert sub._attn_implementation == MEMORY_EFFICIENT
    assert attn.configure_attention(model, "cpu") == MEMORY_EFFICIENT  # CPU leaves it as it is
    monkeypatch.setenv(attn.ENV_VAR, "stock")
    assert default_attention("cuda") is None
    monkeypatch.setenv(attn.ENV_VAR, "eager")
    assert attn.configure_attention(model, "cuda") == "eager"
    monkeypatch.setenv(attn.ENV_VAR, MEMORY_EFFICIENT)
    assert attn.configure_attention(model, "cpu") == MEMORY_EFFICIENT
    # a checkpoint saved meanwhile does not name our implementation (plain transformers loads it)
    model.save_pretrained(str(tmp_path))
    assert MEMORY_EFFICIENT not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "blt"
    use_attention(model, "sdpa")
    with pytest.raises(TypeError):
        use_memory_efficient_attention(object())
