"""Vocabulary warm start: the source's token embeddings *written* into the fresh local encoder of
the stock ``BltForCausalLM`` at convert time, so that the transplanted global transformer reads
(a rank-(d-1) projection of) the embedding of each patch's token before any training
(``byteify convert --preset warm``, or ``--set vocab_warm_start.enabled=true`` on any preset).

Design (``../shared/reference/vocabulary-warm-start.md``), as implemented and measured here
(``benchmarks/warmstart_probe.py``, real SmolLM2-135M):

* **Token vectors.**  For every source token ``v``: ``F(v) = b * (len(v) - c0) * 1 + q(B U^T e_v)``.
  ``U`` (D x r): the top ``r = d - 1`` right-singular vectors of the source embeddings, rows
  weighted by ``sqrt(count + 1)`` (token counts of the source tokenizer on the training part of
  the embedded corpus, :func:`training_documents`; ``frequencies: uniform`` weighs all alike and
  orders collisions by token id; measured much worse: 2.82 vs 1.99 bits/byte at 131,072
  buckets); ``B`` (d x r): an orthonormal basis of the directions orthogonal to the all-ones
  vector ``1``, randomly rotated (from ``--seed``) so that every coordinate carries the same
  share of the content; ``b`` the length offset per byte; ``c0`` a centre that halves the
  magnitudes; ``q`` the grid (below).
* **Telescoped tables.**  A token of ``n`` bytes (``n`` in the hash n-gram sizes) writes
  ``F(v) - S(v[1:])`` into its n-gram bucket, where ``S(s)`` is what the stock embedding sums
  for the bytes ``s`` alone (the byte embedding of its last byte plus the *realised* buckets of
  its shorter suffixes, collisions included); byte embedding ``E[b + 4] = F(b)``; every other
  bucket is zero, and the BOS n-grams' buckets are reserved (zero: the BOS patch is exact).  At
  each byte the stock sum ``E[x_t] + sum_n H_n[h_n(t)]`` is then exactly ``F`` of the longest
  vocabulary token ending there, for a token that owns its bucket where the longer n-grams at
  that byte hit empty buckets (tested bit for bit with transformers' ``compute_hash_embeddings``).
* **Collisions**: writers are taken by n-gram size, shortest first (a writer's ``S`` needs the
  shorter ones final), and within a size by priority: the summed corpus count of the tokens that
  map to that string, then the lowest token id (BPE's merge order).  The first writer of a
  bucket wins; later ones are dropped (``stats["collisions"]``).  Because entries are computed
  against the realised sums, a lost bucket corrupts only the positions where the losing string
  is the longest token, not the longer tokens that end with it.
* **Which tokens are written.**  Every bucket that holds an entry also fires at every *other*
  n-gram that hashes there, adding a wrong token vector (and its length offset, which steers the
  amax to the wrong byte): with few buckets this, not the rank, dominates the error.  So, by
  default (``noise_ratio: 1``), a token is written only where the corpus's other n-grams that
  land in its bucket occur at most as often as the token's own string (:func:`ngram_traffic`;
  a token never seen is written only into a bucket no corpus n-gram hits).  SmolLM2 at 131,072
  buckets: 16k of 44k tokens written, bound 1.99 -> 1.54 bits/byte on held-out text and 2.91 ->
  2.55 on out-of-domain English (the counts come from the corpus, so the out-of-domain figure is
  the honest one).  ``max_tokens`` caps the count (most frequent first): a smaller further gain
  in-domain, none out of domain; off by default.
* **Tokens longer than the largest n** (``long_tokens``): ``suffix`` (default) writes the token
  into the bucket of its last ``n_max`` bytes when those bytes are not themselves a token (the
  most frequent such token wins a shared suffix), with length offset ``n_max + 1``; ``drop``
  leaves them out (their bytes show the longest shorter suffix token).  With every token written
  ``drop`` was better at 131,072 and 500,002 buckets (the suffixes add occupied buckets), with
  nearly empty tables (4M buckets) or the noise filter ``suffix`` is as good or better
  in-domain; larger n-gram sizes are the other way (``hash.ngram_sizes``), at one table each.
* **Encoder**: every local layer an identity (attention ``o_proj`` and MLP ``down_proj`` zero);
  ``patch_reduce``'s per-coordinate amax then selects, in every coordinate, the byte with the
  longest suffix token (the length offset ``b`` is at least the content's clipped range:
  selection is exact whenever that byte's token is strictly the longest in the patch);
  ``patch_embedding_projection = U B^T / (2 g)`` removes the offset (``B^T 1 = 0``) and undoes
  the content scale ``g`` and the doubled residual of the cross-attention, whose ``o_proj`` is
  zero.  The global transformer then reads ``U U^T e_v``.  Scale matching is not applied.
  Width: the rank is ``d - 1``, so an encoder as wide as the global transformer (``k = 1``, the
  ``warm`` preset; the decoder, which reads the encoder's byte states, is then as wide too)
  beats ``k = 2`` clearly (SmolLM2, 131,072 buckets: 1.44 vs 1.53 bits/byte held-out, 2.19 vs
  2.55 out of domain), at twice the table memory and ~30% more FLOPs per byte (the decoder).
  The decoder's input (the encoder's byte states) carries the length offsets (at grid step 2^-6
  |x| up to ~2.4 per coordinate next to content of ~0.2); training has to learn to read past them.
* **What the decoder reads** (options, measured in ``benchmarks/byteify_quality.py``):
  ``unit_exponent`` sets the grid step (default 2^-11: the byte states at the fresh modules'
  initial scale; 2^-6 left them ~30x larger and trained slower, rows 2s vs 2; a power of two, so
  the global's input is the same up to the projection's bf16 rounding); ``free_dims`` f keeps
  the content and offsets in the first d - f coordinates (rank d - f - 1) and fills the last f
  with random codes of the byte and its n-grams (a fresh table's draw, 1/sqrt(d) per table),
  which the projection ignores exactly; ``spelling`` writes telescoped codes of each token's
  next-byte distribution there instead and makes the decoder read them
  (:mod:`byteify.convert.spelling`).
* **bf16** (``bf16_exact``, default on): content is clipped at ``clip`` standard deviations and
  rounded to a grid, offsets are integers on that grid, and the grid is sized so that every
  table value, byte embedding and partial sum is an integer multiple of the grid step
  (``2^unit_exponent``) of magnitude at most 256 steps: exactly representable in bf16, fp16 and
  fp32, so the embedding sums, the identity layer and the amax are exact in every dtype
  (positions hit by collisions can exceed the range and round).  The projection is rounded to
  bf16-representable values and each row's sum is made zero in exact arithmetic, so the offset
  (up to ~40x the content per coordinate) cancels exactly in a bf16 matmul with fp32
  accumulation as well.  What bf16 still rounds is the projection's weights and outputs
  (relative 2^-9).  The grid's own cost in fp32: the
  content is quantised to ~1/14 of 4 standard deviations (relative error ~8%), measured
  +0.003 bits/byte.
* **Memory**: the source embeddings are read twice in row blocks (D x D Gram matrix, then the
  d-wide content of every token: V x d float32), the written entries are kept sparse (at most
  one row per token), the corpus's n-gram statistics one size at a time, and the hash table is
  streamed in row blocks of zeros with the entries scattered in: never held whole.  SmolLM2
  with ``--preset warm`` (2.1 GB fp32 table): peak RSS 1.0 GB vs 0.67 GB for the default
  conversion of the same GGUF; ~25 s of planning (most of it reading and tokenizing the corpus).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..errors import ByteifyError
from ..tokenizer import BOE_ID, BOS_ID, EOS_ID, OFFSET, PAD_ID, VOCAB_SIZE, token_byte_strings

BYTE_EMBEDDING = "model.local_encoder.embed_tokens.weight"
PATCH_PROJECTION = "model.local_encoder.patch_embedding_projection.weight"
GRID_LIMIT = 256  # bf16 (8 significant bits) represents every integer of magnitude <= 256 exactly
PRIMES = [1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133,
          2860486313, 5463458053, 3367900313]  # transformers' compute_hash_embeddings


@dataclass
class WarmStart:
    """The computed warm start: byte embeddings, the non-zero rows of the fused hash table, the
    patch projection, the tensors to zero, and statistics for ``byteify.json``."""

    byte_embeddings: torch.Tensor  # [260, d] float32
    rows: torch.Tensor  # [M] int64, sorted: the fused-table rows that hold an entry
    entries: torch.Tensor  # [M, d] float32
    projection: torch.Tensor  # [k*d, d] float32 (bf16-representable, rows summing to zero)
    zeroed: list[str]
    owners: torch.Tensor | None = None  # [M] int64: the token whose entry each row holds (-1: reserved, zero)
    stats: dict = field(default_factory=dict)
    token_vectors: torch.Tensor | None = None  # [V, d] F(v) for every token (keep_token_vectors only)
    centred: list[str] = field(default_factory=list)  # decoder weights whose rows get their mean removed
    free: int = 0  # the last ``free`` coordinates: random n-gram features (``free_dims``)
    seed: int = 0
    free_entries: torch.Tensor | None = None  # [M, free] the written rows' free coordinates (``spelling``; else random)
    decoder: dict = field(default_factory=dict)  # decoder tensor name -> value (None: zeros) (``spelling``)

    def _free_features(self, rows: int, gen: torch.Generator) -> torch.Tensor:
        """``rows`` random feature rows, drawn as a fresh hash table is (``fresh_parts``)."""
        from .fresh import trunc_normal_by_rejection_

        std = self.entries.shape[1] ** -0.5
        return trunc_normal_by_rejection_(torch.empty(rows, self.free), std=std, a=-3 * std, b=3 * std, generator=gen)

    def small_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor name -> value for every encoder tensor the warm start sets (not the hash table)."""
        out = {BYTE_EMBEDDING: self.byte_embeddings, PATCH_PROJECTION: self.projection}
        for name in self.zeroed:
            out[name] = None  # zeros of the fresh tensor's shape
        out.update(self.decoder)
        return out

    def table_chunks(self, total_rows: int, dtype: torch.dtype, rows: int = 8192):
        """The fused hash table as consecutive blocks of ``rows`` rows in ``dtype``: zeros with the
        entries scattered in; only one block and the (sparse) entries are ever held."""
        d = self.entries.shape[1]
        lo = 0
        gen = torch.Generator().manual_seed(self.seed + 2)
        for start in range(0, total_rows, rows):
            stop = min(total_rows, start + rows)
            block = torch.zeros(stop - start, d, dtype=dtype)
            if self.free and self.free_entries is None:
                block[:, d - self.free:] = self._free_features(stop - start, gen).to(dtype)
            hi = int(torch.searchsorted(self.rows, stop))
            if hi > lo:
                block[self.rows[lo:hi] - start] = self.entries[lo:hi].to(dtype)
                if self.free_entries is not None:
                    block[self.rows[lo:hi] - start, d - self.free:] = self.free_entries[lo:hi].to(dtype)
            lo = hi
            yield block

    def dense_table(self, total_rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table (tests and small models only)."""
        return torch.cat(list(self.table_chunks(total_rows, dtype, rows=max(1, total_rows))))


# ---------------------------------------------------------------------------------------------
_COUNTS_CACHE: dict[tuple, torch.Tensor] = {}


def _tokenizer_fingerprint(tokenizer) -> str | None:
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def token_counts(tokenizer, vocab: int, documents=None) -> torch.Tensor:
    """How often the source tokenizer emits each token (float64, length ``vocab``) on
    ``documents`` (bytes), by default :func:`training_documents`.  The default is remembered per
    process for a fast tokenizer (keyed by its full serialisation): reading and tokenizing the
    2 MB corpus takes seconds."""
    key = (_tokenizer_fingerprint(tokenizer), vocab) if documents is None else (None,)
    if key[0] is not None and key in _COUNTS_CACHE:
        return _COUNTS_CACHE[key].clone()
    texts = [d.decode("utf-8", errors="replace") for d in (training_documents() if documents is None else documents)]
    counts = torch.zeros(vocab, dtype=torch.float64)
    for i in range(0, len(texts), 256):
        enc = tokenizer(texts[i:i + 256], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([t for row in enc for t in row if t < vocab], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab).to(torch.float64)
    if key[0] is not None:
        _COUNTS_CACHE[key] = counts.clone()
    return counts


def training_documents(val_fraction: float = 0.05, seed: int = 0) -> list[bytes]:
    """The embedded corpus without the documents the recipes' default split (``val_fraction``
    0.05, seed 0) holds out: the text the token counts come from."""
    from ..data.readers import open_source
    from ..data.streams import decide_holdout

    source = open_source("default")
    holdout = decide_holdout([source], val_fraction, seed)
    out = []
    for _, doc in source.documents():
        train, _ = holdout.split(doc)
        if train:
            out.append(train)
    return out


def ngram_traffic(documents, sizes: list[int], buckets: int, prime: int = PRIMES[0]):
    """How the n-grams of ``documents`` (each framed ``[BOS] + bytes`` like a training window's
    start) load the hash tables: per size ``n``, (bucket hits [buckets] int64, the sorted distinct
    raw polynomial hashes of the n-grams, their counts).  The raw hash (before the modulo) tells
    strings apart, so a bucket's hits split into one string's own and everyone else's."""
    from transformers.models.blt.modeling_blt import rolling_polynomial_hash

    out = {}
    for n in sizes:
        raws = []
        for doc in documents:
            body = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long() + OFFSET if doc else torch.zeros(0, dtype=torch.long)
            ids = torch.cat([torch.tensor([BOE_ID] * (n - 1) + [BOS_ID]), body])
            raws.append(rolling_polynomial_hash(ids.unfold(0, n, 1), prime))
        raw = torch.cat(raws) if raws else torch.zeros(0, dtype=torch.long)
        hits = torch.bincount(raw % buckets, minlength=buckets)
        uniq, counts = torch.unique(raw, return_counts=True)
        out[n] = (hits, uniq, counts)
    return out


def rotated_basis(d: int, r: int, seed: int, free: int = 0) -> torch.Tensor:
    """``B`` (d x r, float64): orthonormal columns orthogonal to the all-ones vector of the first
    ``d - free`` coordinates and zero on the last ``free``, a random rotation drawn from ``seed``
    (reproducible on every platform: torch's CPU generator)."""
    c = d - free
    if c < 2:
        raise ByteifyError(f"vocab_warm_start: free_dims {free} leaves fewer than 2 of the encoder's {d} coordinates")
    if r > c - 1:
        raise ByteifyError(f"vocab_warm_start: rank {r} > encoder width - free_dims - 1 = {c - 1}")
    g = torch.randn(c, r, generator=torch.Generator().manual_seed(seed + 7919), dtype=torch.float64)
    g -= g.mean(0, keepdim=True)
    with one_thread():
        q, _ = torch.linalg.qr(g)
    q -= q.mean(0, keepdim=True)  # exact orthogonality to 1 up to float64 rounding
    return torch.cat([q, q.new_zeros(free, r)])


@contextlib.contextmanager
def one_thread():
    """Small dense linear algebra (and tiny models) on one thread: with two, the OpenMP threads
    mostly wait on each other, the more so when another process busies the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bf16_zero_sum_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to bf16-representable values (returned as float32) with every row's exact
    sum zero (or a few bf16 ulps of its smallest entries): a bf16 matmul with fp32 accumulation
    then maps any multiple of the all-ones vector to zero.  Rows are corrected entry by entry,
    largest first, each entry absorbing as much of the row's residual as its precision allows."""
    w64 = w.to(torch.float64)
    out = w64.to(torch.bfloat16).to(torch.float64)
    residual = out.sum(1)  # exact: float64 holds sums of a few hundred bf16 values exactly enough
    order = w64.abs().argsort(dim=1, descending=True)
    rows = torch.arange(w.shape[0])
    for j in range(w.shape[1]):
        col = order[:, j]
        old = out[rows, col]
        new = (old - residual).to(torch.bfloat16).to(torch.float64)
        out[rows, col] = new
        residual = residual - old + new
    return out.to(torch.float32)


def _hash_rows(strings: list[bytes], n: int, table: int, buckets: int, prime: int) -> torch.Tensor:
    """Rows of the fused table for n-byte ``strings`` in n-gram table ``table``: transformers'
    own ``byte_group_hash_function`` on their BLT ids."""
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    if not strings:
        return torch.zeros(0, dtype=torch.long)
    ids = torch.tensor([[b + OFFSET for b in s] for s in strings], dtype=torch.long)
    return byte_group_hash_function(ids, n, prime, buckets)[:, -1] + table * buckets


def _ids_rows(ids: torch.Tensor, n: int, table: int, buckets: int, prime: int) -> torch.Tensor:
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    return byte_group_hash_function(ids, n, prime, buckets)[:, -1] + table * buckets


def decoder_readers(config) -> list[str]:
    """The weights that read the local decoder's residual stream, which starts as the encoder's
    byte states and so carries the length offsets along the all-ones direction: every layer's
    q/k/v and gate/up projections, the cross-attention queries, and the LM head.  With each row's
    mean removed (``W (I - 11^T / d)``) they see only the content; training may undo it."""
    dec = config.decoder_config
    names = ["lm_head.weight"]
    for i in range(dec.num_hidden_layers):
        names += [f"model.local_decoder.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
        names += [f"model.local_decoder.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up")]
    n_cross = dec.num_hidden_layers if dec.cross_attn_all_layers else 1
    names += [f"model.local_decoder.cross_attn_layers.{j}.q_proj.weight" for j in range(n_cross)]
    return names


def encoder_zeroed(config) -> list[str]:
    """The encoder weights the warm start zeroes: each local layer's attention output and MLP
    down projection (identity layers), and the cross-attention output projections."""
    enc = config.encoder_config
    names = []
    for i in range(enc.num_hidden_layers):
        names += [f"model.local_encoder.layers.{i}.self_attn.o_proj.weight",
                  f"model.local_encoder.layers.{i}.mlp.down_proj.weight"]
    n_cross = enc.num_hidden_layers if enc.cross_attn_all_layers else 1
    names += [f"model.local_encoder.cross_attn_layers.{j}.o_proj.weight" for j in range(n_cross)]
    return names


def check_applicable(config) -> None:
    """The warm start needs the encoder's patch outputs to be the global transformer's inputs
    (``encoder width x cross_attn_k = global width``) and a single cross-attention (no
    ``cross_attn_all_layers`` in the encoder)."""
    d, k, D = config.encoder_config.hidden_size, config.cross_attn_k, config.global_config.hidden_size
    if d * k != D:
        raise ByteifyError(f"vocab_warm_start: encoder.hidden_size {d} x cross_attn_k {k} must equal the global "
                           f"hidden size {D} (BLT's patch projection feeds the global transformer directly)")
    if config.encoder_config.cross_attn_all_layers:
        raise ByteifyError("vocab_warm_start: needs the encoder's single cross-attention (cross_attn_all_layers false)")
    if min(config.encoder_hash_byte_group_size) < 1:
        raise ByteifyError("vocab_warm_start: n-gram sizes must be positive")


def grid(offset: float, max_step: int) -> tuple[int, int]:
    """(m, b): content clipped to +-m grid units and ``b`` units of offset per byte of length,
    the largest m with ``b = round(offset * 2m)`` and ``b * max_step + 2m <= GRID_LIMIT`` (every
    telescoped entry then fits bf16's exact-integer range)."""
    m = max(1, int(GRID_LIMIT // (2 * (offset * max_step + 1))))
    while m > 1 and round(offset * 2 * m) * max_step + 2 * m > GRID_LIMIT:
        m -= 1
    return m, max(1, round(offset * 2 * m))


# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def plan_warm_start(config, spec, tokenizer, embedding_blocks, seed: int = 0, counts: torch.Tensor | None = None,
                    log=None, keep_token_vectors: bool = False, documents=None) -> WarmStart:
    """Compute the warm start for a BLT ``config`` from the source ``tokenizer`` and its input
    embeddings, read twice as row blocks from ``embedding_blocks()`` (a callable returning an
    iterator of [rows, D] tensors).  ``spec``: the preset's ``vocab_warm_start``.  ``counts``:
    token counts (None: from ``spec.frequencies``).  Memory: the D x D Gram matrix, the d-wide
    content of every token and the written entries (at most one per token), float32.
    ``keep_token_vectors``: also return every token's F(v) (tests, diagnostics).  ``documents``:
    the text of ``noise_ratio``'s bucket traffic (None: :func:`training_documents`)."""
    check_applicable(config)
    if spec.spelling and spec.free_dims < 2:
        raise ByteifyError(f"vocab_warm_start.spelling: needs free_dims >= 2 (codes and a constant), got {spec.free_dims}")
    if spec.spelling and spec.decoder_ignores_offset:
        raise ByteifyError("vocab_warm_start.spelling writes the decoder's LM head; decoder_ignores_offset would "
                           "centre it: set one of them")
    d, k = config.encoder_config.hidden_size, config.cross_attn_k
    sizes = list(config.encoder_hash_byte_group_size)
    layout = _HashLayout(sizes=sizes, buckets=config.encoder_hash_byte_group_vocab,
                         total_rows=config.encoder_hash_byte_group_nb_functions * len(sizes)
                         * config.encoder_hash_byte_group_vocab)
    token_bytes = token_byte_strings(tokenizer)
    stats: dict = {}
    # 1. weights and the weighted Gram matrix -> U, the rotated basis B
    counts, weights, u, basis = _principal_basis(embedding_blocks, d * k, d, spec, tokenizer, counts, seed, stats)
    vocab = len(weights)
    # 2. content of every token, its frequency-weighted per-coordinate spread
    content, sigma = _token_content(embedding_blocks, u @ basis.T, weights)
    # 3. lengths, offsets, the grid
    g = _place_on_grid(content, sigma, weights, _token_lengths(token_bytes, vocab), spec, max(sizes), stats)
    # 4. byte embeddings
    priority = (counts[:vocab] if counts is not None else torch.zeros(vocab, dtype=torch.float64)).tolist()
    byte_units = _byte_embeddings(g, _tokens_by_string(token_bytes, priority), tokenizer, stats)
    # 5. writers, n-gram size by size; entries against the realised sums
    table = _write_tables(layout, token_bytes, g, byte_units, priority, spec, documents, stats)
    rows, entries, owners = table.finish()
    free = spec.free_dims
    if free:  # the offsets leave the free coordinates (the content is zero there already)
        entries[:, d - free:] = 0
        byte_units[:, d - free:] = 0
    unit = 2.0 ** spec.unit_exponent  # the grid step
    token_vectors = g.f_units(torch.arange(vocab), g.lam) * unit if keep_token_vectors else None
    if token_vectors is not None and free:
        token_vectors[:, d - free:] = 0
    stats["entries"] = len(rows)
    stats["max_abs_units"] = float(entries.abs().max()) if len(entries) else 0.0
    stats["exact_in_bf16"] = bool(spec.bf16_exact and stats["max_abs_units"] <= GRID_LIMIT)
    # 6. the projection: content units -> U U^T e
    projection = _projection(u, basis, g.gain, spec)
    stats.update({"grid_content_units": g.m, "offset_units_per_byte": g.b, "centre": g.c0, "unit": unit,
                  "content_std": sigma, "gain": g.gain, "frequencies": "corpus" if counts is not None else "uniform",
                  "max_offset_length": g.lam_max})
    if log:
        log(f"warm start: {stats['entries']:,} table entries, collisions {stats['collisions']}")
    ws = WarmStart(byte_embeddings=(byte_units * unit).to(torch.float32), rows=rows,
                   entries=(entries * unit).to(torch.float32), projection=projection,
                   zeroed=encoder_zeroed(config), owners=owners, stats=stats, token_vectors=token_vectors,
                   centred=decoder_readers(config) if spec.decoder_ignores_offset else [],
                   free=free, seed=seed)
    if spec.spelling:  # the vocabulary's next-byte distributions for the decoder (byteify.convert.spelling)
        _write_spelling(ws, config, layout, token_bytes, priority, stats)
    elif free:  # the bytes' features from their own generator, the table's in table_chunks
        ws.byte_embeddings[:, d - free:] = ws._free_features(VOCAB_SIZE, torch.Generator().manual_seed(seed + 3))
    stats["free_dims"] = free
    return ws


def _write_spelling(ws: WarmStart, config, layout, token_bytes, priority: list[float], stats: dict) -> None:
    """``spelling``: the free coordinates hold telescoped codes of each token's next-byte
    distribution and a constant; the decoder starts as an identity whose LM head reads them."""
    from . import spelling

    d, free = ws.byte_embeddings.shape[1], ws.free
    weights = torch.zeros(len(token_bytes), dtype=torch.float64)
    n = min(len(priority), len(token_bytes))
    weights[:n] = torch.tensor(priority[:n], dtype=torch.float64) + 1.0
    weights[torch.tensor([not b for b in token_bytes])] = 0.0
    logprobs = spelling.next_byte_logprobs(token_bytes, weights)
    codes, head, sstats = spelling.spelling_codes(logprobs, weights, free - 1)
    single = spelling.single_byte_tokens(token_bytes, weights)
    byte_codes = torch.stack([codes[v] if v >= 0 else torch.zeros(free - 1) for v in single])  # [256, r]
    ws.byte_embeddings[:, d - free:] = 0.0
    ws.byte_embeddings[OFFSET:OFFSET + 256, d - free:d - 1] = byte_codes
    ws.byte_embeddings[:, d - 1] = spelling.KAPPA
    entries = spelling.telescoped_free(layout, token_bytes, ws.rows, ws.owners, codes, byte_codes)
    ws.free_entries = torch.cat([entries, torch.zeros(len(entries), 1)], 1)
    ws.decoder = spelling.decoder_tensors(config, head, free, sstats["mean_log_partition"])
    stats["spelling"] = sstats


# ---- 1. weights and the weighted Gram matrix -> U, B ---------------------------------------------
def _weighted_gram(embedding_blocks, D: int, counts: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(the D x D Gram matrix of the source embeddings, rows weighted by ``count + 1``, the number
    of rows): one pass over ``embedding_blocks()``."""
    gram = torch.zeros(D, D, dtype=torch.float64)
    start = 0
    for block in embedding_blocks():
        e = block.to(torch.float64)
        if e.shape[1] != D:
            raise ByteifyError(f"vocab_warm_start: source embeddings are {e.shape[1]} wide, the global transformer {D}")
        w = (counts[start:start + len(e)] + 1.0) if counts is not None else torch.ones(len(e), dtype=torch.float64)
        gram += (e * w[:, None]).T @ e
        start += len(e)
    return gram, start


def _principal_basis(embedding_blocks, D: int, d: int, spec, tokenizer, counts, seed: int, stats: dict):
    """(counts, weights, U, B): the token counts (from the corpus when ``counts`` is None and
    ``spec.frequencies`` is ``corpus``), every token's weight ``count + 1`` (or 1), ``U`` (D x r)
    the top right-singular vectors of the weighted embeddings, largest first, and ``B`` (d x r)
    the rotated basis (:func:`rotated_basis`)."""
    if counts is None and spec.frequencies == "corpus":
        n_rows = sum(int(b.shape[0]) for b in embedding_blocks())
        counts = token_counts(tokenizer, n_rows)
    gram, vocab = _weighted_gram(embedding_blocks, D, counts)
    weights = (counts[:vocab] + 1.0) if counts is not None else torch.ones(vocab, dtype=torch.float64)
    with one_thread():  # small dense linear algebra: threads only wait on each other (12 s vs 0.07 s)
        evals, evecs = torch.linalg.eigh(gram)
    c = d - spec.free_dims  # the coordinates that hold content
    r = min(spec.rank or c - 1, D)
    u = evecs[:, -r:].flip(1)  # D x r, largest first
    stats["rank"] = r
    stats["energy_kept"] = float(evals[-r:].sum() / evals.sum())
    return counts, weights, u, rotated_basis(d, r, seed, spec.free_dims)


# ---- 2. content of every token ----------------------------------------------------------------
def _token_content(embedding_blocks, proj: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(content [V, d] float32: every token's embedding through ``proj`` = U B^T (D x d), sigma:
    its frequency-weighted per-coordinate spread): the second pass over the embeddings."""
    vocab, d = len(weights), proj.shape[1]
    content = torch.empty(vocab, d, dtype=torch.float32)
    start = 0
    for block in embedding_blocks():
        content[start:start + len(block)] = (block.to(torch.float64) @ proj).to(torch.float32)
        start += len(block)
    sigma = float(((content.pow(2).sum(1).double() * weights).sum() / (weights.sum() * d)).sqrt())
    if not sigma > 0:
        raise ByteifyError("vocab_warm_start: the source embeddings are all zero")
    return content, sigma


# ---- 3. lengths, offsets, the grid --------------------------------------------------------------
def _token_lengths(token_bytes: list[bytes | None], vocab: int) -> torch.Tensor:
    """Every token's length in bytes ([vocab] int64; 0 for tokens without bytes)."""
    return torch.tensor([len(b) if (b is not None and i < vocab) else 0 for i, b in enumerate(token_bytes)]
                        + [0] * max(0, vocab - len(token_bytes)), dtype=torch.long)[:vocab]


@dataclass
class _Grid:
    """Every token's content in grid units and the length offsets: ``F(v)`` in grid steps."""

    content_units: torch.Tensor  # [V, d] float32: content clipped to +-m (integers when bf16_exact)
    lengths: torch.Tensor  # [V] int64: bytes per token
    lam: torch.Tensor  # [V] int64: the length each token's offset counts (n_max + 1 or 0 beyond n_max)
    b: int  # offset units per byte of length
    c0: int  # the centre of the offsets
    m: int  # the content's grid range
    gain: float  # grid units per unit of content
    lam_max: int  # the largest offset length

    def f_units(self, ids: torch.Tensor, lam_ids: torch.Tensor) -> torch.Tensor:
        """``F`` of tokens ``ids`` with offset lengths ``lam_ids``, in grid units."""
        return self.b * (lam_ids.float() - self.c0)[:, None] + self.content_units[ids]


def _place_on_grid(content: torch.Tensor, sigma: float, weights: torch.Tensor, lengths: torch.Tensor, spec,
                   n_max: int, stats: dict) -> _Grid:
    """The offsets and the grid (:func:`grid`); ``content`` is scaled, clipped and (bf16_exact)
    rounded in place."""
    suffix_rule = spec.long_tokens == "suffix"
    lam = torch.where(lengths > n_max, torch.full_like(lengths, n_max + 1 if suffix_rule else 0), lengths)
    lam_max = n_max + 1 if suffix_rule else n_max
    c0 = (lam_max + 1) // 2
    m, b = grid(spec.offset, lam_max - 1)
    gain = m / (spec.clip * sigma)  # grid units per unit of content
    content.mul_(gain)  # float32 from here on: grid values are small integers, exact
    stats["clipped_fraction"] = float(((content.abs() > m).double().mean(1) * weights).sum() / weights.sum())
    content.clamp_(-m, m)
    if spec.bf16_exact:
        content.round_()
    return _Grid(content_units=content, lengths=lengths, lam=lam, b=b, c0=c0, m=m, gain=gain, lam_max=lam_max)


# ---- 4. byte embeddings ---------------------------------------------------------------------------
def _tokens_by_string(token_bytes: list[bytes | None], priority: list[float]) -> dict[bytes, int]:
    """Byte string -> the token that stands for it: the most frequent, then the lowest id."""
    by_string: dict[bytes, int] = {}
    for i in sorted(range(len(priority)), key=lambda i: (-priority[i], i)):
        s = token_bytes[i] if i < len(token_bytes) else None
        if s:
            by_string.setdefault(s, i)
    return by_string


def _byte_embeddings(g: _Grid, by_string: dict[bytes, int], tokenizer, stats: dict) -> torch.Tensor:
    """The byte embeddings in grid units ([VOCAB_SIZE, d]): bytes that are tokens get F; BOS and
    EOS the source's BOS (or EOS) and EOS; the rest the offset of length 1; BOE and PAD below
    every token."""
    vocab, d = g.content_units.shape
    byte_units = torch.zeros(VOCAB_SIZE, d, dtype=torch.float32)
    byte_units[:] = g.b * (1 - g.c0)
    for x in range(256):
        tid = by_string.get(bytes([x]))
        if tid is not None:
            byte_units[x + OFFSET] = g.f_units(torch.tensor([tid]), torch.tensor([1]))[0]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    for blt_id, tid in ((BOS_ID, bos), (EOS_ID, eos)):
        if tid is not None and tid < vocab:
            byte_units[blt_id] = g.f_units(torch.tensor([tid]), torch.tensor([1]))[0]
    for blt_id in (BOE_ID, PAD_ID):  # padding: below every token, never selected
        byte_units[blt_id] = g.b * (0 - g.c0)
    stats["bytes_without_token"] = sum(bytes([x]) not in by_string for x in range(256))
    return byte_units


# ---- 5. writers, n-gram size by size ------------------------------------------------------------
@dataclass(frozen=True)
class _HashLayout:
    """Where an n-gram lands in the fused table (the first hash function's tables)."""

    sizes: list[int]  # the config's n-gram sizes, in table order
    buckets: int
    total_rows: int
    prime: int = PRIMES[0]

    @property
    def writer_sizes(self) -> list[int]:
        """The sizes that get entries, shortest first."""
        return sorted({n for n in self.sizes if n >= 2})

    def table(self, n: int) -> int:
        return self.sizes.index(n)

    def ids_rows(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return _ids_rows(ids, n, self.table(n), self.buckets, self.prime)

    def string_rows(self, strings: list[bytes], n: int) -> torch.Tensor:
        return _hash_rows(strings, n, self.table(n), self.buckets, self.prime)


class _TableEntries:
    """The table entries as they are written: ``slot`` (fused-table row -> entry index; -1 free,
    -2 claimed) and the entries (grid units), rows and owners in blocks."""

    def __init__(self, layout: _HashLayout, d: int):
        self.layout, self.d = layout, d
        self.slot = torch.full((layout.total_rows,), -1, dtype=torch.int32)
        self.entry_blocks: list[torch.Tensor] = []
        self.row_blocks: list[torch.Tensor] = []
        self.owner_blocks: list[torch.Tensor] = []
        self.n_entries = 0

    def reserve_bos(self) -> None:
        """Reserve the BOS n-grams (left padding + BOS): they stay zero, so the BOS patch is exact."""
        for n in self.layout.writer_sizes:
            row = int(self.layout.ids_rows(torch.tensor([[BOE_ID] * (n - 1) + [BOS_ID]]), n)[0])
            if self.slot[row] < 0:
                self.add(torch.tensor([row]), torch.zeros(1, self.d, dtype=torch.float32), torch.tensor([-1]))

    def claim(self, rows: torch.Tensor, quiet: list[bool] | None) -> tuple[list[int], int, int]:
        """(the indices of ``rows`` claimed, in order; how many were taken already; how many were
        noisy): a row is claimed when free and (``quiet``) quiet."""
        won, lost, noisy = [], 0, 0
        for j, row in enumerate(rows.tolist()):
            if self.slot[row] != -1:  # a reserved row, or an earlier (more frequent) writer of this size
                lost += 1
                continue
            if quiet is not None and not quiet[j]:  # other strings hit this bucket more often than the token
                noisy += 1
                continue
            self.slot[row] = -2  # claimed; index assigned by add
            won.append(j)
        return won, lost, noisy

    def suffix_sums(self, keys: list[bytes], n: int, byte_units: torch.Tensor) -> torch.Tensor:
        """``S(key[1:])`` for n-byte ``keys``: the byte embedding of the last byte plus the realised
        buckets of the shorter suffixes (every shorter size is final)."""
        s_units = byte_units[torch.tensor([key[-1] + OFFSET for key in keys])].clone()
        key_ids = torch.tensor([[x + OFFSET for x in key] for key in keys], dtype=torch.long)
        for mm in self.layout.writer_sizes:
            if mm >= n:
                break
            idx = self.slot[self.layout.ids_rows(key_ids[:, -mm:], mm)].long()
            hit = idx >= 0
            if hit.any():
                flat = torch.cat(self.entry_blocks) if len(self.entry_blocks) > 1 else self.entry_blocks[0]
                self.entry_blocks = [flat]
                s_units[hit] += flat[idx[hit]]
        return s_units

    def add(self, rows: torch.Tensor, entries: torch.Tensor, owners: torch.Tensor) -> None:
        self.slot[rows] = torch.arange(self.n_entries, self.n_entries + len(rows), dtype=torch.int32)
        self.entry_blocks.append(entries)
        self.row_blocks.append(rows)
        self.owner_blocks.append(owners)
        self.n_entries += len(rows)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, entries, owners), sorted by row; the slot array is dropped."""
        self.slot = None
        entries = torch.cat(self.entry_blocks) if self.entry_blocks else torch.zeros(0, self.d, dtype=torch.float32)
        rows = torch.cat(self.row_blocks) if self.row_blocks else torch.zeros(0, dtype=torch.long)
        owners = torch.cat(self.owner_blocks) if self.owner_blocks else torch.zeros(0, dtype=torch.long)
        order = rows.argsort()
        return rows[order], entries[order], owners[order]


def _write_tables(layout: _HashLayout, token_bytes, g: _Grid, byte_units: torch.Tensor, priority: list[float],
                  spec, documents, stats: dict) -> _TableEntries:
    """Step 5: the BOS rows reserved, then the writers of every size, shortest first."""
    n_max = max(layout.sizes)
    table = _TableEntries(layout, g.content_units.shape[1])
    table.reserve_bos()
    stats["collisions"] = {}
    stats["written"] = {}
    stats["long_tokens"] = {"count": int((g.lengths > n_max).sum()), "rule": spec.long_tokens, "written": 0,
                            "shared_suffix": 0}
    allowed = _most_frequent_tokens(spec.max_tokens, token_bytes, priority, stats)
    groups = _writer_groups(token_bytes, g.lengths, layout, spec.long_tokens == "suffix", allowed, stats)
    traffic_docs = None
    if spec.noise_ratio is not None:  # which buckets the corpus's other n-grams keep busy
        traffic_docs = documents if documents is not None else training_documents()
        stats["noise_ratio"] = spec.noise_ratio
        stats["skipped_noisy"] = {}
    for n in layout.writer_sizes:
        keys, winners = _rank_writers(groups[n], n, g.lengths, priority, stats["long_tokens"])
        rows = layout.string_rows(keys, n)
        quiet = _quiet_mask(traffic_docs, keys, rows, n, layout, spec.noise_ratio)
        _write_size(table, n, keys, winners, rows, quiet, g, byte_units, stats)
    return table


def _most_frequent_tokens(max_tokens: int | None, token_bytes, priority: list[float], stats: dict) -> set[int] | None:
    """``max_tokens``: only the most frequent multi-byte tokens get a bucket (None: all)."""
    if max_tokens is None:
        return None
    multi = [i for i in range(min(len(priority), len(token_bytes))) if token_bytes[i] and len(token_bytes[i]) > 1]
    stats["max_tokens"] = max_tokens
    return set(sorted(multi, key=lambda i: (-priority[i], i))[:max_tokens])


def _writer_groups(token_bytes, lengths: torch.Tensor, layout: _HashLayout, suffix_rule: bool,
                   allowed: set[int] | None, stats: dict) -> dict[int, dict[bytes, list[int]]]:
    """n -> the string each multi-byte token writes -> the tokens that write it: its own bytes,
    or (longer than the largest n, ``suffix``) its last ``n_max`` bytes."""
    n_max = max(layout.sizes)
    representable = set(layout.sizes) | {1}
    groups: dict[int, dict[bytes, list[int]]] = {n: {} for n in layout.writer_sizes}
    unrepresented = 0
    for i in range(len(lengths)):
        s = token_bytes[i] if i < len(token_bytes) else None
        if not s or len(s) == 1 or (allowed is not None and i not in allowed):
            continue
        if len(s) > n_max:
            if suffix_rule and n_max in groups:
                groups[n_max].setdefault(s[-n_max:], []).append(i)
            continue
        if len(s) not in representable:
            unrepresented += 1
            continue
        groups[len(s)].setdefault(s, []).append(i)
    stats["unrepresented_lengths"] = unrepresented
    return groups


def _rank_writers(group: dict[bytes, list[int]], n: int, lengths: torch.Tensor, priority: list[float],
                  long_stats: dict) -> tuple[list[bytes], list[int]]:
    """(strings, the token that writes each), by priority: the summed count of the string's tokens,
    then the writer's id.  The writer: the most frequent token of exactly ``n`` bytes, else the most
    frequent longer one sharing the suffix."""
    keys = list(group)
    winners, prio = [], []
    for key in keys:
        members = group[key]
        exact = [i for i in members if lengths[i] == n]
        pool = exact or members
        winners.append(min(pool, key=lambda i: (-priority[i], i)))
        prio.append(sum(priority[i] for i in members))
        if not exact:
            long_stats["shared_suffix"] += len(members) - 1
    order = sorted(range(len(keys)), key=lambda j: (-prio[j], winners[j]))
    return [keys[j] for j in order], [winners[j] for j in order]


def _quiet_mask(traffic_docs, keys: list[bytes], rows: torch.Tensor, n: int, layout: _HashLayout,
                noise_ratio: float | None) -> list[bool] | None:
    """The noise filter: per key, whether the corpus's other n-grams hit its bucket at most
    ``noise_ratio`` times as often as the key itself (None: no filter)."""
    if traffic_docs is None or not keys:
        return None
    from transformers.models.blt.modeling_blt import rolling_polynomial_hash

    # one size at a time: the corpus's n-gram statistics are big
    hits, uniq, uniq_counts = ngram_traffic(traffic_docs, [n], layout.buckets, layout.prime)[n]
    raw = rolling_polynomial_hash(torch.tensor([[x + OFFSET for x in k] for k in keys], dtype=torch.long), layout.prime)
    pos = torch.searchsorted(uniq, raw).clamp(max=max(len(uniq) - 1, 0))
    own = torch.where(uniq[pos] == raw, uniq_counts[pos], 0) if len(uniq) else torch.zeros(len(keys), dtype=torch.long)
    noise = hits[rows - layout.table(n) * layout.buckets] - own
    return (noise <= noise_ratio * own).tolist()


def _write_size(table: _TableEntries, n: int, keys: list[bytes], winners: list[int], rows: torch.Tensor,
                quiet: list[bool] | None, g: _Grid, byte_units: torch.Tensor, stats: dict) -> None:
    """Claim the buckets of the n-byte ``keys`` (ranked) and write ``F(v) - S(key[1:])`` for every
    winner, against the realised sums."""
    won, lost, noisy = table.claim(rows, quiet)
    if "skipped_noisy" in stats:  # the noise filter is on
        stats["skipped_noisy"][n] = noisy
    stats["collisions"][n] = lost
    stats["written"][n] = len(won)
    if not won:
        return
    n_max = max(table.layout.sizes)
    won_ids = torch.tensor([winners[j] for j in won])
    s_units = table.suffix_sums([keys[j] for j in won], n, byte_units)
    lam_ids = g.lam[won_ids] if n == n_max else torch.full((len(won),), n, dtype=torch.long)
    table.add(rows[won], g.f_units(won_ids, lam_ids) - s_units, won_ids)
    if n == n_max:
        stats["long_tokens"]["written"] = int((g.lengths[won_ids] > n_max).sum())


# ---- 6. the projection ----------------------------------------------------------------------------
def _projection(u: torch.Tensor, basis: torch.Tensor, gain: float, spec) -> torch.Tensor:
    """``U B^T / (2 g)`` (D x d; content units -> U U^T e): bf16-representable with rows summing to
    zero when ``bf16_exact``."""
    projection = u @ basis.T / (2.0 * gain * 2.0 ** spec.unit_exponent)  # D x d, zero on the free coordinates
    if not spec.bf16_exact:
        return projection.to(torch.float32)
    c = projection.shape[1] - spec.free_dims
    out = torch.zeros(projection.shape, dtype=torch.float32)
    out[:, :c] = bf16_zero_sum_rows(projection[:, :c])
    return out


class SparseHashTable(torch.nn.Module):
    """The fused hash table of a :class:`WarmStart` as a module that ``compute_hash_embeddings``
    can call in place of the dense ``nn.Embedding`` (same values, no dense table): for measuring
    configurations whose table would not fit in memory."""

    def __init__(self, ws: WarmStart, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("rows", ws.rows.clone())
        self.register_buffer("entries", torch.cat([ws.entries, torch.zeros(1, ws.entries.shape[1])]).to(dtype))
        self.embedding_dim = ws.entries.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.rows, ids.reshape(-1)).clamp(max=max(len(self.rows) - 1, 0))
        hit = self.rows[pos] == ids.reshape(-1) if len(self.rows) else torch.zeros_like(ids.reshape(-1), dtype=torch.bool)
        pos = torch.where(hit, pos, torch.full_like(pos, len(self.rows)))
        return self.entries[pos].reshape(*ids.shape, self.embedding_dim)


def format_stats(stats: dict) -> str:
    """One line for ``byteify convert``."""
    written = stats.get("written", {})
    coll = sum(stats.get("collisions", {}).values())
    lt = stats.get("long_tokens", {})
    sp = stats.get("spelling")
    spelling = (f"; spelling: next-byte codes of rank {sp['rank']} (relative error {sp['relative_error']:.1e}), "
                "the decoder reads them from step 0" if sp else "")
    return (f"vocab warm start: {stats.get('entries', 0):,} hash-table entries (n={min(written, default='-')}.."
            f"{max(written, default='-')}), {coll:,} lost to collisions; {lt.get('count', 0):,} tokens longer than the "
            f"largest n ({lt.get('rule')}: {lt.get('written', 0):,} written); rank {stats.get('rank')} keeps "
            f"{100 * stats.get('energy_kept', 0):.1f}% of the {stats.get('frequencies')}-weighted embedding energy; "
            f"{'exact in bf16' if stats.get('exact_in_bf16') else 'not bf16-exact'}{spelling}; {stats.get('seconds', 0):.1f}s")


def longest_suffix_tokens(data: bytes, token_bytes: list[bytes | None], max_len: int | None = None) -> list[int]:
    """For each byte of ``data``, the id of the longest vocabulary token (at most ``max_len``
    bytes) that ends there, or -1 (reference for tests and diagnostics; quadratic in the token
    length, fine for short texts)."""
    by_string: dict[bytes, int] = {}
    for i, s in enumerate(token_bytes):
        if s:
            by_string.setdefault(s, i)
    longest = max(len(s) for s in by_string)
    if max_len is not None:
        longest = min(longest, max_len)
    out = []
    for t in range(len(data)):
        best = -1
        for n in range(min(longest, t + 1), 0, -1):
            tid = by_string.get(data[t - n + 1: t + 1])
            if tid is not None:
                best = tid
                break
        out.append(best)
    return out
