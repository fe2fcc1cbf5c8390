"""byteify.data: sources, framing, packing, held-out split, deterministic/resumable/rank-sliced batches."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch

from byteify.data.packing import (
    IGNORE_INDEX,
    ByteBatches,
    SourceSpec,
    build_datasets,
    describe,
    frame_documents,
    load_documents,
    pack,
    split_documents,
)
from byteify.errors import ByteifyError
from byteify.tokenizer import BOE_ID, BOS_ID, EOS_ID, decode_bytes

WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda omicron sigma omega".split()


def _docs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    """n distinct documents: each starts with a unique tag, so any one can be found by content."""
    rng = random.Random(seed)
    return [f"doc-{i:05d}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "." for i in range(n)]


def _write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({field: d, "id": 1}) + "\n")
    return path


def _stream(ds) -> np.ndarray:
    """A dataset's rows glued back into its id stream (rows are consecutive chunks per source)."""
    return np.concatenate([s.rows.reshape(-1) for s in ds.sources])


def _documents_in(ds) -> list[bytes]:
    """The documents of a split recovered from its ids: the bytes between BOS and EOS."""
    docs = []
    for s in ds.sources:
        ids = s.rows.reshape(-1)
        starts, ends = np.flatnonzero(ids == BOS_ID), np.flatnonzero(ids == EOS_ID)
        if len(starts) == len(ends) + 1:  # the final EOS fell alone into a dropped 1-id tail
            ends = np.append(ends, len(ids) - int((ids[::-1] == BOE_ID).argmin()))
        assert len(starts) == len(ends) and (starts < ends).all()
        docs += [decode_bytes(ids[a + 1: b]) for a, b in zip(starts.tolist(), ends.tolist())]
    return docs


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def _same(a, b) -> bool:
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


# -- formats ------------------------------------------------------------------------------------


def test_txt_bytes_framed_exactly_and_invalid_utf8_survives(tmp_path):
    raw = b"caf\xc3\xa9 \xff\xfe\x80 end\n"  # valid UTF-8, then bytes that are not UTF-8 at all
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "b.txt").write_bytes(b"second")
    train, val = build_datasets([SourceSpec(path=str(tmp_path))], seq_len=63, val_fraction=0.0, seed=0)
    assert val.num_sequences == 0 and train.documents == 2 and train.num_bytes == len(raw) + 6
    stream = _stream(train)
    expected = [BOS_ID] + [b + 4 for b in raw] + [EOS_ID, BOS_ID] + [b + 4 for b in b"second"] + [EOS_ID]
    assert stream[: len(expected)].tolist() == expected
    assert stream[len(expected):].tolist() == [BOE_ID] * (64 - len(expected))  # padded, not dropped
    assert 0xFF + 4 in stream.tolist() and 0x80 + 4 in stream.tolist()


def test_frame_and_pack_shapes():
    stream = frame_documents([b"ab", b"c"])
    assert stream.dtype == np.uint16 and stream.tolist() == [1, 97 + 4, 98 + 4, 2, 1, 99 + 4, 2]
    assert pack(stream, seq_len=3).tolist() == [[1, 101, 102, 2], [1, 103, 2, 0]]  # tail padded with BOE
    assert pack(stream[:6], seq_len=2).tolist() == [[1, 101, 102], [2, 1, 103]]  # nothing left over
    assert pack(stream, seq_len=2).tolist() == [[1, 101, 102], [2, 1, 103]]  # 1-id tail: no target, dropped


def test_jsonl_field_unicode_surrogates_and_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": "héllo ✓"}), "", "   ", json.dumps({"body": "lone \ud800 here", "x": 1}),
             json.dumps({"body": ""})]  # the empty document is skipped
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_documents(SourceSpec(path=str(f), text_field="body"))
    assert docs == ["héllo ✓".encode(), b"lone \xed\xa0\x80 here"]
    # raw invalid bytes inside a JSON string come back as the same bytes
    g = tmp_path / "raw.jsonl"
    g.write_bytes(b'{"text": "a\xffb"}\n')
    assert load_documents(SourceSpec(path=str(g))) == [b"a\xffb"]


def test_jsonl_gz_and_json_array_match_plain(tmp_path):
    docs = _docs(5)
    plain = load_documents(SourceSpec(path=str(_write_jsonl(tmp_path / "p.jsonl", docs))))
    gz = load_documents(SourceSpec(path=str(_write_jsonl(tmp_path / "p.jsonl.gz", docs, opener=gzip.open))))
    (tmp_path / "arr.json").write_text(json.dumps([{"text": d} for d in docs]))
    arr = load_documents(SourceSpec(path=str(tmp_path / "arr.json")))
    assert plain == gz == arr == [d.encode() for d in docs]


def test_directory_recursive_sorted_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"B")
    (tmp_path / "a.txt").write_bytes(b"A")
    _write_jsonl(tmp_path / "sub" / "c.jsonl", ["C1", "C2"])
    (tmp_path / "notes.bin").write_bytes(b"\x00skip me")  # unsupported: skipped inside a directory
    (tmp_path / ".hidden.txt").write_bytes(b"hidden")
    assert load_documents(SourceSpec(path=str(tmp_path))) == [b"A", b"B", b"C1", b"C2"]
    assert load_documents(SourceSpec(path=str(tmp_path / "*.txt"))) == [b"A", b"B"]
    assert load_documents(SourceSpec(path=str(tmp_path / "**" / "*.jsonl"))) == [b"C1", b"C2"]
    # an explicit format reads any extension
    assert load_documents(SourceSpec(path=str(tmp_path / "notes.bin"), format="txt")) == [b"\x00skip me"]


def test_default_corpus():
    train, val = build_datasets([SourceSpec(path="default")], seq_len=1024, val_fraction=0.05, seed=0)
    assert train.documents + val.documents > 400  # pydoc topics + stdlib docstrings
    assert train.num_bytes > 1_500_000 and val.num_bytes > 20_000
    docs = load_documents(SourceSpec(path="default"))
    assert train.documents + val.documents == len(docs)
    copies = len(docs) - len(set(docs))  # a held-out text takes its duplicates with it
    assert round(0.05 * len(set(docs))) <= val.documents <= round(0.05 * len(set(docs))) + copies
    text = b"".join(_documents_in(train)) + b"".join(_documents_in(val))
    assert b'The "if" statement is used for conditional execution' in text


# -- packing / labels -----------------------------------------------------------------------------


def test_batches_have_right_shape_and_shifted_labels(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _docs(40))
    train, _ = build_datasets([str(tmp_path / "d.jsonl")], seq_len=32, val_fraction=0.1, seed=0)
    rows = {tuple(r) for r in train.rows().tolist()}
    for batch in _take(ByteBatches(train, batch_size=4, seed=0), 10):
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])  # labels are the inputs shifted by one
        for xr, yr in zip(x.tolist(), y.tolist()):
            assert tuple(xr + yr[-1:]) in rows  # each row is one packed (seq_len + 1)-id chunk


def test_padding_positions_are_ignored(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 10)
    train, _ = build_datasets([str(tmp_path / "a.txt")], seq_len=16, val_fraction=0.0, seed=0)
    batch = next(ByteBatches(train, batch_size=1))
    assert batch["labels"][0].tolist() == [ord("x") + 4] * 10 + [EOS_ID] + [IGNORE_INDEX] * 5
    assert batch["input_ids"][0].tolist() == [BOS_ID] + [ord("x") + 4] * 10 + [EOS_ID] + [BOE_ID] * 4


# -- held-out split -------------------------------------------------------------------------------


def test_no_validation_document_in_training(tmp_path):
    docs = _docs(200)
    docs += docs[:10]  # exact duplicates must land on the same side
    _write_jsonl(tmp_path / "a.jsonl", docs)
    _, val_a = build_datasets([str(tmp_path / "a.jsonl")], seq_len=128, val_fraction=0.1, seed=3)
    leaked = [d.decode() for d in _documents_in(val_a)[:3]]  # source b repeats three of a's held-out texts
    _write_jsonl(tmp_path / "b.jsonl", _docs(30, seed=1)[:20] + leaked + docs[10:15])
    train, val = build_datasets([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], seq_len=128,
                                val_fraction=0.1, seed=3)
    assert train.stats["sources"][1]["documents"] + val.stats["sources"][1]["documents"] == 28 - 3
    val_docs, train_docs = _documents_in(val), _documents_in(train)
    assert len(val_docs) == val.documents and len(train_docs) == train.documents
    assert [s["documents"] for s in val.stats["sources"]] == [20, 3]  # 10% of the distinct docs per source (b: 28)
    train_bytes = b"\n".join(train_docs)
    assert val_docs and all(d not in train_bytes for d in val_docs)
    assert set(val_docs) | set(train_docs) == {d.encode() for d in set(docs) | set(_docs(30, seed=1)[:20])}
    # a different seed holds out different documents
    _, val2 = build_datasets([str(tmp_path / "a.jsonl")], seq_len=128, val_fraction=0.1, seed=4)
    assert set(_documents_in(val2)) != set(val_docs[:20])


def test_single_document_splits_its_bytes(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(400)).encode()
    (tmp_path / "one.txt").write_bytes(text)
    train, val = build_datasets([str(tmp_path / "one.txt")], seq_len=64, val_fraction=0.05, seed=0)
    (head,), (tail,) = _documents_in(train), _documents_in(val)
    assert head + tail == text and tail.startswith(b"line ") and tail not in head
    assert 0.04 < len(tail) / len(text) < 0.1
    assert train.stats["bytes"] + val.stats["bytes"] == len(text)


def test_split_documents_at_least_one():
    train, val = split_documents([b"a", b"b", b"c"], 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2 and set(train + val) == {b"a", b"b", b"c"}


# -- order ------------------------------------------------------------------------------------------


def test_determinism_and_epoch_permutation(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _docs(60))
    train, _ = build_datasets([str(tmp_path / "d.jsonl")], seq_len=32, val_fraction=0.05, seed=0)
    n = train.num_sequences
    a, b = _take(ByteBatches(train, 8, seed=1), 12), _take(ByteBatches(train, 8, seed=1), 12)
    c = _take(ByteBatches(train, 8, seed=2), 12)
    assert _same(a, b) and not _same(a, c)
    # one epoch (batch size 1) visits every sequence exactly once; the next epoch reorders them
    it = ByteBatches(train, 1, seed=1)
    key = lambda bt: tuple(bt["input_ids"][0].tolist())
    epoch0 = [key(next(it)) for _ in range(n)]
    epoch1 = [key(next(it)) for _ in range(n)]
    all_rows = sorted(tuple(r[:-1]) for r in train.rows().tolist())
    assert sorted(epoch0) == all_rows == sorted(epoch1) and epoch0 != epoch1
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["index"] == 0


def test_weights_sample_proportionally(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 3000)
    (tmp_path / "b.txt").write_bytes(b"b" * 9000)  # 3x the text, but a third of the weight
    train, _ = build_datasets([SourceSpec(path=str(tmp_path / "a.txt"), weight=3.0),
                               SourceSpec(path=str(tmp_path / "b.txt"), weight=1.0)],
                              seq_len=63, val_fraction=0.05, seed=0)
    counts = {"a": 0, "b": 0}
    for batch in _take(ByteBatches(train, 10, seed=0), 60):
        for row in batch["input_ids"].tolist():
            counts["a" if ord("a") + 4 in row else "b"] += 1
    assert counts["a"] + counts["b"] == 600
    assert 2.7 < counts["a"] / counts["b"] < 3.3, counts
    # the interleave is reshuffled every epoch
    it, n = ByteBatches(train, 1, seed=0), train.num_sequences
    pattern = [int(ord("a") + 4 in next(it)["input_ids"][0].tolist()) for _ in range(2 * n)]
    assert sum(pattern[:n]) == sum(pattern[n:]) and pattern[:n] != pattern[n:]


def test_resume_gives_identical_following_batches(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _docs(30))
    train, _ = build_datasets([str(tmp_path / "d.jsonl")], seq_len=24, val_fraction=0.1, seed=0)
    bs = next(b for b in range(6, 20) if train.num_sequences % b)  # so batches straddle epoch ends
    full = ByteBatches(train, bs, seed=5)
    _take(full, 7)
    state = json.loads(json.dumps(full.state_dict()))  # survives a JSON round trip
    assert (state["epoch"], state["index"]) == divmod(7 * bs, train.num_sequences)
    expected = _take(full, 2 * train.num_sequences // bs + 3)  # crosses at least one epoch end
    resumed = ByteBatches(train, bs, seed=5)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, len(expected)), expected)
    fresh = ByteBatches(train, bs, seed=5)
    assert not _same(_take(fresh, 3), expected[:3])
    with pytest.raises(ByteifyError, match="seed"):
        ByteBatches(train, bs, seed=6).load_state_dict(state)


def test_rank_slices_union_is_the_global_batch(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", _docs(40))
    _write_jsonl(tmp_path / "b.jsonl", _docs(20, seed=9))
    train, _ = build_datasets([str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "b.jsonl"), "weight": 2}],
                              seq_len=32, val_fraction=0.05, seed=0)
    single = _take(ByteBatches(train, 8, seed=0), 5)
    ranks = [_take(ByteBatches(train, 8, seed=0, rank=r, world_size=4), 5) for r in range(4)]
    for step, batch in enumerate(single):
        parts = [ranks[r][step] for r in range(4)]
        assert all(p["input_ids"].shape == (2, 32) for p in parts)
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    # the same global position resumes on another world size
    one = ByteBatches(train, 8, seed=0)
    _take(one, 3)
    r1 = ByteBatches(train, 8, seed=0, rank=1, world_size=2)
    r1.load_state_dict(one.state_dict())
    assert torch.equal(next(r1)["input_ids"], next(one)["input_ids"][4:])


def test_val_batches_fixed_and_padded(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _docs(100))
    _, val = build_datasets([str(tmp_path / "d.jsonl")], seq_len=32, val_fraction=0.1, seed=0)
    n = val.num_sequences
    a, b = list(val.val_batches(4)), list(val.val_batches(4))
    assert len(a) == -(-n // 4) and _same(a, b)
    assert all(x["input_ids"].shape == (4, 32) for x in a)
    real = sum(int((x["labels"] != IGNORE_INDEX).any(dim=1).sum()) for x in a)
    assert real == n  # every held-out row exactly once, the rest all-ignored filler
    assert len(list(val.val_batches(4, max_batches=2))) == 2
    halves = [list(val.val_batches(4, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][0]["input_ids"], halves[1][0]["input_ids"]]), a[0]["input_ids"])


def test_stats_and_describe(tmp_path):
    docs = _docs(40)
    _write_jsonl(tmp_path / "d.jsonl", docs)
    train, val = build_datasets([str(tmp_path / "d.jsonl")], seq_len=64, val_fraction=0.25, seed=0)
    assert (train.stats["documents"], val.stats["documents"]) == (30, 10)
    assert train.stats["bytes"] + val.stats["bytes"] == sum(len(d.encode()) for d in docs)
    ids = train.stats["bytes"] + 2 * 30
    assert train.stats["sequences"] == -(-ids // 65)
    assert "train: 30 documents" in describe(train, val)


# -- errors ----------------------------------------------------------------------------------------


def _error(sources, **kw) -> str:
    with pytest.raises(ByteifyError) as info:
        train, _ = build_datasets(sources, seq_len=kw.pop("seq_len", 32), val_fraction=0.05, seed=0)
        ByteBatches(train, kw.pop("batch_size", 4), **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    assert str(missing) in _error([str(missing)]) and "no such file" in _error([str(missing)])
    pattern = str(tmp_path / "*.jsonl")
    assert pattern in _error([pattern]) and "matches no files" in _error([pattern])
    (tmp_path / "empty.txt").write_bytes(b"")
    assert str(tmp_path / "empty.txt") in _error([str(tmp_path / "empty.txt")])
    (tmp_path / "data.csv").write_text("a,b\n")
    msg = _error([str(tmp_path / "data.csv")])
    assert str(tmp_path / "data.csv") in msg and ".csv" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken\n')
    assert f"{bad}:3" in _error([str(bad)]) and "invalid JSON" in _error([str(bad)])
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"content": "x"}\n')
    msg = _error([str(nofield)])
    assert f"{nofield}:2" in msg and "'text'" in msg and "'content'" in msg
    (tmp_path / "emptydir").mkdir()
    assert str(tmp_path / "emptydir") in _error([str(tmp_path / "emptydir")])


def test_error_corpus_smaller_than_one_batch(tmp_path):
    (tmp_path / "small.txt").write_bytes(b"tiny corpus " * 20)  # 240 bytes -> 8 rows of 33 ids
    train, _ = build_datasets([str(tmp_path / "small.txt")], seq_len=32, val_fraction=0.05, seed=0)
    assert ByteBatches(train, train.num_sequences) is not None  # exactly one batch is fine
    msg = _error([str(tmp_path / "small.txt")], batch_size=train.num_sequences + 1)
    assert str(tmp_path / "small.txt") in msg and f"{train.num_sequences} sequences" in msg
    assert f"one batch of {train.num_sequences + 1}" in msg
    with pytest.raises(ByteifyError, match="ranks"):
        ByteBatches(train, 3, world_size=2)


def test_bad_source_spec_is_a_one_line_error():
    with pytest.raises(ByteifyError, match="weight"):
        build_datasets([{"path": "default", "weight": 0}], seq_len=32)
    with pytest.raises(ByteifyError, match="extra|unknown|not permitted"):
        build_datasets([{"path": "default", "wieght": 1}], seq_len=32)
