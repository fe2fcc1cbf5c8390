"""Fresh parts: the streamed BLT init is reproducible, the rejection-sampled truncated
normal has torch's distribution, and the encoder's outputs come out at the source embeddings' scale."""

from __future__ import annotations

import torch

from byteify.convert.transplant import build_blt_config, convert
from byteify.parts import HASH_TABLE
from byteify.convert.fresh import fresh_parts, patch_output_rms, trunc_normal_by_rejection_
from byteify.convert.presets import load_spec
from byteify.convert.sources import open_source
from helpers import load_blt


def test_trunc_normal_by_rejection_matches_torch_distribution():
    g = torch.Generator().manual_seed(0)
    fast = trunc_normal_by_rejection_(torch.empty(400_000), mean=0.1, std=0.5, a=-0.8, b=1.0, generator=g)
    ref = torch.nn.init.trunc_normal_(torch.empty(400_000), mean=0.1, std=0.5, a=-0.8, b=1.0,
                                      generator=torch.Generator().manual_seed(1))
    assert float(fast.min()) >= -0.8 and float(fast.max()) <= 1.0
    assert abs(float(fast.mean()) - float(ref.mean())) < 0.005
    assert abs(float(fast.std()) / float(ref.std()) - 1) < 0.01
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert torch.allclose(fast.quantile(qs), ref.quantile(qs), atol=0.01)
    again = trunc_normal_by_rejection_(torch.empty(400_000), mean=0.1, std=0.5, a=-0.8, b=1.0,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, again)
    # a window far in the tail keeps little mass: torch's inverse-CDF method, still inside [a, b]
    tail = trunc_normal_by_rejection_(torch.empty(1000), mean=0.0, std=1.0, a=1.0, b=2.0)
    assert float(tail.min()) >= 1.0 and float(tail.max()) <= 2.0


def test_fresh_parts_are_reproducible_and_draw_distinct_blocks(sources, tiny_spec):
    """Streamed fresh parts, gathered: the same seed gives the same tensors in every dtype (bf16
    the rounding of fp32), and the hash table's row blocks are distinct draws (an fp32 stream
    once handed out one reused buffer)."""
    config, _ = build_blt_config(open_source(sources("mha-untied-fp32").path), tiny_spec)

    def gathered(seed, dtype):
        return {n: torch.cat(list(c)).reshape(shape) for n, shape, c in fresh_parts(config, seed, dtype, rows=100)}

    fp32, bf16 = gathered(3, torch.float32), gathered(3, torch.bfloat16)
    assert fp32.keys() == bf16.keys() and HASH_TABLE in fp32
    assert all(torch.equal(fp32[k], gathered(3, torch.float32)[k]) for k in fp32)
    assert all(torch.equal(fp32[k].to(torch.bfloat16), bf16[k]) for k in fp32)
    table = fp32[HASH_TABLE]
    assert not torch.equal(table[:100], table[100:200])
    assert not torch.equal(table, gathered(4, torch.float32)[HASH_TABLE])


def test_encoder_output_scale_matches_source_embeddings(sources, tmp_path):
    """The fresh encoder's patch outputs (the transplanted layers' inputs) come out at the source
    embeddings' RMS (within 10%), where BLT's own init puts them several times off."""
    src = sources("mha-untied-fp32")
    emb = src.reference().model.embed_tokens.weight.detach()
    target = float(emb.pow(2).mean().sqrt())
    ratios = {}
    for match in (True, False):
        spec = load_spec("tiny", [f"match_embedding_scale={str(match).lower()}"])
        out = tmp_path / f"m{match}"
        convert(open_source(src.path), out, spec, progress=False, verify=False)
        blt = load_blt(out)
        ratios[match] = patch_output_rms(blt, n_bytes=2048) / target
    assert abs(ratios[True] - 1) < 0.1, ratios
    assert not 0.5 < ratios[False] < 2, ratios
