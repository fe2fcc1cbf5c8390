"""The vocabulary warm start (``vocab_warm_start`` in a convert preset): the telescoped hash
tables give, at every byte, exactly the vector of the longest vocabulary token ending there
(transformers' own ``compute_hash_embeddings``); amax selects the patch's last byte on
token-aligned patches; the projection recovers the rank-r source embeddings; collisions go to
the most frequent writer; everything is reproducible from the seed and exact in bf16.

All on a tiny random Llama (hidden 64) with a 600-token byte-level BPE trained on the corpus;
encoder width 32 x k=2, n-gram sizes 2..8."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from byteify.cli import app
from byteify.convert.presets import load_spec
from byteify.convert.sources import open_source
from byteify.convert.transplant import build_blt_config
from byteify.convert.warmstart import SparseHashTable, longest_suffix_tokens, plan_warm_start
from byteify.parts import HASH_TABLE
from byteify.tokenizer import BOS_ID, OFFSET, token_byte_strings
from helpers import make_hf_source
from patching_helpers import corpus_texts, make_source_tokenizer, one_thread

SIZES = "hash.ngram_sizes=[2,3,4,5,6,7,8]"
# (noise_ratio off: its bucket traffic needs the stdlib part of the corpus, ~10 s to parse; tested apart)
WARM = ["vocab_warm_start.enabled=true", SIZES, "hash.vocab_size=8192", "vocab_warm_start.noise_ratio=null"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(source dir, tokenizer, embeddings [V, 64], synthetic token counts)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("warm")
    src = make_hf_source(root / "src", layers=1, heads=4, kv_heads=2, vocab=600)
    make_source_tokenizer(src)
    tok = AutoTokenizer.from_pretrained(str(src))
    emb = open_source(src).read("model.embed_tokens.weight")
    counts = torch.zeros(emb.shape[0], dtype=torch.float64)
    ids = tok(corpus_texts(20), add_special_tokens=False)["input_ids"]
    for row in ids:
        counts += torch.bincount(torch.tensor(row), minlength=emb.shape[0]).double()
    return SimpleNamespace(src=src, tok=tok, emb=emb, counts=counts, root=root)


def plan(setup, overrides=(), seed=0, counts="synthetic"):
    spec = load_spec("tiny", [*WARM, *overrides])
    config, resolved = build_blt_config(open_source(setup.src), spec)
    ws = plan_warm_start(config, resolved.vocab_warm_start, setup.tok, lambda: iter(setup.emb.split(100)), seed=seed,
                         counts=setup.counts if counts == "synthetic" else counts, keep_token_vectors=True)
    return config, ws


def held_out_text(n: int = 3000) -> bytes:
    return "\n\n".join(corpus_texts(5, offset=64)).encode("utf-8")[:n]


def hash_sums(config, ws, data: bytes, dtype=torch.float32):
    """The stock embedding sum at each byte of [BOS] + data: transformers' compute_hash_embeddings
    with the planned byte embeddings and (dense) hash table."""
    from transformers.models.blt.modeling_blt import compute_hash_embeddings

    ids = torch.tensor([[BOS_ID] + [b + OFFSET for b in data]])
    enc = SimpleNamespace(embed_tokens=torch.nn.Embedding.from_pretrained(ws.byte_embeddings.to(dtype)))
    total = config.encoder_hash_byte_group_nb_functions * len(config.encoder_hash_byte_group_size) * \
        config.encoder_hash_byte_group_vocab
    table = torch.nn.Embedding.from_pretrained(ws.dense_table(total, dtype))
    return ids, compute_hash_embeddings(ids, enc, table, config.encoder_hash_byte_group_nb_functions,
                                        config.encoder_hash_byte_group_size, config.encoder_hash_byte_group_vocab)[0]


def ngram_rows(config, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """n -> the fused-table row of the n-gram ending at each position (transformers' hash)."""
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    B = config.encoder_hash_byte_group_vocab
    return {n: byte_group_hash_function(ids, n, 1000000007, B)[0] + i * B
            for i, n in enumerate(config.encoder_hash_byte_group_size)}


def clean_positions(config, ws, ids, longest, token_bytes):
    """Positions (in ids) whose longest token owns its bucket and whose longer n-grams hit empty
    buckets: where the telescoping identity must hold exactly."""
    rows = ngram_rows(config, ids)
    occupied = set(ws.rows.tolist())
    owner = dict(zip(ws.rows.tolist(), ws.owners.tolist()))
    out = []
    for t in range(1, ids.shape[1]):
        v = longest[t - 1]
        if v < 0:
            continue
        n_v = len(token_bytes[v])
        if n_v > 1 and owner.get(int(rows[n_v][t])) != v:
            continue
        if all(int(rows[n][t]) not in occupied for n in rows if n > n_v):
            out.append(t)
    return out


def test_telescoping_identity_is_exact(setup):
    """At every clean byte, the stock sum (byte embedding + every n-gram bucket) equals F of the
    longest vocabulary token ending there, bit for bit, and the written tables hold no collision."""
    config, ws = plan(setup)
    assert sum(ws.stats["collisions"].values()) == 0 and ws.stats["exact_in_bf16"]
    tb = token_byte_strings(setup.tok)
    data = held_out_text()
    longest = longest_suffix_tokens(data, tb, max_len=8)
    ids, sums = hash_sums(config, ws, data)
    clean = clean_positions(config, ws, ids, longest, tb)
    assert len(clean) > 0.9 * len(data), (len(clean), len(data))
    lengths = {len(tb[longest[t - 1]]) for t in clean}
    assert {1, 2, 3, 5, 8} <= lengths  # bytes, 2-byte tokens (n = 2) and up to the largest n
    expected = ws.token_vectors[torch.tensor([longest[t - 1] for t in clean])]
    assert torch.equal(sums[clean], expected)
    # the BOS position reads the BOS byte embedding alone (its n-gram buckets are reserved, zero)
    assert torch.equal(sums[0], ws.byte_embeddings[BOS_ID])


def test_long_tokens_suffix_rule_and_drop(setup):
    """A token longer than the largest n is read at its last byte through the bucket of its last
    8 bytes (the most frequent token of a shared suffix wins); ``drop`` leaves the longest token
    of at most 8 bytes there."""
    tb = token_byte_strings(setup.tok)
    long_ids = [i for i, s in enumerate(tb) if s and len(s) > 8]
    assert len(long_ids) >= 5
    config, ws = plan(setup)
    owner = dict(zip(ws.rows.tolist(), ws.owners.tolist()))
    assert ws.stats["long_tokens"]["written"] >= 5
    checked = 0
    for v in long_ids:
        data = b"\n" + tb[v]
        ids, sums = hash_sums(config, ws, data)
        rows = ngram_rows(config, ids)
        if owner.get(int(rows[8][-1])) != v:
            continue  # its suffix went to a more frequent token (or a real 8-byte token)
        assert torch.equal(sums[-1], ws.token_vectors[v])
        checked += 1
    assert checked >= 5
    config_d, ws_d = plan(setup, ["vocab_warm_start.long_tokens=drop"])
    assert ws_d.stats["long_tokens"]["written"] == 0
    v = long_ids[0]
    data = b"\n" + tb[v]
    ids, sums = hash_sums(config_d, ws_d, data)
    short = longest_suffix_tokens(data, tb, max_len=8)[-1]
    assert torch.equal(sums[-1], ws_d.token_vectors[short])


def test_projection_recovers_rank_r_embeddings(setup):
    """2 W_pe F(v) = U U^T e_v (U: the top-r right-singular vectors, computed here independently),
    within 10% relative RMS error on the bf16 grid (content rounded to ~1/14 of 4 std) and 1% in
    float mode (only the 4-std clipping); the offset of any length cancels."""
    uniform = ["vocab_warm_start.frequencies=uniform"]
    for overrides, tol in ((uniform, 0.10), (uniform + ["vocab_warm_start.bf16_exact=false"], 0.01)):
        config, ws = plan(setup, overrides, counts=None)
        r = ws.stats["rank"]
        assert r == config.encoder_config.hidden_size - 1
        tb = token_byte_strings(setup.tok)
        ids = torch.tensor([i for i, s in enumerate(tb) if s])
        _, _, vh = torch.linalg.svd(setup.emb.double(), full_matrices=False)
        u = vh[:r].T
        target = (setup.emb.double()[ids] @ u @ u.T).float()
        got = 2 * ws.token_vectors[ids] @ ws.projection.T
        rel = ((got - target).norm(dim=1) / target.norm(dim=1)).pow(2).mean().sqrt()
        assert rel < tol, (overrides, float(rel))
        ones = torch.ones(config.encoder_config.hidden_size)
        proj = ws.projection.double()  # rows sum to zero, relative to their size (float32 rounding)
        assert float(((proj @ ones.double()).abs() / proj.abs().sum(1)).max()) < 1e-6


def test_collisions_go_to_the_most_frequent_writer(setup):
    """With 64 buckets per size most strings collide: every row holds the writer of its size with
    the highest count (then the lowest id), and the losers are counted."""
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    config, ws = plan(setup, ["hash.vocab_size=64", "vocab_warm_start.long_tokens=drop"])
    tb = token_byte_strings(setup.tok)
    owner = dict(zip(ws.rows.tolist(), ws.owners.tolist()))
    lost = 0
    for i, n in enumerate(config.encoder_hash_byte_group_size):
        members = [v for v, s in enumerate(tb) if s and len(s) == n]
        ids = torch.tensor([[b + OFFSET for b in tb[v]] for v in members])
        rows = (byte_group_hash_function(ids, n, 1000000007, 64)[:, -1] + i * 64).tolist()
        bos_row = int(byte_group_hash_function(torch.tensor([[0] * (n - 1) + [BOS_ID]]), n, 1000000007, 64)[0, -1]) + i * 64
        by_row: dict[int, list[int]] = {}
        for v, row in zip(members, rows):
            by_row.setdefault(row, []).append(v)
        for row, vs in by_row.items():
            if row == bos_row:
                assert owner[row] == -1  # reserved for the BOS patch
                lost += len(vs)
                continue
            best = min(vs, key=lambda v: (-float(setup.counts[v]), v))
            assert owner[row] == best, (n, row, vs)
            lost += len(vs) - 1
    assert sum(ws.stats["collisions"].values()) == lost > 100


def test_reproducible_from_the_seed(setup):
    _, a = plan(setup, seed=3)
    _, b = plan(setup, seed=3)
    _, c = plan(setup, seed=4)
    for x in ("byte_embeddings", "rows", "entries", "projection"):
        assert torch.equal(getattr(a, x), getattr(b, x))
    assert torch.equal(a.rows, c.rows) and not torch.equal(a.projection, c.projection)  # the rotation B


def test_bf16_is_exact_on_the_grid(setup):
    """On the grid every byte embedding, entry and partial sum is exact in bf16: the stock sums in
    bf16 equal fp32's bit for bit, and the projection (bf16 weights, rows summing to zero) keeps
    the patch vectors within bf16 rounding, while the same warm start off the grid loses the
    content under the offsets."""
    tb = token_byte_strings(setup.tok)
    data = held_out_text(1500)
    longest = longest_suffix_tokens(data, tb, max_len=8)
    errs = {}
    for exact in (True, False):
        config, ws = plan(setup, [f"vocab_warm_start.bf16_exact={str(exact).lower()}"])
        ids, s32 = hash_sums(config, ws, data, torch.float32)
        _, s16 = hash_sums(config, ws, data, torch.bfloat16)
        pos = torch.tensor(clean_positions(config, ws, ids, longest, tb))
        assert len(pos) > 0.9 * len(data)
        if exact:
            assert torch.equal(s16[pos].float(), s32[pos])
        ref = 2 * s32[pos].double() @ ws.projection.double().T
        got = 2 * (s16[pos] @ ws.projection.to(torch.bfloat16).T).double()
        errs[exact] = float(((got - ref).norm(dim=1) / ref.norm(dim=1)).median())
    assert errs[True] < 0.02 and errs[False] > 2 * errs[True], errs



def test_grid_step_scales_the_tables_not_the_patch_vectors(setup):
    """``unit_exponent`` -11 instead of -6: every byte embedding and table entry exactly 1/32 of
    the default's, the projection 32x (to bf16 rounding), the stock sums in bf16 still exact, and
    the patch vectors the global reads the same within bf16 rounding of the projection."""
    config, a = plan(setup, ["vocab_warm_start.unit_exponent=-6"])
    _, b = plan(setup)  # the default, -11
    assert a.stats["unit"] == 2.0 ** -6 and b.stats["unit"] == 2.0 ** -11
    assert torch.equal(b.byte_embeddings * 32, a.byte_embeddings) and torch.equal(b.entries * 32, a.entries)
    assert torch.equal(a.rows, b.rows)
    assert torch.allclose(b.projection, 32 * a.projection, rtol=2 ** -8, atol=0)
    data = held_out_text(1500)
    _, sa = hash_sums(config, a, data, torch.float32)
    _, sb16 = hash_sums(config, b, data, torch.bfloat16)
    assert torch.equal(sb16.float() * 32, sa)
    va = sa.double() @ a.projection.double().T
    vb = (sb16 @ b.projection.to(torch.bfloat16).T).double()
    rel = float(((vb - va).norm(dim=1) / va.norm(dim=1)).median())
    assert rel < 0.02, rel



def test_free_dims_hold_random_ngram_codes_the_projection_ignores(setup):
    """``free_dims`` f: the content and offsets live in the first width - f coordinates (rank
    width - f - 1, still recovered within 10%), the telescoping identity holds there bit for bit,
    the projection is exactly zero on the last f, and those hold random codes of the byte and its
    n-grams at the fresh init's scale (1/sqrt(width) per table), different for different n-grams."""
    f = 16
    config, ws = plan(setup, [f"vocab_warm_start.free_dims={f}", "vocab_warm_start.frequencies=uniform"], counts=None)
    d = config.encoder_config.hidden_size
    c = d - f
    assert ws.stats["rank"] == c - 1 and ws.stats["free_dims"] == f
    assert torch.equal(ws.projection[:, c:], torch.zeros(ws.projection.shape[0], f))
    assert float(ws.projection[:, :c].double().sum(1).abs().max()) < 1e-6
    tb = token_byte_strings(setup.tok)
    data = held_out_text()
    longest = longest_suffix_tokens(data, tb, max_len=8)
    ids, sums = hash_sums(config, ws, data)
    clean = clean_positions(config, ws, ids, longest, tb)
    assert len(clean) > 0.9 * len(data)
    expected = ws.token_vectors[torch.tensor([longest[t - 1] for t in clean])]
    assert torch.equal(sums[clean][:, :c], expected[:, :c])
    codes = sums[1:, c:]
    n_terms = 1 + len(config.encoder_hash_byte_group_size)
    assert abs(float(codes.std()) / (n_terms ** 0.5 * d ** -0.5) - 1) < 0.2
    trigrams = {}
    for t in range(3, ids.shape[1]):
        trigrams.setdefault(tuple(ids[0, t - 2:t + 1].tolist()), t)
    firsts = torch.tensor(sorted(trigrams.values()))
    assert torch.unique(sums[firsts, c:], dim=0).shape[0] == len(firsts)
    ids_tok = torch.tensor([i for i, s in enumerate(tb) if s])
    _, _, vh = torch.linalg.svd(setup.emb.double(), full_matrices=False)
    u = vh[:c - 1].T
    target = (setup.emb.double()[ids_tok] @ u @ u.T).float()
    got = 2 * ws.token_vectors[ids_tok] @ ws.projection.T
    assert float(((got - target).norm(dim=1) / target.norm(dim=1)).pow(2).mean().sqrt()) < 0.10


# ---- through byteify convert ------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(setup):
    """``byteify convert --preset tiny`` with the warm start, fp32 and bf16 (CLI), and the plan."""
    runner = CliRunner()
    outs = {}
    with pytest.MonkeyPatch.context() as mp:  # the corpus counts, without parsing the stdlib (~10 s)
        mp.setattr("byteify.convert.warmstart.token_counts", lambda tok, vocab, documents=None: setup.counts.clone())
        for dtype in ("fp32", "bf16"):
            out = setup.root / f"blt-{dtype}"
            args = ["convert", str(setup.src), str(out), "--preset", "tiny", "--seed", "5", "--dtype", dtype, "--no-verify"]
            for o in WARM:
                args += ["--set", o]
            r = runner.invoke(app, args)
            assert r.exit_code == 0, r.stdout + r.stderr
            assert "vocab warm start: " in r.stdout and "exact in bf16" in r.stdout
            outs[dtype] = out
    return outs


@pytest.fixture(scope="module")
def corpus_plan(setup):
    """The plan ``converted`` made: seed 5, the (stand-in) corpus counts."""
    return plan(setup, seed=5)


def test_token_counts(setup):
    from byteify.convert.warmstart import token_counts

    docs = [b"the cat and the hat", "caf\u00e9 \u2014 the end".encode()]
    counts = token_counts(setup.tok, setup.emb.shape[0], documents=docs)
    expected = torch.zeros_like(counts)
    for d in docs:
        for i in setup.tok(d.decode(), add_special_tokens=False)["input_ids"]:
            expected[i] += 1
    assert torch.equal(counts, expected) and counts.sum() > 5


def test_convert_writes_the_plan(setup, converted, corpus_plan):
    """The converted directory holds exactly the planned tables and projection (corpus counts,
    seed 5), zeros where the encoder is an identity, and the statistics in byteify.json."""
    _, ws = corpus_plan
    out = converted["fp32"]
    meta = json.loads((out / "byteify.json").read_text())
    assert meta["vocab_warm_start"]["entries"] == ws.stats["entries"]
    assert meta["architecture_spec"]["vocab_warm_start"]["enabled"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        total = f.get_slice(HASH_TABLE).get_shape()[0]
        assert torch.equal(f.get_tensor(HASH_TABLE), ws.dense_table(total))
        assert torch.equal(f.get_tensor("model.local_encoder.embed_tokens.weight"), ws.byte_embeddings)
        assert torch.equal(f.get_tensor("model.local_encoder.patch_embedding_projection.weight"), ws.projection)
        for name in ws.zeroed:
            assert not f.get_tensor(name).any(), name
        assert f.get_tensor("model.local_encoder.layers.0.self_attn.q_proj.weight").std() > 0


def test_decoder_ignores_offset_centres_the_decoder_readers(setup):
    """``decoder_ignores_offset``: every weight that reads the decoder's residual stream has rows
    summing to zero (blind to the all-ones direction of the length offsets) and otherwise equals
    the drawn weight minus its row mean; the writers stay as drawn.  Off by default."""
    from byteify.convert.fresh import fresh_parts

    assert plan(setup)[1].centred == []
    config, ws = plan(setup, ["vocab_warm_start.decoder_ignores_offset=true"])
    assert "lm_head.weight" in ws.centred and "model.local_decoder.layers.0.mlp.up_proj.weight" in ws.centred
    drawn = {n: next(c) for n, _, c in fresh_parts(config, 0) if n.startswith(("model.local_decoder", "lm_head"))}
    blind = {n: next(c) for n, _, c in fresh_parts(config, 0, warm=ws) if n in drawn}
    for name in ws.centred:
        w = blind[name]
        assert w.sum(1).abs().max() < 1e-4 * w.abs().sum(1).max(), name
        assert torch.allclose(w, drawn[name] - drawn[name].mean(1, keepdim=True)), name
    writer = "model.local_decoder.layers.0.self_attn.o_proj.weight"
    assert torch.equal(blind[writer], drawn[writer]) and drawn[writer].sum(1).abs().max() > 1e-3


def test_amax_selects_the_last_byte_of_token_aligned_patches(setup, converted, corpus_plan):
    """Stock forward of the converted model on source-token-aligned windows: each patch vector is
    2 W_pe F(w), w the longest token ending at the patch's last byte, wherever that byte has the
    unique longest suffix token of its patch and the patch's bytes are clean; in bf16 too, within
    bf16 rounding."""
    from byteify.evaluate import encoder_patch_vectors
    from byteify.resolve import load_blt
    from byteify.train.aligned import AlignedWindows

    config, ws = corpus_plan
    tb = token_byte_strings(setup.tok)
    aligned = AlignedWindows([held_out_text(1200)], setup.tok, 256)
    batch = aligned.batch(range(len(aligned)))
    lam = lambda v: 9 if len(tb[v]) > 8 else len(tb[v])  # noqa: E731 - length offsets (suffix rule)
    results = {}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        _, model = load_blt(converted[dtype], torch_dtype)
        with one_thread(), torch.no_grad():
            vectors = encoder_patch_vectors(model, batch.input_ids, batch.patch_lengths).double()
        proj = model.model.local_encoder.patch_embedding_projection.weight.detach().double()
        checked = total = 0
        for r in range(batch.input_ids.shape[0]):
            n = int((batch.input_ids[r] >= OFFSET).sum())
            data = bytes(int(x) - OFFSET for x in batch.input_ids[r, 1:n + 1])
            longest = longest_suffix_tokens(data, tb)
            ids = batch.input_ids[r:r + 1, :n + 1]
            clean = set(clean_positions(config, ws, ids, [v if v < 0 or len(tb[v]) <= 8 else -1 for v in longest], tb))
            start = 1
            lengths = [x for x in batch.patch_lengths[r, 1:].tolist() if x > 0]
            for p, length in enumerate(lengths[:-1], start=1):  # the last patch also holds the next position
                end = start + length - 1
                total += 1
                lams = [lam(longest[t - 1]) if longest[t - 1] >= 0 else 0 for t in range(start, end + 1)]
                unique = lams[-1] > max(lams[:-1], default=-1)
                if unique and all(t in clean for t in range(start, end + 1)):
                    expected = 2 * proj @ ws.token_vectors[longest[end - 1]].double()
                    err = float((vectors[r, p] - expected).norm() / expected.norm())
                    assert err < (1e-6 if dtype == "fp32" else 1e-2), (dtype, p, err)
                    checked += 1
                start += length
        results[dtype] = (checked, total)
    assert results["fp32"][0] > 0.6 * results["fp32"][1], results


def test_sparse_table_matches_dense(setup):
    config, ws = plan(setup)
    total = len(config.encoder_hash_byte_group_size) * config.encoder_hash_byte_group_vocab
    dense = ws.dense_table(total)
    ids = torch.randint(0, total, (3, 50))
    ids[0, :5] = ws.rows[:5]
    assert torch.equal(SparseHashTable(ws)(ids), dense[ids])


def test_preset_and_errors(setup, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(setup.src), str(tmp_path / "x"), "--preset", "tiny",
                            "--set", "vocab_warm_start.ofset=2"])
    assert r.exit_code == 2 and "did you mean 'vocab_warm_start.offset'" in r.stderr
    spec = load_spec("warm")
    assert spec.vocab_warm_start.enabled and 2 in spec.hash.ngram_sizes and spec.hash.vocab_size
    config, _ = build_blt_config(open_source(setup.src), spec)
    assert config.encoder_config.hidden_size == config.decoder_config.hidden_size == 64  # k = 1
    # warm-16k (16,384 buckets) with 128 coordinates free, nothing else different; the shipped
    # conversion is that at 65,536 buckets (the decisive table's row 2qw64 conversion)
    assert load_spec("warm-kept") == load_spec("warm-16k", ["vocab_warm_start.free_dims=128"]) != load_spec("warm-16k")
    assert load_spec("warm-kept-64k") == load_spec("warm-kept", ["hash.vocab_size=65536"]) != load_spec("warm-kept")
    assert load_spec("warm-spell-64k") == load_spec("warm-kept-64k", ["vocab_warm_start.spelling=true"]) != load_spec("warm-kept-64k")
    assert load_spec("warm-kept-64k") == load_spec("warm", ["vocab_warm_start.unit_exponent=-11", "hash.vocab_size=65536",
                                                      "vocab_warm_start.free_dims=128"])  # the benchmark's
    assert load_spec("warm-16k") == load_spec("warm", ["hash.vocab_size=16384"])
    r = runner.invoke(app, ["convert", str(setup.src), str(tmp_path / "w"), "--preset", "tiny", "--no-verify",
                            "--set", "decoder.hidden_size=64"])
    assert r.exit_code == 2 and "equally wide" in r.stderr
    r = runner.invoke(app, ["convert", str(setup.src), str(tmp_path / "y"), "--preset", "tiny", "--no-verify",
                            "--set", "vocab_warm_start.enabled=true", "--set", "encoder.hidden_size=16",
                            "--set", "decoder.hidden_size=16"])
    assert r.exit_code == 2 and "cross_attn_k" in r.stderr
    bare = make_hf_source(tmp_path / "bare", layers=1, vocab=96)  # no tokenizer
    r = runner.invoke(app, ["convert", str(bare), str(tmp_path / "z"), "--preset", "tiny", "--no-verify",
                            "--set", "vocab_warm_start.enabled=true"])
    assert r.exit_code == 2 and "tokenizer" in r.stderr


def test_noise_ratio_leaves_busy_buckets_empty(setup):
    """``noise_ratio``: a token is written only where the corpus's other n-grams that land in its
    bucket occur at most ratio x as often as the token's own string (counted here independently)."""
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    docs = [t.encode() for t in corpus_texts(6, offset=64)]
    spec = load_spec("tiny", [*WARM, "hash.vocab_size=512", "vocab_warm_start.noise_ratio=0.5"])
    config, resolved = build_blt_config(open_source(setup.src), spec)
    ws = plan_warm_start(config, resolved.vocab_warm_start, setup.tok, lambda: iter(setup.emb.split(100)),
                         counts=setup.counts, documents=docs)
    assert sum(ws.stats["skipped_noisy"].values()) > 50
    tb = token_byte_strings(setup.tok)
    B, sizes = 512, config.encoder_hash_byte_group_size
    hits = {n: torch.zeros(B, dtype=torch.long) for n in sizes}
    framed = [bytes([0] * 7) + b"\x01" + d for d in docs]  # stand-ins for left padding and BOS
    for d in docs:
        ids = torch.tensor([[BOS_ID] + [x + OFFSET for x in d]])
        for n in sizes:
            hits[n] += torch.bincount(byte_group_hash_function(ids, n, 1000000007, B)[0], minlength=B)
    for row, v in zip(ws.rows.tolist(), ws.owners.tolist()):
        if v < 0:
            continue
        table, bucket = divmod(row, B)
        n = sizes[table]
        key = tb[v] if len(tb[v]) == n else tb[v][-n:]
        own = sum(1 for f in framed for i in range(len(f) - n + 1) if f[i:i + n] == key)  # overlapping too
        assert hits[n][bucket] - own <= 0.5 * own, (tb[v], int(hits[n][bucket]), own)


# ---- the spelling warm start (vocab_warm_start.spelling) ---------------------------------------
def test_next_byte_logprobs_of_a_toy_vocabulary():
    """P(b | s): the tokens extending s by b, plus s's own weight times the next token's first-byte
    distribution, normalised, 1% uniform mixed in (weights a:1, b:2, ab:3, abc:4, bb:5)."""
    from byteify.convert.spelling import UNIFORM_SHARE, next_byte_logprobs

    vocab = [b"a", b"b", b"ab", b"abc", b"bb", None]
    lp = next_byte_logprobs(vocab, torch.tensor([1.0, 2, 3, 4, 5, 0], dtype=torch.float64))
    p = lp.exp()
    first = torch.zeros(256, dtype=torch.float64)
    first[ord("a")], first[ord("b")] = 8 / 15, 7 / 15  # a, ab, abc | b, bb
    expected_ab = 3 / 7 * first
    expected_ab[ord("c")] += 4 / 7
    mix = lambda q: (1 - UNIFORM_SHARE) * q + UNIFORM_SHARE / 256  # noqa: E731
    torch.testing.assert_close(p[2], mix(expected_ab))
    expected_a = 1 / 8 * first
    expected_a[ord("b")] += 7 / 8  # ab and abc
    torch.testing.assert_close(p[0], mix(expected_a))
    assert torch.allclose(p[:5].sum(1), torch.ones(5, dtype=torch.float64)) and float(lp[5].abs().sum()) == 0  # no bytes: a zero row


@pytest.fixture(scope="module")
def spelled(setup):
    """``byteify convert --preset tiny`` with the warm start, 16 free coordinates and spelling."""
    out = setup.root / "blt-spelling"
    args = ["convert", str(setup.src), str(out), "--preset", "tiny", "--seed", "5", "--no-verify"]
    for o in [*WARM, "vocab_warm_start.free_dims=16", "vocab_warm_start.spelling=true"]:
        args += ["--set", o]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("byteify.convert.warmstart.token_counts", lambda tok, vocab, documents=None: setup.counts.clone())
        r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "spelling: next-byte codes of rank 15" in r.stdout
    return out


def test_spelling_codes_are_telescoped_and_read_by_the_decoder_at_step_0(setup, spelled, converted):
    """The free coordinates of the stock embedding sum hold the code of the longest written token
    ending there (within fp32 summation, 1e-4) and the constant KAPPA; the written coordinates are
    unchanged (bit for bit); the converted decoder is an identity whose next-byte logits are
    ``head @ code`` (within 5%: the final RMSNorm's scale is KAPPA's up to the rest of the state);
    so the converted model predicts held-out bytes at step 0 far better than uniform."""
    from byteify.convert import spelling
    from byteify.evaluate import evaluate_blt
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt

    f = 16
    config, ws = plan(setup, [f"vocab_warm_start.free_dims={f}", "vocab_warm_start.spelling=true"], seed=5)
    _, plain = plan(setup, [f"vocab_warm_start.free_dims={f}"], seed=5)
    d = config.encoder_config.hidden_size
    tb = token_byte_strings(setup.tok)
    w = torch.zeros(len(tb), dtype=torch.float64)
    w[:len(setup.counts)] = setup.counts[:len(tb)] + 1
    w[torch.tensor([not b for b in tb])] = 0
    codes, head, stats = spelling.spelling_codes(spelling.next_byte_logprobs(tb, w), w, f - 1)
    assert stats == ws.stats["spelling"]
    data = held_out_text()
    longest = longest_suffix_tokens(data, tb, max_len=8)
    ids, sums = hash_sums(config, ws, data)
    _, plain_sums = hash_sums(config, plain, data)
    clean = clean_positions(config, ws, ids, longest, tb)
    assert len(clean) > 0.9 * len(data)
    expected = codes[torch.tensor([longest[t - 1] for t in clean])]
    assert float((sums[clean][:, d - f:d - 1] - expected).abs().max()) < 1e-4
    assert torch.equal(sums[:, d - 1], torch.full((ids.shape[1],), spelling.KAPPA))
    assert torch.equal(sums[:, :d - f], plain_sums[:, :d - f])  # the token vectors and offsets as without spelling

    _, model = load_blt(spelled, torch.float32)
    sd = model.state_dict()
    assert float(sd["model.local_decoder.layers.0.mlp.down_proj.weight"].abs().max()) == 0
    assert float(sd["model.local_decoder.cross_attn_layers.0.o_proj.weight"].abs().max()) == 0
    static = torch.full((1, (ids.shape[1] + 3) // 4), 4)
    static[0, -1] = ids.shape[1] - 4 * (static.shape[1] - 1)
    with one_thread(), torch.no_grad():
        logits = model(input_ids=ids, patch_lengths=static, use_cache=False).logits[0, :, OFFSET:OFFSET + 256]
    want = expected @ head.T
    got = logits[clean]
    centred = lambda x: x - x.mean(1, keepdim=True)  # noqa: E731
    err = (centred(got) - centred(want)).abs().max(1).values / centred(want).abs().max(1).values
    assert float(err.max()) < 0.05, float(err.max())
    docs = [held_out_text(2000)]
    with one_thread():
        bpb = evaluate_blt(model, docs, build_patcher(PatchingSpec(mode="static", patch_size=4), model)).bits_per_byte
        _, fresh = load_blt(converted["fp32"], torch.float32)
        fresh_bpb = evaluate_blt(fresh, docs, build_patcher(PatchingSpec(mode="static", patch_size=4), fresh)).bits_per_byte
    assert bpb < 0.6 * fresh_bpb and fresh_bpb > 7.5, (bpb, fresh_bpb)


def test_spelling_needs_free_coordinates_and_its_own_decoder_head(setup):
    from byteify.errors import ByteifyError

    with pytest.raises(ByteifyError, match=r"vocab_warm_start.spelling: needs free_dims >= 2"):
        plan(setup, ["vocab_warm_start.spelling=true"])
    with pytest.raises(ByteifyError, match=r"decoder_ignores_offset would centre it"):
        plan(setup, ["vocab_warm_start.spelling=true", "vocab_warm_start.free_dims=16",
                     "vocab_warm_start.decoder_ignores_offset=true"])
