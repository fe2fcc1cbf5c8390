"""The spelling warm start (``vocab_warm_start.spelling``, with ``free_dims``): what the source's
vocabulary says about the *next byte*, written into the warm start's free coordinates and read by
the fresh decoder, so the converted model predicts bytes at step 0.

Why: measured on SmolLM2 (``benchmarks/loss_by_depth.py``), the trained kept rows lose most of
their gap to the source on the bytes after a token's second (depth 2+: 58% of the bytes, 0.41
bits each for the source, ~1.8 for a BLT trained on ~460 KB): the source knows how its tokens are
spelled, the fresh decoder has to learn it from the training bytes.

What is written, for every token ``s`` (its byte string): ``P(b | s)``, the next-byte
distribution of a unigram model over the vocabulary (token weights ``count + 1``, the warm
start's corpus counts) given that the current token starts with ``s``: the mass of the tokens
that extend ``s`` by ``b``, plus ``s``'s own mass times the first-byte distribution of the next
token, normalised.  The centred log-probabilities are compressed by a weighted PCA to
``r = free_dims - 1`` dimensions (``codes`` [V, r], ``head`` [256, r]); the codes are telescoped
into the free coordinates of the byte embeddings and of the written hash-table rows exactly as the
token vectors are into the others (:mod:`byteify.convert.warmstart`), so the embedding sum at each
byte carries the code of the longest written token ending there; the last free coordinate holds
a constant ``KAPPA`` in every byte embedding.  The decoder starts as an identity (its attention,
cross-attention and MLP output projections zero, its inner norms blind to the constant) and its
LM head reads the codes: after the
decoder's final RMSNorm, which the constant dominates (a near-fixed scale), the logits are
``head @ code`` (+ a bias for EOS through the constant coordinate).  Training then grows the
decoder's reads of the global transformer and of the bytes from there.
"""

from __future__ import annotations

import math

import torch

from ..tokenizer import BOE_ID, BOS_ID, EOS_ID, OFFSET, PAD_ID, VOCAB_SIZE

# The codes have one unit of RMS per coordinate (a byte state's code part: |code|^2 ~ r), so the
# updates training makes to the decoder's residual stream (Adam: ~1e-3 per weight and step) move
# the logits little; the constant's square (4,096) dominates the rest of a byte state's (~r + 3:
# SmolLM2 r = 127), so the decoder's final RMSNorm divides by ~KAPPA / sqrt(d) for most codes
# (within ~2% at the mean code norm).  The decoder's inner norms get weight 0 on the constant's
# coordinate: its layers read the codes (at ~sqrt(d) / KAPPA per unit), not a large constant.
KAPPA = 64.0
EOS_PER_BYTE = 1e-3  # the written head's prior for end of document (one per ~1,000 bytes)
UNIFORM_SHARE = 0.01  # mixed into every written distribution: no byte below 0.01 / 256 (a finite, trainable head)


def next_byte_logprobs(token_bytes: list[bytes | None], weights: torch.Tensor) -> torch.Tensor:
    """[V, 256] float64: ``log P(b | s)`` for every token's string ``s`` under the unigram
    vocabulary model with token weights ``weights`` (zeros for tokens without bytes)."""
    sub: dict[bytes, float] = {}  # prefix -> summed weight of the tokens that start with it
    own: dict[bytes, float] = {}  # string -> summed weight of the tokens that are exactly it
    children: dict[bytes, set[int]] = {}
    for s, w in zip(token_bytes, weights.tolist()):
        if not s:
            continue
        own[s] = own.get(s, 0.0) + w
        for i in range(1, len(s) + 1):
            sub[s[:i]] = sub.get(s[:i], 0.0) + w
            children.setdefault(s[:i - 1], set()).add(s[i - 1])
    first = torch.zeros(256, dtype=torch.float64)
    for b in children.get(b"", ()):
        first[b] = sub[bytes([b])]
    first /= first.sum()
    out = torch.zeros(len(token_bytes), 256, dtype=torch.float64)
    rows: dict[bytes, torch.Tensor] = {}
    for v, s in enumerate(token_bytes):
        if not s:
            continue
        if s not in rows:
            p = own[s] * first
            for b in children.get(s, ()):
                p[b] += sub[s + bytes([b])]
            rows[s] = ((1 - UNIFORM_SHARE) * p / p.sum() + UNIFORM_SHARE / 256).log()
        out[v] = rows[s]
    return out


def spelling_codes(logprobs: torch.Tensor, weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(codes [V, rank], head [256, rank], stats): the weighted PCA of the centred
    log-probabilities, ``codes @ head.T`` their rank-``rank`` reconstruction; codes scaled to a
    weighted mean square of 1 per coordinate."""
    centred = logprobs - logprobs.mean(1, keepdim=True)
    w = weights / weights.sum()
    gram = centred.T @ (centred * w[:, None])
    evals, evecs = torch.linalg.eigh(gram)
    basis = evecs[:, -rank:].flip(1)  # 256 x r, largest first
    codes = centred @ basis
    scale = float((codes.pow(2).mean(1) * w).sum().sqrt())
    recon = codes @ basis.T
    err = float(((recon - centred).pow(2).sum(1) * w).sum() / (centred.pow(2).sum(1) * w).sum())
    # the log-partition of the centred rows (what EOS's logit is measured against)
    lse = float((torch.logsumexp(centred, 1) * w).sum())
    stats = {"rank": rank, "relative_error": err, "energy_kept": float(evals[-rank:].sum() / evals.sum()),
             "mean_log_partition": lse}
    return (codes / scale).float(), (basis * scale).float(), stats


def single_byte_tokens(token_bytes: list[bytes | None], weights: torch.Tensor) -> list[int]:
    """For each byte value, the heaviest token that is that byte alone (-1: none)."""
    best = [-1] * 256
    for v, s in enumerate(token_bytes):
        if s and len(s) == 1 and (best[s[0]] < 0 or weights[v] > weights[best[s[0]]]):
            best[s[0]] = v
    return best


def telescoped_free(layout, token_bytes: list[bytes | None], rows: torch.Tensor, owners: torch.Tensor,
                    codes: torch.Tensor, byte_codes: torch.Tensor) -> torch.Tensor:
    """[M, r]: the free-coordinate entries of the written rows (``rows``, sorted, ``owners``),
    telescoped so that the byte code plus every n-gram row of a string sums to its owner's code:
    each row holds ``codes[owner] - S(g[1:])`` for its n-gram ``g``, ``S`` the realised sum of the
    shorter suffixes (sizes shortest first, so those are final).  Reserved rows stay zero."""
    from .warmstart import _hash_rows

    r = codes.shape[1]
    free = torch.zeros(len(rows), r)
    if not len(rows):  # nothing written: the byte codes alone
        return free
    table_of = {n: i for i, n in reversed(list(enumerate(layout.sizes)))}  # first table of each size
    sizes = sorted(n for n in table_of if n >= 2)

    def lookup(strings: list[bytes], m: int) -> torch.Tensor:
        """The realised free entries of the m-grams ``strings`` (zero where no row is written)."""
        want = _hash_rows(strings, m, table_of[m], layout.buckets, layout.prime)
        at = torch.searchsorted(rows, want).clamp(max=len(rows) - 1)
        hit = rows[at] == want
        return torch.where(hit[:, None], free[at], torch.zeros(()))

    for n in sizes:
        lo, hi = table_of[n] * layout.buckets, (table_of[n] + 1) * layout.buckets
        idx = ((rows >= lo) & (rows < hi) & (owners >= 0)).nonzero().flatten()
        if not len(idx):
            continue
        grams = [token_bytes[int(v)][-n:] for v in owners[idx]]
        total = byte_codes[torch.tensor([g[-1] for g in grams])].clone()
        for m in sizes:
            if m < n:
                total += lookup([g[-m:] for g in grams], m)
        free[idx] = codes[owners[idx]] - total
    return free


def decoder_tensors(config, head: torch.Tensor, free: int, log_partition: float) -> dict[str, torch.Tensor | None]:
    """The decoder as an identity (output projections zero: None; inner norms blind to the
    constant) and its LM head reading the codes in the free coordinates: logits ``head @ code``
    for the bytes, EOS at its prior, the other specials far below, after the final RMSNorm's scale
    ``sqrt(d) / KAPPA``."""
    d = config.decoder_config.hidden_size
    dec = config.decoder_config
    out: dict[str, torch.Tensor | None] = {}
    blind = torch.ones(d)
    blind[d - 1] = 0.0  # the inner norms do not pass the constant on
    for i in range(dec.num_hidden_layers):
        out[f"model.local_decoder.layers.{i}.self_attn.o_proj.weight"] = None
        out[f"model.local_decoder.layers.{i}.mlp.down_proj.weight"] = None
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.local_decoder.layers.{i}.{norm}.weight"] = blind
    n_cross = dec.num_hidden_layers if dec.cross_attn_all_layers else 1
    for j in range(n_cross):
        out[f"model.local_decoder.cross_attn_layers.{j}.o_proj.weight"] = None
        out[f"model.local_decoder.cross_attn_layers.{j}.q_norm.weight"] = blind
    lm = torch.zeros(VOCAB_SIZE, d)
    r = head.shape[1]
    lm[OFFSET:OFFSET + 256, d - free:d - free + r] = head * (KAPPA / math.sqrt(d))
    bias = torch.full((VOCAB_SIZE,), -30.0)
    bias[OFFSET:OFFSET + 256] = 0.0
    bias[EOS_ID] = math.log(EOS_PER_BYTE) + log_partition
    for special in (BOS_ID, BOE_ID, PAD_ID):
        bias[special] = -30.0
    lm[:, d - 1] = bias / math.sqrt(d)
    out["lm_head.weight"] = lm
    return out
