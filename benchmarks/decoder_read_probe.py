"""How far a *written* local decoder goes: the best linear read of what the decoder of a converted
BLT is given at step 0, before any training (issue 12, item 4: "warm the decoder as far as it goes").

The stock decoder's cross-attention gives every byte exactly one key per patch (``cross_attn_k = 1``,
the warm presets), so its output is ``o_proj v_proj k_norm(P g_j)`` whatever the query: with ``P``,
``v_proj`` the identity, ``k_norm``'s weight the source's final-norm weight and the decoder
layers' residual branches zero, the decoder's features at byte i are ``rmsnorm(2 e_i + a u_j)``:
``e_i`` the encoder's byte state (the decoder's input; the cross-attention doubles it), ``u_j``
the source's final-normed state of the patch that byte i reads (the transplanted global's output
on the warm encoder's patch vectors: what the source's LM head reads), ``a`` a scale.  The LM head
is then fitted by softmax regression (L-BFGS, full batch) on the step-0 features of ``--train-bytes``
of training text, and scored on the benchmark's held-out 32 KB.  Rows: ``e`` alone (a linear
n-gram model of the warm byte states), ``u`` alone (the global's state read linearly: the next
token's first byte, nothing of the bytes already in the patch), their sum at several ``a``, and
both side by side (two heads, the upper end of any linear read).

The model is ``benchmarks/byteify_quality.py``'s starting model of row 2q (``--preset warm-16k``
with the shared boundary-trained causal patcher), so it runs after that benchmark has built it.

Usage: nice -n 5 .venv/bin/python benchmarks/decoder_read_probe.py [--start /tmp/byteify-quality/start-2q]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


@torch.no_grad()
def step0_features(model, patcher, final_norm: torch.Tensor, docs):
    """(e [N, d], u [N, d], next-byte labels [N]) at every predicted byte of ``docs``."""
    from byteify.evaluate import _batches, frame, windows
    from byteify.tokenizer import BOE_ID, IGNORE_INDEX

    dec = model.model.local_decoder
    captured = {}
    hook = dec.cross_attn_layers[0].register_forward_pre_hook(
        lambda mod, args, kw: captured.update(h=kw["hidden_states"], g=kw["cross_attention_states"],
                                              mask=kw["attention_mask"]), with_kwargs=True)
    rows = [w for d in docs for w in windows(frame(d), 1024)]
    E, U, Y = [], [], []
    try:
        for ids, labels, _ in _batches(rows, 8, BOE_ID):  # byteify eval's batches
            model(input_ids=ids, patch_lengths=patcher(ids), use_cache=False)
            mask = captured["mask"]
            allowed = mask if mask.dtype == torch.bool else mask == 0
            patch = allowed[:, 0].float().argmax(-1)  # the one patch each byte reads
            u = final_norm * rms(captured["g"])
            u = torch.gather(u, 1, patch[..., None].expand(-1, -1, u.shape[-1]))
            keep = labels != IGNORE_INDEX
            E.append(captured["h"][keep])
            U.append(u[keep])
            Y.append(labels[keep])
    finally:
        hook.remove()
    return torch.cat(E), torch.cat(U), torch.cat(Y)


def fit_head(x_train, y_train, x_val, y_val, iters: int = 60) -> tuple[float, float]:
    """(train, held-out) bits per byte of the softmax-regression head fitted on ``x_train``."""
    w = torch.zeros(x_train.shape[1], 260, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ w, y_train)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (float(F.cross_entropy(x_train @ w, y_train)) / math.log(2),
                float(F.cross_entropy(x_val @ w, y_val)) / math.log(2))


def main():
    import byteify_quality as q

    from byteify.convert.warmstart import training_documents
    from byteify.patching.patchers import build_patcher
    from byteify.patching.spec import PatchingSpec
    from byteify.resolve import load_blt
    from byteify.train.teacher import load_teacher

    ap = argparse.ArgumentParser()
    ap.add_argument("--start", default="/tmp/byteify-quality/start-2q")
    ap.add_argument("--train-bytes", type=int, default=65536)
    ap.add_argument("--final-bytes", type=int, default=32768)
    args = ap.parse_args()
    t0 = time.perf_counter()
    _, model = load_blt(args.start, torch.float32, torch.device("cpu"))
    model.eval()
    cfg = model.config
    if cfg.cross_attn_k != 1:
        raise SystemExit(f"{args.start}: cross_attn_k {cfg.cross_attn_k}; the probe needs 1 (the warm presets)")
    patcher = build_patcher(PatchingSpec(mode="entropy"), model)
    final_norm = load_teacher(args.start).model.norm.weight.detach().float()
    dec = model.model.local_decoder
    dec.patch_embedding_projection.weight.data = torch.eye(cfg.decoder_config.hidden_size, cfg.global_config.hidden_size)
    train = q.first_bytes(training_documents(), args.train_bytes)
    e_tr, u_tr, y_tr = step0_features(model, patcher, final_norm, train)
    e_va, u_va, y_va = step0_features(model, patcher, final_norm, q.held_out_docs(args.final_bytes))
    scale = 2 * float(e_tr.pow(2).mean().sqrt()) / float(u_tr.pow(2).mean().sqrt())  # a = 1: 2e and a u equal RMS
    rows = {"e alone (the encoder's byte states)": (rms(e_tr), rms(e_va)),
            "u alone (the transplanted global's state)": (rms(u_tr), rms(u_va))}
    for a in (0.5, 1.0, 2.0, 4.0):
        rows[f"rmsnorm(2e + a u), a = {a:g} (the stock decoder's features)"] = (
            rms(2 * e_tr + a * scale * u_tr), rms(2 * e_va + a * scale * u_va))
    rows["[e, u] side by side (two heads: any linear read)"] = (
        torch.cat([rms(e_tr), rms(u_tr)], -1), torch.cat([rms(e_va), rms(u_va)], -1))
    print(f"Step-0 linear read of {args.start}: head fitted on {len(y_tr):,} training bytes, "
          f"scored on {len(y_va):,} held-out bytes\n")
    print("| features | train bits/byte | held-out bits/byte |\n|---|---:|---:|")
    for name, (x_tr, x_va) in rows.items():
        tr, va = fit_head(x_tr, y_tr, x_va, y_va)
        print(f"| {name} | {tr:.3f} | {va:.3f} |", flush=True)
    print(f"\n({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
