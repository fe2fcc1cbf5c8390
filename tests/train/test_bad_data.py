"""Bad training data: a missing text column, a corrupt parquet or gzip file, an empty source, a
file corrupt deep inside — one line naming the file, exit code 2, and the run's existing
checkpoints untouched."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import byteify.cli as cli

TEXT = "The if statement is used for conditional execution, and the while statement repeats. "


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run_with_checkpoint(tiny_converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-data")
    good = root / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": TEXT * (1 + i % 3)}) for i in range(40)))
    run = root / "run"
    res = CliRunner().invoke(cli.app, ["train", "tiny-cpu", f"model={tiny_converted}", f"output_dir={run}",
                                       f"data.sources=[{{path: {good}}}]", "stages.0.steps=2", "run.progress=false"])
    assert res.exit_code == 0, res.output
    return root, run


def bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)"""
    out = {}
    no_col = root / "no_text.parquet"
    pq.write_table(pa.table({"content": [TEXT] * 5, "id": list(range(5))}), no_col)
    out["missing text column"] = (no_col, "'text'")
    corrupt_pq = root / "corrupt.parquet"
    corrupt_pq.write_bytes(b"PAR1" + b"\x00garbage" * 100)
    out["corrupt parquet"] = (corrupt_pq, "corrupt.parquet")
    corrupt_gz = root / "corrupt.jsonl.gz"
    corrupt_gz.write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip at all" * 50)
    out["corrupt gzip"] = (corrupt_gz, "corrupt.jsonl.gz")
    empty = root / "empty.jsonl"
    empty.write_text("\n\n")
    out["empty source"] = (empty, "empty.jsonl")
    shards = root / "shards"  # 8 files, one per lane: the last is fine for ~6 KB, then corrupt
    shards.mkdir(exist_ok=True)
    for i in range(8):
        data = gzip.compress("\n".join(json.dumps({"text": TEXT + str(j)}) for j in range(1200)).encode())
        (shards / f"part-{i}.jsonl.gz").write_bytes(data if i < 7 else data[:2000] + b"\xff" * 4000)
    out["corrupt deep inside"] = (shards, "part-7.jsonl.gz")
    return out


@pytest.mark.parametrize("case", ["missing text column", "corrupt parquet", "corrupt gzip", "empty source",
                                  "corrupt deep inside"])
def test_bad_data_is_one_line_exit_2_and_leaves_checkpoints_untouched(run_with_checkpoint, tiny_converted, case):
    root, run = run_with_checkpoint
    path, must_say = bad_files(root)[case]
    before = tree_digest(run / "checkpoints")
    res = CliRunner().invoke(cli.app, ["train", "tiny-cpu", f"model={tiny_converted}", f"output_dir={run}",
                                       f"data.sources=[{{path: {path}}}]", "stages.0.steps=400", "run.save_every=1000",
                                       "data.val_fraction=0.2", "data.seq_len=512", "stages.0.batch_bytes=4096",
                                       "run.progress=false"])
    assert res.exit_code == 2, (res.output, res.exception)
    errors = [x for x in res.output.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and must_say in errors[0], res.output
    assert "Traceback" not in res.output
    if case == "corrupt deep inside":
        assert "stage 'adapt'" in res.output  # found while training, not at setup
    assert tree_digest(run / "checkpoints") == before
