"""End-to-end distillation (``teacher_kl`` on a byte stage): the queries put every label byte of
a packed row under the teacher position and token that cover it, rows cut inside a UTF-8
character included; the targets equal the distillation stage's dense targets on the same
document; a stage with ``teacher_kl`` logs the KL and it falls as the stage trains."""

from __future__ import annotations

import math

import pytest
import torch

from byteify.data.streams import pack_rows, to_batch
from byteify.resolve import load_source_tokenizer
from byteify.tokenizer import OFFSET, token_byte_strings
from byteify.train.distill import AlignedWindows, ByteTrie, dense_queries
from byteify.train.recipe import load_recipe
from byteify.train.teacher import load_teacher
from byteify.train.teacher_kl import teacher_queries, teacher_targets, whole_characters
from byteify.errors import ByteifyError

from helpers import SHORT_DOCS as DOCS
from helpers import tiny_source_and_blt, train_tiny

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_source_and_blt(tmp_path_factory.mktemp("teacher_kl"), layers=2, seed=7)


def test_whole_characters_cuts_partial_utf8_at_both_ends():
    s = "é vu 😀".encode()
    assert whole_characters(s) == (0, len(s))
    assert whole_characters(s[1:]) == (1, len(s) - 1)  # leading continuation byte skipped
    assert whole_characters(s[:-2]) == (0, len(s) - 4)  # the cut emoji's 2 remaining bytes dropped


def test_queries_cover_every_label_byte_with_its_token(tiny):
    _, blt = tiny
    tok = load_source_tokenizer(blt)
    table = token_byte_strings(tok)
    rows = pack_rows(DOCS, seq_len=40)  # documents packed across rows: rows start mid-document
    batch = to_batch(rows)
    ids, labels = batch["input_ids"], batch["labels"]
    q = teacher_queries(ids, labels, tok, table, max_depth=32)
    assert len(q.b) > 150
    for b, t, at, token, d in zip(*(x.tolist() for x in (q.b, q.t, q.at, q.token, q.depth))):
        assert table[token][d] + OFFSET == int(labels[b, t])  # the byte is byte d of its token
        assert int(q.teacher_ids[0, at + 1]) == token and q.run[at] == q.run[at + 1]  # teacher position at predicts it
    # each run is the teacher's BOS then the run's tokens, positions restarting at 0
    starts = torch.nonzero(q.position_ids[0] == 0).flatten()
    assert torch.equal(q.teacher_ids[0, starts], torch.full_like(starts, tok.bos_token_id)) and len(starts) > len(rows)
    covered = set(zip(q.b.tolist(), q.t.tolist()))
    assert len(covered) == len(q.b)
    byte_labels = {(b, t) for b, t in zip(*torch.nonzero((labels >= OFFSET) & (labels < OFFSET + 256), as_tuple=True))}
    missing = {(int(b), int(t)) for b, t in byte_labels} - covered
    # only bytes of a character cut by a row's edge go without a target
    assert len(missing) <= 6 * len(rows)
    assert all(int(labels[b, t]) - OFFSET >= 0x80 for b, t in missing)


def test_targets_equal_the_distillation_stage_dense_targets(tiny):
    _, blt = tiny
    tok = load_source_tokenizer(blt)
    teacher = load_teacher(blt)
    trie = ByteTrie(token_byte_strings(tok))
    doc = DOCS[1]
    batch = to_batch(pack_rows([doc], seq_len=len(doc) + 4))  # [BOS] + doc + [EOS] in one row
    q = teacher_queries(batch["input_ids"], batch["labels"], tok, token_byte_strings(tok), trie.depth)
    mine = teacher_targets(teacher, trie, q, temperature=2.0)
    aligned = AlignedWindows([doc], tok, seq_len=len(doc) + 1).batch([0])
    b_idx, t_idx, at, token, depth = dense_queries(aligned)  # reference: the whole logits, then the trie
    logits = teacher(aligned.teacher_ids, use_cache=False).logits.flatten(0, 1)
    ref = trie.marginals((logits[at] / 2.0).softmax(-1), token, depth)
    assert q.t.tolist() == t_idx.tolist() and len(ref) == len(doc)  # same bytes, same order
    torch.testing.assert_close(mine, ref.float(), atol=1e-6, rtol=1e-5)
    assert torch.all(mine.gather(1, (batch["labels"][0, q.t] - OFFSET)[:, None]) > 0)


def test_head_chunks_give_the_same_targets_and_never_the_whole_logits(tiny, monkeypatch):
    """The teacher's head runs a chunk of positions at a time (HEAD_CHUNK logits), each chunk
    marginalised where it was computed: chunked targets equal one-chunk targets, no call of the
    head sees more than a chunk's positions, and without queries it is the plain head."""
    import byteify.train.teacher as teacher_mod

    _, blt = tiny
    tok = load_source_tokenizer(blt)
    teacher, trie = load_teacher(blt), ByteTrie(token_byte_strings(tok))
    batch = to_batch(pack_rows(DOCS, seq_len=64))
    q = teacher_queries(batch["input_ids"], batch["labels"], tok, token_byte_strings(tok), trie.depth)
    plain = teacher(q.teacher_ids, attention_mask=q.attention_mask(), position_ids=q.position_ids).logits
    whole = teacher_targets(teacher, trie, q, temperature=1.5)  # default chunk: every position at once
    vocab = teacher.config.vocab_size
    rows_seen = []
    head = teacher_mod.marginal_head(teacher).head
    hook = head.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    monkeypatch.setattr(teacher_mod, "HEAD_CHUNK", 5 * vocab)  # five positions per chunk
    chunked = teacher_targets(teacher, trie, q, temperature=1.5)
    hook.remove()
    n_used = len(torch.unique(q.at))
    assert max(rows_seen) == 5 and len(rows_seen) == -(-n_used // 5) and n_used > 20
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked.sum(-1), torch.ones(len(q.at)), atol=1e-5, rtol=0)
    after = teacher(q.teacher_ids, attention_mask=q.attention_mask(), position_ids=q.position_ids).logits
    assert after.shape == plain.shape and torch.equal(after, plain)  # the queries were cleared


def test_stage_with_teacher_kl_learns_the_teacher(tiny, tmp_path):
    _, blt = tiny
    _, rows = train_tiny(blt, tmp_path / "run", "[{name: kd, train: [local_encoder, hash_embeddings, local_decoder, "
                         "global], teacher_kl: {weight: 0.5}, steps: 8, batch_bytes: 256, lr: 3e-3}]", 8)
    assert all(r["teacher_kl"] > 0 and math.isfinite(r["teacher_kl"]) for r in rows)
    assert sum(r["teacher_kl"] for r in rows[-3:]) < sum(r["teacher_kl"] for r in rows[:3])
    assert "val_bpb" in rows[-1]


def test_teacher_kl_is_refused_where_it_cannot_apply():
    with pytest.raises(ByteifyError, match="teacher_kl"):
        load_recipe("tiny-cpu", ["stages.0.train=[local_decoder]", "stages.0.distill={}", "stages.0.teacher_kl={}"])
    with pytest.raises(ByteifyError, match="teacher_kl"):
        load_recipe("tiny-cpu", ["stages.0.train=[entropy_model]", "stages.0.teacher_kl={}"])
