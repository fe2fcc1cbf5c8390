"""byteify.data.readers: every format gives the same documents, positions restart reading at a
document without reading what came before, and bad input is a one-line error naming the file."""

from __future__ import annotations

import gzip
import json

import pytest

from byteify.data import readers
from byteify.data.readers import SourceSpec, open_source
from byteify.errors import ByteifyError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 5) + "\nend é ✓" for i in range(23)]
DOCS = [t.encode() for t in TEXTS]


def jsonl_bytes(texts, field="text") -> bytes:
    return b"".join(json.dumps({field: t, "id": i}).encode() + b"\n" for i, t in enumerate(texts))


def write_parquet(path, texts, row_group_size=5, field="text"):
    table = pa.table({field: texts, "id": [f"<urn:uuid:{i}>" for i in range(len(texts))],
                      "url": [f"https://example.com/{i}" for i in range(len(texts))],
                      "dump": ["CC-MAIN-2024-10"] * len(texts), "language": ["en"] * len(texts),
                      "language_score": [0.9] * len(texts), "token_count": [len(t) // 4 for t in texts]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def all_docs(spec, **kw):
    return [doc for _, doc in open_source(spec, **kw).documents()]


def one_line_error(spec_or_fn, *needles):
    with pytest.raises(ByteifyError) as info:
        spec_or_fn() if callable(spec_or_fn) else all_docs(spec_or_fn)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


@pytest.fixture
def formats(tmp_path):
    """The same 23 documents in every supported layout."""
    paths = {}
    paths["jsonl"] = tmp_path / "a.jsonl"
    paths["jsonl"].write_bytes(jsonl_bytes(TEXTS))
    paths["gz"] = tmp_path / "a.jsonl.gz"
    paths["gz"].write_bytes(gzip.compress(jsonl_bytes(TEXTS)))
    paths["zst"] = tmp_path / "a.jsonl.zst"
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS)))
    paths["array"] = tmp_path / "a.json"
    paths["array"].write_text(json.dumps([{"text": t} for t in TEXTS]))
    paths["parquet"] = write_parquet(tmp_path / "a.parquet", TEXTS, row_group_size=5)
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(TEXTS):
        (txt / f"{i:03d}.txt").write_text(t)
    paths["txtdir"] = txt
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "gz", "zst", "array", "parquet", "txtdir"])
def test_every_format_reads_the_same_documents(formats, kind):
    assert all_docs(str(formats[kind])) == DOCS


def test_parquet_has_one_unit_per_row_group_and_fineweb_columns(tmp_path):
    path = write_parquet(tmp_path / "fw.parquet", TEXTS, row_group_size=4)
    src = open_source(str(path))
    assert src.num_units() == 6
    split = open_source(str(path), min_units=16)  # too few row groups for 16 lanes: row ranges
    assert split.num_units() == 18
    items = list(split.documents())
    assert [d for _, d in items] == DOCS
    assert [d for _, d in split.documents(items[9][0])] == DOCS[9:]
    # a configurable text column; the other FineWeb columns are never read
    write_parquet(tmp_path / "c.parquet", TEXTS, field="content")
    assert all_docs({"path": str(tmp_path / "c.parquet"), "text_field": "content"}) == DOCS


def test_saved_dataset_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "saved"), max_shard_size="1KB")
    assert len(list((tmp_path / "saved").glob("data-*.arrow"))) > 1
    assert all_docs(str(tmp_path / "saved")) == DOCS
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert all_docs({"path": str(tmp_path / "dd"), "split": "test"}) == DOCS[:3]
    one_line_error({"path": str(tmp_path / "dd"), "split": "validation"}, "no split 'validation'", "train, test")


def test_arrow_ipc_files_and_streams(tmp_path):
    table = pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))})
    with pa.ipc.new_file(str(tmp_path / "f.arrow"), table.schema) as w:
        for batch in table.to_batches(max_chunksize=6):
            w.write_batch(batch)
    with pa.ipc.new_stream(str(tmp_path / "s.arrow"), table.schema) as w:
        for batch in table.to_batches(max_chunksize=4):
            w.write_batch(batch)
    for name in ("f.arrow", "s.arrow"):
        src = open_source(str(tmp_path / name))
        items = list(src.documents())
        assert [d for _, d in items] == DOCS
        assert [d for _, d in src.documents(json.loads(json.dumps(items[13][0])))] == DOCS[13:]
    one_line_error(lambda: open_source({"path": str(tmp_path / "s.arrow"), "text_field": "body"}), "s.arrow",
                   "no column 'body' (columns: text, n)")


def test_txt_is_raw_bytes_and_directories_sort_and_skip_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_bytes(b"\xff\xfe invalid utf-8 is data \x80")
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / ".hidden.txt").write_bytes(b"hidden")
    (tmp_path / "notes.md").write_bytes(b"ignored in auto mode")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert all_docs(str(tmp_path)) == [b"first", b"\xff\xfe invalid utf-8 is data \x80"]
    assert all_docs(str(tmp_path / "*.txt")) == [b"first"]


def test_invalid_utf8_and_surrogates_in_json_lines(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_bytes(b'{"text": "caf\xe9 raw byte"}\n{"text": "lone \\ud800 escape"}\n')
    assert all_docs(str(p)) == [b"caf\xe9 raw byte", "lone \ud800 escape".encode("utf-8", "surrogatepass")]


@pytest.mark.parametrize("kind", ["jsonl", "gz", "zst", "array", "parquet", "txtdir"])
def test_positions_restart_at_their_document(formats, kind):
    src = open_source(str(formats[kind]))
    positions = [pos for pos, _ in src.documents()]
    json.dumps(positions)  # JSON-serializable
    for i in (0, 4, 5, 11, 22):
        assert [d for _, d in src.documents(json.loads(json.dumps(positions[i])))] == DOCS[i:]


def test_plain_jsonl_is_cut_into_byte_ranges_that_restart_by_seeking(tmp_path):
    p = tmp_path / "big.jsonl"
    texts = [f"line {i} " + "x" * (i % 97) for i in range(8000)]
    p.write_bytes(jsonl_bytes(texts))
    src = open_source(str(p), min_units=8)
    assert src.num_units() >= 8  # lines straddling range ends belong to exactly one range
    assert [d for _, d in src.documents()] == [t.encode() for t in texts]
    pos, _ = list(src.documents())[7777]
    src.docs_read = 0
    assert next(src.documents(pos))[1] == texts[7777].encode()
    assert src.docs_read == 1  # a seek, not a re-read of what comes before


def test_parquet_restart_reads_only_its_row_group(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", TEXTS, row_group_size=5)
    src = open_source(str(path))
    pos = [p for p, _ in src.documents()][17]
    assert pos == [3, 2]  # row group 3, row 2
    src.docs_read = src.units_opened = 0
    assert [d for _, d in src.documents(pos)] == DOCS[17:]
    assert src.docs_read == len(DOCS) - 17 and src.units_opened == 2


def test_hub_streaming_through_an_injected_loader(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    files = [str(write_parquet(tmp_path / f"{i}.parquet", TEXTS[i * 12:(i + 1) * 12], row_group_size=4)) for i in range(2)]
    calls = []

    def loader(path, name, split):
        calls.append((path, name, split))
        return datasets.load_dataset("parquet", data_files=files, split=split, streaming=True)

    monkeypatch.setattr(readers, "HUB_LOADER", loader)
    spec = {"path": "HuggingFaceFW/fineweb-edu", "format": "hf", "name": "sample-10BT"}
    src = open_source(spec)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")]
    assert src.num_units() == 2
    items = list(src.documents())
    assert [d for _, d in items] == DOCS
    pos = json.loads(json.dumps(items[15][0]))  # the IterableDataset's state_dict before doc 15
    assert [d for _, d in open_source(spec).documents(pos)] == DOCS[15:]
    one_line_error(lambda: open_source(dict(spec, text_field="body")), "no column 'body'", "text, id, url")


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_path_glob_directory_and_extension(tmp_path):
    one_line_error(str(tmp_path / "nope.jsonl"), "nope.jsonl", "no such file")
    one_line_error("someone/dataset", "format: hf")
    one_line_error(str(tmp_path / "*.jsonl"), "glob matches no files")
    (tmp_path / "empty").mkdir()
    one_line_error(str(tmp_path / "empty"), "directory has no")
    (tmp_path / "data.csv").write_text("a,b\n")
    one_line_error(str(tmp_path / "data.csv"), "data.csv", "unsupported file type '.csv'", "format:")
    (tmp_path / "data.log").write_text("plain text\n")
    assert all_docs({"path": str(tmp_path / "data.log"), "format": "txt"}) == [b"plain text\n"]


def test_parquet_without_the_text_column_names_file_and_columns(tmp_path):
    path = write_parquet(tmp_path / "fw.parquet", TEXTS, field="content")
    one_line_error(str(path), "fw.parquet", "no column 'text'", "content, id, url, dump", "text_field")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    one_line_error(str(tmp_path / "ints.parquet"), "ints.parquet", "column 'text' is int64")


def test_corrupt_parquet_gzip_and_zstd_fail_at_open(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", TEXTS).read_bytes()
    (tmp_path / "bad.parquet").write_bytes(good[: len(good) // 2])
    one_line_error(lambda: open_source(str(tmp_path / "bad.parquet")), "bad.parquet", "not a valid parquet file")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip at all" * 10)
    one_line_error(lambda: open_source(str(tmp_path / "bad.jsonl.gz")), "bad.jsonl.gz", "corrupt gzip")
    (tmp_path / "bad.jsonl.zst").write_bytes(b"this is not zstd either" * 10)
    one_line_error(lambda: open_source(str(tmp_path / "bad.jsonl.zst")), "bad.jsonl.zst", "corrupt zstd")


def test_errors_found_while_streaming_name_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(jsonl_bytes(TEXTS[:5]) + b"{not json}\n" + jsonl_bytes(TEXTS[:2]))
    src = open_source(str(p))  # opening is cheap and does not find it
    one_line_error(lambda: list(src.documents()), "c.jsonl:6: invalid JSON line")
    q = tmp_path / "c.jsonl.gz"
    q.write_bytes(gzip.compress(jsonl_bytes(TEXTS[:3]) + b'{"txt": "x"}\n'))
    one_line_error(lambda: list(open_source(str(q)).documents()), "c.jsonl.gz:4", "no 'text' field", "'txt'")
    # a gzip member cut short deep in the file: the first block is fine, the end is not
    big = gzip.compress(jsonl_bytes([f"{i} " + "word " * 200 for i in range(3000)]))
    r = tmp_path / "cut.jsonl.gz"
    r.write_bytes(big[: len(big) * 2 // 3])
    src = open_source(str(r))
    msg = one_line_error(lambda: list(src.documents()), "cut.jsonl.gz:", "corrupt gzip")
    assert int(msg.split("cut.jsonl.gz:")[1].split(":")[0]) > 1000


def test_a_source_without_text(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_bytes(jsonl_bytes(["", "", ""]) + b"\n\n")
    one_line_error(lambda: open_source(str(p)).first_document(), "blank.jsonl", "no text")
    (tmp_path / "none.parquet").write_bytes(b"")
    pq.write_table(pa.table({"text": pa.array([None, ""], pa.string())}), tmp_path / "none.parquet")
    one_line_error(lambda: open_source(str(tmp_path / "none.parquet")).first_document(), "none.parquet", "no text")


def test_spec_is_strict():
    with pytest.raises(Exception):
        SourceSpec(path="x", wieght=2)
    with pytest.raises(Exception):
        SourceSpec(path="x", weight=0)
    assert SourceSpec(path="org/ds", format="hf", name="sample-10BT").split == "train"
