"""Streaming data throughput and memory: ``byteify.data.streams`` from disk to packed batches.

Generates (once, cached under ``--workdir``) FineWeb-shaped corpora of realistic English-like
text: documents are random runs of paragraphs of the embedded corpus (pydoc topics and stdlib
docstrings), as JSON lines (``{"text", "id", "url", "dump", ...}``), as parquet with 1,000-row
row groups, and (``--formats jsonl.gz``) as one gzip file; then, for each size and format, in a FRESH subprocess:

* peak RSS (``ru_maxrss``) above the same process's import-only baseline,
* the holdout decision + validation rows (16 rows, ``val_fraction`` 0.005) time,
* the time to the first training batch (opening the source and packing one micro-batch),
* packed bytes per second (ids of finished rows; one id per text byte plus BOS/EOS) for
  ``--seconds`` or until ``--max-mb`` MB, seq_len 8192, 8 lanes, 1 process.

Targets (issue): peak RSS flat within +250 MB across sizes, >= 50 MB/s, first batch < 5 s.

Usage: nice -n 10 .venv/bin/python benchmarks/data_stream.py [--sizes 6MB,600MB[,6GB]]
       [--formats jsonl,parquet[,jsonl.gz]] [--seconds 20] [--max-mb 2000] [--workdir /tmp/byteify-data-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"6MB": 6_000_000, "600MB": 600_000_000, "6GB": 6_000_000_000}

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy, torch, pyarrow, pyarrow.parquet
from byteify.data.streams import ByteBatches, validation_rows
torch.set_num_threads(1)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
base = rss()
path, seq_len, lanes, seconds, max_bytes = {path!r}, {seq_len}, {lanes}, {seconds}, {max_bytes}
t = time.perf_counter()
rows, holdout = validation_rows([path], seq_len, 0.005, 0, max_rows=16)
val_s = time.perf_counter() - t
t = time.perf_counter()
batches = ByteBatches([path], seq_len, lanes, seed=0, holdout=holdout)
next(batches)
first_s = time.perf_counter() - t
t, done = time.perf_counter(), 0
while time.perf_counter() - t < seconds and done < max_bytes:
    done += next(batches)["input_ids"].numel() + lanes
elapsed = time.perf_counter() - t
print(json.dumps({{"base_mib": base, "peak_mib": rss(), "val_s": val_s, "val_rows": len(rows), "first_s": first_s,
                  "mb_s": done / elapsed / 1e6, "mb": done / 1e6, "seconds": elapsed}}))
"""


def paragraphs() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from byteify.data.corpus import default_documents

    paras = [p.strip() for _, text in default_documents() for p in text.split("\n\n")]
    return [p for p in paras if len(p) > 80]


def generate(workdir: Path, size_name: str) -> dict[str, Path]:
    """``corpus-<size>.jsonl`` and ``.parquet`` of about ``size`` text bytes, written once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {"jsonl": workdir / f"corpus-{size_name}.jsonl", "parquet": workdir / f"corpus-{size_name}.parquet"}
    if all(p.exists() for p in out.values()):
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    paras = paragraphs()
    rng = np.random.default_rng(0)
    target, written, n = SIZES[size_name], 0, 0
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in out.items()}
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
                        ("language", pa.string()), ("language_score", pa.float64()), ("token_count", pa.int64())])
    t = time.time()
    with open(tmp["jsonl"], "w", encoding="utf-8") as jf, pq.ParquetWriter(tmp["parquet"], schema) as pw:
        while written < target:
            docs = []
            for _ in range(1000):
                start = int(rng.integers(len(paras)))
                k = int(rng.integers(1, 12))
                picked = paras[start: start + k]
                if rng.random() < 0.5:  # perturb: shuffle the paragraphs of half the documents
                    picked = [picked[i] for i in rng.permutation(len(picked))]
                docs.append("\n\n".join(picked))
            rows = {"text": docs, "id": [f"<urn:uuid:{n + i:012d}>" for i in range(len(docs))],
                    "dump": ["CC-MAIN-2024-10"] * len(docs),
                    "url": [f"https://example.org/page/{n + i}" for i in range(len(docs))],
                    "language": ["en"] * len(docs), "language_score": rng.uniform(0.65, 1.0, len(docs)).tolist(),
                    "token_count": [len(d) // 4 for d in docs]}
            pw.write_table(pa.table(rows, schema=schema), row_group_size=1000)
            jf.writelines(json.dumps({k: v[i] for k, v in rows.items()}, ensure_ascii=False) + "\n" for i in range(len(docs)))
            written += sum(len(d.encode()) for d in docs)
            n += len(docs)
    for k, p in out.items():
        os.replace(tmp[k], p)
    print(f"generated {size_name}: {n:,} documents, {written / 1e6:,.0f} MB of text in {time.time() - t:.0f} s", file=sys.stderr)
    return out


def gzipped(path: Path) -> Path:
    """``path`` + ``.gz`` (one compressed file: every lane strides over all of it), written once."""
    import gzip
    import shutil

    out = path.with_name(path.name + ".gz")
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, out)
    return out


def measure(path: Path, args) -> dict:
    code = CHILD.format(root=str(ROOT), path=str(path), seq_len=args.seq_len, lanes=args.lanes,
                        seconds=args.seconds, max_bytes=int(args.max_mb * 1e6))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{path}: child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/byteify-data-bench")
    ap.add_argument("--sizes", default="6MB,600MB", help="comma-separated: 6MB, 600MB, 6GB")
    ap.add_argument("--formats", default="jsonl,parquet")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-mb", type=float, default=2000.0)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--lanes", type=int, default=8)
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r} (choose from {', '.join(SIZES)})")
    lines = ["| corpus | format | file size | peak RSS above imports | validation (16 rows) | first batch | packed MB/s |",
             "|---|---|---|---|---|---|---|"]
    for size in sizes:
        files = generate(Path(args.workdir), size)
        for fmt in [f.strip() for f in args.formats.split(",")]:
            if fmt not in ("jsonl", "parquet", "jsonl.gz"):
                raise SystemExit(f"--formats: unknown format {fmt!r} (choose from jsonl, parquet, jsonl.gz)")
            path = gzipped(files["jsonl"]) if fmt == "jsonl.gz" else files[fmt]
            r = measure(path, args)
            lines.append(f"| {size} | {fmt} | {path.stat().st_size / 1e6:,.0f} MB | "
                         f"{r['peak_mib'] - r['base_mib']:,.0f} MiB (base {r['base_mib']:,.0f}) | {r['val_s']:.2f} s | "
                         f"{r['first_s']:.2f} s | {r['mb_s']:.1f} ({r['mb']:,.0f} MB in {r['seconds']:.0f} s) |")
            print(lines[-1], file=sys.stderr)
    print(f"\nseq_len {args.seq_len}, {args.lanes} lanes, 1 process, val_fraction 0.005\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
