"""byteify.data.streams: lanes make the global rows independent of the world size, resuming
(also with another world size) continues exactly without re-reading, weights hold, held-out text
never trains, validation needs no full pass, and memory does not grow with the corpus."""

from __future__ import annotations

import functools
import gzip
import json
import tracemalloc

import numpy as np
import pytest

from byteify.data.readers import Source, open_source
from byteify.data.streams import (ByteBatches, ByteRowPacker, Holdout, LaneStream, decide_holdout, frame,
                                  to_batch, validation_rows)
from byteify.errors import ByteifyError
from byteify.tokenizer import BOE_ID, decode_bytes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def texts(n, tag="doc", words=12):
    return [f"{tag}-{i:05d} " + " ".join(f"w{(i * 7 + j) % 31}" for j in range(words + i % 9)) + "\n" for i in range(n)]


def write_jsonl(path, items, gz=False):
    data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in items)
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """Three sources with different unit layouts: 12 parquet row groups (lanes own units), one
    gzip file (lanes stride over it) and a directory of 5 small JSON-lines files."""
    pq.write_table(pa.table({"text": texts(240, "pq"), "id": list(range(240))}), tmp_path / "a.parquet", row_group_size=20)
    write_jsonl(tmp_path / "b.jsonl.gz", texts(90, "gz"), gz=True)
    (tmp_path / "c").mkdir()
    for k in range(5):
        write_jsonl(tmp_path / "c" / f"{k}.jsonl", texts(30, f"dir{k}"))
    return [{"path": str(tmp_path / "a.parquet"), "weight": 2.0}, {"path": str(tmp_path / "b.jsonl.gz")},
            {"path": str(tmp_path / "c"), "weight": 0.5}]


def run(sources, lanes, world, steps, seq_len=48, seed=3, holdout=None, states=None):
    """The global micro-batches of ``steps`` steps, built from ``world`` simulated ranks (each
    optionally restored from ``states``), and the ranks' final states."""
    ranks = [ByteBatches(sources, seq_len, lanes, rank=r, world_size=world, seed=seed, holdout=holdout) for r in range(world)]
    if states is not None:
        for b in ranks:
            b.load_state_dict(states)
    batches = [np.concatenate([next(b)["input_ids"].numpy() for b in ranks]) for _ in range(steps)]
    return np.stack(batches), [b.state_dict() for b in ranks]


def test_byte_row_packer_packs_across_documents_and_restarts_mid_document():
    docs = [(i, bytes([97 + i]) * (5 + 3 * i)) for i in range(8)]
    packer = ByteRowPacker(7)
    out = list(packer.items(iter(docs), 0))
    stream = np.concatenate([frame(d) for _, d in docs])
    assert np.array_equal(np.concatenate([r for r, _, _ in out]), stream[: len(out) * 8])
    for k, (_, pos, off) in enumerate(out[:-1]):
        again = list(packer.items(iter(docs[pos:]), off))
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(again, out[k + 1:]))
        assert len(again) == len(out) - k - 1
    batch = to_batch(np.stack([r for r, _, _ in out[:2]]))
    assert batch["input_ids"].shape == (2, 7) and batch["labels"].dtype.is_floating_point is False


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_give_the_single_process_rows(corpus, world):
    single, _ = run(corpus, 4, 1, 30)
    multi, _ = run(corpus, 4, world, 30)
    assert np.array_equal(single, multi)
    assert len({r.tobytes() for r in single.reshape(-1, 48)}) > 110  # lanes read different text


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (4, 2)])
def test_resume_continues_exactly_with_another_world_size(corpus, before, after):
    straight, _ = run(corpus, 4, 1, 40)
    first, states = run(corpus, 4, before, 17)
    states = json.loads(json.dumps(states))  # as written to and read from a checkpoint
    rest, _ = run(corpus, 4, after, 23, states=states)
    assert np.array_equal(np.concatenate([first, rest]), straight)


def test_resume_does_not_reread_what_was_consumed(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(8):
        write_jsonl(d / f"{k}.jsonl", texts(200, f"s{k}"))
    straight = ByteBatches([str(d)], 64, 4, seed=1)
    for _ in range(150):
        next(straight)
    state = json.loads(json.dumps(straight.state_dict()))
    consumed = straight.stream.sources[0].docs_read
    expect = [next(straight)["input_ids"] for _ in range(3)]
    src = open_source(str(d), min_units=4)
    resumed = ByteBatches([src], 64, 4, seed=1)
    src.docs_read = 0
    resumed.load_state_dict(state)
    got = [next(resumed)["input_ids"] for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expect))
    assert consumed > 500 and src.docs_read <= 4 * 3 * 4  # only the documents of the next rows


def test_weights_set_the_proportions_of_rows(tmp_path):
    sources = [{"path": write_jsonl(tmp_path / f"{c}.jsonl", [c * (20 + i) for i in range(50)]), "weight": w}
               for c, w in (("a", 1.0), ("b", 2.0), ("c", 5.0))]
    rows, _ = run(sources, 8, 1, 250, seq_len=16)
    letters = [decode_bytes(r)[:1] for r in rows.reshape(-1, 16)]
    share = {c: letters.count(c.encode()) / len(letters) for c in "abc"}
    assert share == pytest.approx({"a": 1 / 8, "b": 2 / 8, "c": 5 / 8}, abs=0.02)
    again, _ = run(sources, 8, 1, 250, seq_len=16)
    assert np.array_equal(rows, again)


class DocPacker:
    """A packer whose items are whole documents (the interface is not tied to byte rows)."""

    fingerprint = {"packer": "DocPacker"}

    def items(self, docs, offset):
        for pos, doc in docs:
            if offset < len(doc):
                yield doc, pos, len(doc)
            offset = 0


def training_docs(sources, lanes, steps, holdout, seed=0):
    stream = LaneStream(sources, DocPacker, lanes, seed=seed, holdout=holdout)
    return [d for _ in range(steps) for d in stream.next_items()]


def test_held_out_documents_never_train_and_fill_validation(tmp_path):
    docs = texts(600, "v")
    path = write_jsonl(tmp_path / "v.jsonl", docs)
    rows, holdout = validation_rows([path], 64, 0.1, seed=5)
    held = {d.encode() for d in docs if holdout.split(d.encode())[0] is None}
    assert 30 < len(held) < 90
    val_text = b"".join(decode_bytes(r) for r in rows)
    assert val_text == b"".join(d for d in (x.encode() for x in docs) if d in held)
    assert rows[-1][-1] == BOE_ID and (to_batch(rows)["labels"][-1] == -100).any()
    seen = training_docs([path], 4, 400, holdout)
    assert set(seen) == {d.encode() for d in docs} - held  # every training document, no held-out one
    assert decide_holdout([path], 0.1, 5) == holdout == Holdout.from_dict(json.loads(json.dumps(holdout.to_dict())))


def test_small_sources_always_hold_something_out(tmp_path):
    single = tmp_path / "one.txt"
    single.write_bytes(b"".join(b"line %d of the only document\n" % i for i in range(40)))
    few = write_jsonl(tmp_path / "few.jsonl", ["alpha", "beta", "gamma"])
    assert all(Holdout(0.1, 2).split(d)[0] for d in (b"alpha", b"beta", b"gamma"))  # none held out by hash (seed 2)
    rows, holdout = validation_rows([str(single), few], 32, 0.1, seed=2)
    val = b"".join(decode_bytes(r) for r in rows)
    assert val.startswith(b"line 36 of") or b"line 36 of" in val  # the single document's tail
    assert len(holdout.cuts) == 1 and len(holdout.forced) == 1  # and one of the three documents
    seen = training_docs([str(single), few], 8, 12, holdout, seed=2)
    assert single.read_bytes()[: list(holdout.cuts.values())[0]] in seen
    assert not any(b"line 39" in d for d in seen)
    assert len({d for d in seen if len(d) < 10}) == 2  # two of alpha/beta/gamma train
    # every document held out by hash: one is kept for training
    many = write_jsonl(tmp_path / "many.jsonl", ["x1", "x2", "x3", "x4"])
    assert len(decide_holdout([many], 0.999, 0).kept) == 1


def test_fewer_documents_than_lanes_feed_every_lane(tmp_path):
    path = write_jsonl(tmp_path / "three.jsonl", ["one one one", "two two two", "three three"])
    stream = LaneStream([path], DocPacker, 8, seed=0)
    for _ in range(5):
        items = stream.next_items()
        assert items[:3] == [b"one one one", b"two two two", b"three three"]
        assert items[3:] == [items[k % 3] for k in range(3, 8)]


def test_a_source_with_only_held_out_text_is_an_error_not_a_loop(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["only", "two"])
    holdout = Holdout(0.5, 0, forced=[Holdout(0.5, 0).digest(b"only").hex(), Holdout(0.5, 0).digest(b"two").hex()])
    with pytest.raises(ByteifyError, match="no training text"):
        training_docs([path], 2, 1, holdout)


class Endless(Source):
    """A lazily generated source far larger than anything a test could read."""

    def __init__(self):
        super().__init__("endless")

    def num_units(self):
        return 10**9

    def _read_unit(self, unit, within):
        for i in range(int(within or 0), 1000):
            yield i, f"unit {unit} document {i}: ".encode() + b"lorem ipsum " * 20


def test_validation_stops_when_it_has_its_rows():
    src = Endless()
    rows, holdout = validation_rows([src], 128, 0.05, seed=0, max_rows=10)
    assert rows.shape == (10, 129) and (rows != BOE_ID).all()
    assert src.docs_read < 2000 + 1025  # the small-source probe plus about 10 rows of held-out text
    batches = ByteBatches([src], 128, 4, holdout=holdout)
    assert next(batches)["input_ids"].shape == (4, 128)


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    peaks = []
    for n in (1, 10):
        d = tmp_path / f"c{n}"
        d.mkdir()
        for k in range(n):
            write_jsonl(d / f"{k}.jsonl", texts(1400, f"m{k}", words=120))  # ~1 MB each
        batches = ByteBatches([str(d)], 1024, 4, seed=0)
        tracemalloc.start()
        total = 0
        while total < n * 1_000_000:
            total += next(batches)["input_ids"].numel()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        batches.close()
    assert peaks[1] < peaks[0] * 1.5 + 256_000, peaks


def test_bad_setups_are_one_line_errors(corpus):
    with pytest.raises(ByteifyError, match="6 sequences per micro-batch do not split over 4 ranks"):
        ByteBatches(corpus, 48, 6, world_size=4)
    _, states = run(corpus, 4, 2, 3)
    other = ByteBatches(corpus, 48, 4, seed=4)
    with pytest.raises(ByteifyError, match=r"seed is 3 in the saved position, 4 here"):
        other.load_state_dict(states)
    other = ByteBatches(corpus, 48, 4, seed=3)
    with pytest.raises(ByteifyError, match="no state for lane 2"):
        other.load_state_dict(states[0])
    wider = ByteBatches(corpus, 48, 8, seed=3)
    with pytest.raises(ByteifyError, match="lanes is 4 in the saved position, 8 here"):
        wider.load_state_dict(states)


def test_the_embedded_corpus_has_one_unit_per_document():
    stream = LaneStream(["default"], functools.partial(ByteRowPacker, 32), 4)
    assert stream.sources[0].num_units() > 400
    assert stream.next_items()[0].shape == (33,)


def test_the_embedded_corpus_splits_about_five_percent_by_hash():
    from byteify.data.readers import open_source
    from byteify.data.streams import decide_holdout, held_out_documents, validation_batches

    docs = [d for _, d in open_source("default").documents()]
    assert len(docs) > 400 and sum(map(len, docs)) > 1_500_000  # pydoc topics + stdlib docstrings
    assert any(b'The "if" statement is used for conditional execution' in d for d in docs)
    holdout = decide_holdout(["default"], 0.05, 0)
    val = list(held_out_documents(["default"], holdout))
    assert 0.03 * len(docs) < len(val) < 0.07 * len(docs)
    assert all(holdout.split(d) == (None, d) for d in val)
    rows, again = validation_rows(["default"], 128, 0.05, 0, max_rows=10)
    assert again == holdout and rows.shape == (10, 129)
    batches = list(validation_batches(rows, 4, rank=1, world_size=2))  # 3 batches, the last padded
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (2, 128)
    assert (batches[-1]["labels"] == -100).all() and (batches[-1]["input_ids"] == 0).all()  # rank 1's rows 10, 11: padding
