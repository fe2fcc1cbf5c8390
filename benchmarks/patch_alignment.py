"""How often the global transformer of a trained run reads a whole source token: under the
benchmark's causal entropy patcher, the share of held-out bytes whose patch is exactly one source
token, and of bytes whose decoder reads the global state of such a patch (the patch before the
label byte's), with bits per byte in each group under the run's own global states and under
another window's (``benchmarks/byteify_quality.py``'s reliance column, split).  The step-0 gate's
bound feeds the source one patch per source token; this says how far the trained model's patches
are from that.

The groups are not comparable causes: a patch that ends on a token boundary is followed by a
token's first byte, the hardest byte to predict, so the split describes, it does not attribute.

``--patches-only``: the shares alone, for any model directory or run with an entropy model
(e.g. another patcher), without the BLT's forward.

Usage: nice -n 5 .venv/bin/python benchmarks/patch_alignment.py --run /tmp/byteify-quality/runs/2qw64k-460kb-seed1
       [--patches-only]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LN2 = 0.6931471805599453


def token_starts(tok, table, doc: bytes) -> set[int]:
    """Byte offsets in ``doc`` where a source token starts, and its end."""
    from byteify.train.aligned import tokenize_document

    _, lens = tokenize_document(tok, doc, table)
    starts, at = {0}, 0
    for n in lens:
        at += n
        starts.add(at)
    return starts


def is_token(a: int, b: int, starts: set[int]) -> bool:
    """Whether doc bytes [a, b) are exactly one source token."""
    return a in starts and b in starts and not any(x in starts for x in range(a + 1, b))


@torch.no_grad()
def split(run: Path, final_bytes: int, seq_len: int = 1024, patches_only: bool = False) -> dict[str, list[float]]:
    """{group: [nats with its own global, nats with another window's, bytes]} (nats 0 with
    ``patches_only``)."""
    import byteify_quality as q
    from byteify.evaluate import _batches, frame, windows
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt, load_source_tokenizer
    from byteify.tokenizer import BOE_ID, IGNORE_INDEX, token_byte_strings

    model_dir = q.newest_model(run) if (run / "checkpoints").is_dir() else run
    _, model = load_blt(model_dir, torch.float32, torch.device("cpu"))
    model.eval()
    patcher = build_patcher(PatchingSpec(mode="entropy"), model)
    tok = load_source_tokenizer(model_dir)
    table = token_byte_strings(tok)
    rows, where = [], []  # windows as evaluate_blt cuts them; (window start in the frame, token starts, doc length)
    for doc in q.held_out_docs(final_bytes):
        starts = token_starts(tok, table, doc)
        for k, w in enumerate(windows(frame(doc), seq_len)):
            rows.append(w)
            where.append((k * seq_len, starts, len(doc)))
    other = {"on": False}
    hook = model.model.global_transformer.register_forward_hook(
        lambda mod, args, out: out.roll(1, dims=0) if other["on"] else out)
    groups: dict[str, list[float]] = {}
    try:
        for n, (ids, labels, real) in enumerate(_batches(rows, 8, BOE_ID)):
            lengths = patcher(ids)
            nll = [torch.zeros(labels.shape), torch.zeros(labels.shape)]
            for roll in () if patches_only else (False, True):
                other["on"] = roll
                logits = model(input_ids=ids, patch_lengths=lengths, use_cache=False).logits
                nll[roll] = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                            reduction="none")
            for r in range(ids.shape[0]):
                s, starts, n_doc = where[n * 8 + r]
                bounds = [0, *lengths[r].cumsum(0).tolist()]  # patch k: positions [bounds[k], bounds[k+1])
                # position i is frame index s + i, i.e. doc byte s + i - 1 (position 0 of a doc's frame: BOS)
                exact = [bounds[k] + s >= 1 and is_token(bounds[k] + s - 1, min(bounds[k + 1] + s - 1, n_doc), starts)
                         for k in range(len(bounds) - 1)]
                patch = torch.bucketize(torch.arange(ids.shape[1] + 1), torch.tensor(bounds[1:]), right=True).tolist()
                for i in range(int(real[r])):
                    if labels[r, i] == IGNORE_INDEX:
                        continue
                    own = min(patch[i + 1], len(exact) - 1)  # the label byte's patch; the decoder reads the one before
                    for key in (f"label byte's patch {'is' if exact[own] else 'is not'} one token",
                                f"patch the decoder reads {'is' if own >= 1 and exact[own - 1] else 'is not'} one token",
                                "all"):
                        g = groups.setdefault(key, [0.0, 0.0, 0])
                        g[0] += float(nll[0][r, i])
                        g[1] += float(nll[1][r, i])
                        g[2] += 1
    finally:
        hook.remove()
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run of benchmarks/byteify_quality.py")
    ap.add_argument("--final-bytes", type=int, default=32768)
    ap.add_argument("--patches-only", action="store_true", help="the shares alone (no BLT forward)")
    args = ap.parse_args()
    groups = split(args.run, args.final_bytes, patches_only=args.patches_only)
    total = groups["all"][2]
    print(f"{args.run.name}: held-out {total:,} bytes under its causal entropy patcher\n")
    if args.patches_only:
        print("| bytes | share |\n|---|---:|")
    else:
        print("| bytes | share | bits/byte, own global | another window's global | reliance |\n|---|---:|---:|---:|---:|")
    for key in sorted(groups, key=lambda k: (k == "all", k)):
        own, oth, n = groups[key]
        print(f"| {key} | {n / total:.1%} |" + ("" if args.patches_only else
              f" {own / n / LN2:.3f} | {oth / n / LN2:.3f} | {(oth - own) / n / LN2:+.3f} |"))


if __name__ == "__main__":
    main()
