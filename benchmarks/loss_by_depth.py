"""Where does a byte-ified model lose bits against its source?  Held-out bits per byte of BLT
directories and of the source model's exact next-byte distributions (its next-token
distribution marginalised by the byte trie: ``teacher_kl``'s targets), split by the byte's depth
inside its source token (0 = a token's first byte, 1 = its second, 2+ = the rest) and by
whether the BLT's own patcher starts a patch at that byte.

Every byte the teacher can predict is counted once for every model (the same bytes: documents
framed and windowed as ``byteify eval`` does, teacher runs tokenized as ``teacher_kl`` does);
each model patches with its own config's entropy patcher.

Usage: .venv/bin/python benchmarks/loss_by_depth.py SOURCE_CONVERSION NAME=BLT_DIR [NAME=BLT_DIR ...]
       [--final-bytes 32768]    (SOURCE_CONVERSION: a converted directory, it rebuilds the teacher)
Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUPS = ["depth 0", "depth 1", "depth 2+", "patch start", "inside a patch", "all"]


def groups(depth: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"depth 0": depth == 0, "depth 1": depth == 1, "depth 2+": depth >= 2, "patch start": starts,
            "inside a patch": ~starts, "all": torch.ones_like(starts)}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("models", nargs="+", help="NAME=DIR")
    ap.add_argument("--final-bytes", type=int, default=32768)
    args = ap.parse_args()

    from byteify.evaluate import BOE_ID, _batches, frame, held_out_corpus, windows
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt, load_source_tokenizer
    from byteify.tokenizer import OFFSET, token_byte_strings
    from byteify.train.aligned import ByteTrie
    from byteify.train.teacher import load_teacher
    from byteify.train.teacher_kl import teacher_queries, teacher_targets

    docs = held_out_corpus(args.final_bytes)
    rows = [w for d in docs for w in windows(frame(d), 1024)]
    batches = list(_batches(rows, 8, BOE_ID))
    teacher, tok = load_teacher(args.source), load_source_tokenizer(args.source)
    table = token_byte_strings(tok)
    trie = ByteTrie(table)
    queries, teacher_nll = [], []
    for ids, labels, _ in batches:
        q = teacher_queries(ids, labels, tok, table, trie.depth)
        p = teacher_targets(teacher, trie, q, 1.0)
        y = labels[q.b, q.t] - OFFSET  # byte values
        teacher_nll.append(-p.gather(1, y[:, None].clamp(0, 255)).squeeze(1).clamp_min(1e-30).log())
        queries.append(q)
    del teacher
    nll = {"source (trie marginals)": (torch.cat(teacher_nll), None)}
    for spec in args.models:
        name, path = spec.split("=", 1)
        _, model = load_blt(path, torch.float32, torch.device("cpu"))
        model.eval()
        patcher = build_patcher(PatchingSpec(mode="entropy"), model)
        out, starts = [], []
        for (ids, labels, _), q in zip(batches, queries):
            lengths = patcher(ids)
            logits = model(input_ids=ids, patch_lengths=lengths, use_cache=False).logits.float()
            lp = F.log_softmax(logits[q.b, q.t], -1)
            out.append(-lp.gather(1, labels[q.b, q.t][:, None]).squeeze(1))
            first = torch.zeros_like(ids, dtype=torch.bool)  # position p starts a patch
            ends = lengths.cumsum(1)
            for b in range(ids.shape[0]):
                s = torch.cat([torch.zeros(1, dtype=torch.long), ends[b, :-1]])
                first[b, s[s < ids.shape[1]]] = True
            label_pos = (q.t + 1).clamp(max=ids.shape[1] - 1)  # the label of input t is the byte at t + 1
            starts.append(first[q.b, label_pos])
        nll[name] = (torch.cat(out), torch.cat(starts))
        del model
    depth = torch.cat([q.depth for q in queries])
    any_starts = next((s for _, s in nll.values() if s is not None), torch.zeros_like(depth, dtype=torch.bool))
    n = depth.numel()
    print(f"{n:,} bytes the teacher predicts ({len(docs)} held-out documents); bits per byte in each group "
          f"(share of the model's total bits); patch starts from the first BLT's patcher\n")
    names = list(nll)
    print("| group | share of bytes | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for g in GROUPS:
        rows_out = []
        for name in names:
            v, s = nll[name]
            mask = groups(depth, s if s is not None else any_starts)[g]
            bits = float(v[mask].sum()) / math.log(2)
            rows_out.append(f"{bits / max(int(mask.sum()), 1):.3f} ({bits / (float(v.sum()) / math.log(2)):.0%})")
        share = int(groups(depth, any_starts)[g].sum()) / n
        print(f"| {g} | {share:.1%} | " + " | ".join(rows_out) + " |")


if __name__ == "__main__":
    main()
