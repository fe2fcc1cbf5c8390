"""Conversion: the transplanted global transformer reproduces the source, checked independently of
byteify (source model through transformers vs the BLT loaded with plain AutoModelForCausalLM)."""

from __future__ import annotations

import hashlib
import json
import re
import weakref

import pytest
import safetensors
import torch
import transformers
from safetensors import safe_open

import byteify.convert.transplant as conversion
from byteify.convert.transplant import ShardWriter, convert
from byteify.errors import ByteifyError
from byteify.parts import part_of
from byteify.convert.sources import SourceCheckpoint, open_source
from conftest import GGUF_SHAPES, HF_SHAPES, SHAPES
from helpers import leftovers, load_blt, random_causal_lm, safetensors_header, smollm2_gguf, transplant_rel_diff

TOL = 1e-4


def _tensors(out) -> dict[str, torch.Tensor]:
    res = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            res.update({k: h.get_tensor(k) for k in h.keys()})
    return res


@pytest.mark.parametrize("name", HF_SHAPES + GGUF_SHAPES)
def test_transplant_reproduces_source_hidden_states(converted, name):
    src, out, report = converted(name)
    assert report.verification is not None and report.verification.passed
    assert report.verification.max_rel <= TOL
    diff = transplant_rel_diff(src.reference(), out)
    assert diff <= TOL, f"{name}: max|a-b|/max|a| = {diff:.2e}"


@pytest.mark.parametrize("name", ["llama3-rope", "legacy-llama3-json", "legacy-linear-json"])
def test_scaled_rope_is_carried_over(converted, name):
    """The BLT's global rotary frequencies are the source's scaled ones, not the default ones
    (so the hidden-state check above really exercises the scaling)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    src, out, _ = converted(name)
    blt = load_blt(out)
    want = SHAPES[name]["rope_parameters"]
    assert blt.config.global_config.rope_parameters["rope_type"] == want["rope_type"]
    ref_freq = src.reference().model.rotary_emb.inv_freq
    blt_freq = blt.model.global_transformer.rotary_emb.inv_freq
    torch.testing.assert_close(blt_freq, ref_freq)
    cfg = src.reference().config.__class__.from_dict(src.reference().config.to_dict())
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": want["rope_theta"]}
    assert not torch.allclose(LlamaRotaryEmbedding(cfg).inv_freq, blt_freq)


def test_naive_copy_without_rope_permutation_fails_verification(sources, tiny_spec, tmp_path, monkeypatch):
    src = sources("gqa-untied-bf16")
    monkeypatch.setitem(conversion.TRANSFORMS, "rope_to_interleaved", lambda w, n: w)
    out = tmp_path / "naive"
    with pytest.raises(ByteifyError, match="verification failed"):
        convert(open_source(src.path), out, tiny_spec, progress=False, log=lambda m: None)
    assert leftovers(out) == []
    # Written anyway (no verify), the naive copy is far off under the independent check too.
    convert(open_source(src.path), out, tiny_spec, progress=False, verify=False)
    assert transplant_rel_diff(src.reference(), out) > 1e-2


def test_independent_check_is_sensitive_to_one_layer(converted, tmp_path):
    """Corrupting a single norm weight of the output is visible to the reference comparison."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, out, _ = converted("mha-untied-fp32")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.global_transformer.layers.1.post_attention_layernorm.weight"][3] += 0.5
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert transplant_rel_diff(src.reference(), bad) > 1e-3


@pytest.mark.parametrize("name", ["gqa-tied-fp32", "gguf-untied-mha"])
def test_output_loads_with_stock_transformers_and_trains(converted, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = converted(name)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(model).__name__ == "BltForCausalLM"
    assert model.config.vocab_size == 260 == len(tok)
    batch = tok(["The quick brown fox jumps over the lazy dog.", "Bytes \x00\xff ok"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    res = model(input_ids=batch["input_ids"], labels=labels)
    assert res.logits.shape == (*batch["input_ids"].shape, 260)
    assert torch.isfinite(res.loss) and 2.0 < res.loss.item() < 20.0
    res.loss.backward()
    g = model.model.global_transformer.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_bf16_output(sources, tiny_spec, tmp_path):
    src = sources("mha-untied-fp32")
    out = tmp_path / "bf16"
    report = convert(open_source(src.path), out, tiny_spec, dtype="bf16", progress=False, log=lambda m: None)
    assert report.verification.passed
    header = safetensors_header(out / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    side = safetensors_header(out / "byteify_source" / "source_weights.safetensors")
    assert {v["dtype"] for k, v in side.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # Against the source rounded to bf16 the transplant is exact up to fp32 arithmetic ...
    ref = random_causal_lm(src.reference().config)
    ref.load_state_dict({k: v.bfloat16().float() for k, v in src.reference().state_dict().items()})
    assert transplant_rel_diff(ref, out) <= TOL
    # ... and against the fp32 source it is off by bf16 rounding, which the check can see.
    assert transplant_rel_diff(src.reference(), out) > TOL


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_disk_space_estimate_and_refusal(sources, tiny_spec, tmp_path, monkeypatch, dtype):
    """The conversion measures what it will write before writing: the weight bytes exactly (the
    headers go in a 64 MiB allowance), and a file system with less room is refused before any byte lands."""
    src = sources("mha-untied-fp32")
    seen = []
    check = conversion._check_disk_space
    monkeypatch.setattr(conversion, "_check_disk_space",
                        lambda out, tmp, need: (seen.append(need), check(out, tmp, need)))
    out = tmp_path / "ok"
    convert(open_source(src.path), out, tiny_spec, dtype=dtype, progress=False, verify=False)
    written = sum(e["data_offsets"][1] - e["data_offsets"][0] for f in out.rglob("*.safetensors")
                  for k, e in safetensors_header(f).items() if k != "__metadata__")
    assert seen == [written]

    monkeypatch.setattr(conversion.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 << 20})())
    refused = tmp_path / "full"
    want = (f"{refused}: not enough disk space for the conversion: "
            f"it writes {seen[0] / 2**20:,.1f} MiB of weights, 10.0 MiB free")
    with pytest.raises(ByteifyError, match=re.escape(want)):
        convert(open_source(src.path), refused, tiny_spec, dtype=dtype, progress=False, verify=False)
    assert leftovers(refused) == []


def test_seed_reproducibility(sources, tiny_spec, tmp_path):
    s = open_source(sources("gqa-tied-fp32").path)
    outs = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        outs[tag] = tmp_path / tag
        convert(s, outs[tag], tiny_spec, seed=seed, progress=False, verify=False)
    a, b, c = (_tensors(outs[t]) for t in "abc")
    assert (outs["a"] / "model.safetensors").read_bytes() == (outs["b"] / "model.safetensors").read_bytes()
    fresh = [k for k in a if part_of(k) != "global"]
    assert fresh and a.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differing = [k for k in fresh if not torch.equal(a[k], c[k])]
    # every randomly initialised tensor differs between seeds (norm weights are ones in both)
    assert len(differing) >= len([k for k in fresh if not k.endswith("norm.weight")]) * 0.9
    assert all(torch.equal(a[k], c[k]) for k in a if part_of(k) == "global")


def test_max_shard_size_writes_index_that_loads(sources, tiny_spec, tmp_path, converted):
    from transformers import AutoModelForCausalLM

    src, single, _ = converted("gqa-tied-fp32")
    out = tmp_path / "sharded"
    report = convert(open_source(src.path), out, tiny_spec, max_shard_size="200KB", progress=False, log=lambda m: None)
    assert report.verification.passed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    for p in shards:
        data = {k: v for k, v in safetensors_header(p).items() if k != "__metadata__"}
        size = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in data.values())
        assert size <= 200 * 1024 or len(data) == 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    want = _tensors(single)
    got = model.state_dict()
    assert set(got) >= set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["mha-untied-fp32", "gqa-tied-fp32", "gguf-untied-mha"])
def test_side_files(converted, name):
    src, out, _ = converted(name)
    tied = SHAPES[name].get("tied", False)
    with safe_open(str(out / "byteify_source" / "source_weights.safetensors"), framework="pt") as f:
        side = {k: f.get_tensor(k) for k in f.keys()}
    expected = {"embed_tokens.weight", "norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert set(side) == expected
    ref = src.reference().state_dict()
    assert torch.equal(side["embed_tokens.weight"], ref["model.embed_tokens.weight"])
    assert torch.equal(side["norm.weight"], ref["model.norm.weight"])
    if not tied:
        assert torch.equal(side["lm_head.weight"], ref["lm_head.weight"])
    side_cfg = json.loads((out / "byteify_source" / "config.json").read_text())
    assert side_cfg["tie_word_embeddings"] is tied and side_cfg["hidden_size"] == 64

    meta = json.loads((out / "byteify.json").read_text())
    files = meta["source"]["files"]
    assert len(files) >= 1
    rel, digest = next(iter(files.items()))
    path = src.path if src.is_gguf else src.path / rel
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__,
                                "safetensors": safetensors.__version__}
    layers = meta["tensor_map"]["layers"]
    q_name = "blk.{i}.attn_q.weight" if src.is_gguf else "model.layers.{i}.self_attn.q_proj.weight"
    assert layers[q_name]["to"] == "model.global_transformer.layers.{i}.self_attn.q_proj.weight"
    assert layers[q_name]["transform"] == (None if src.is_gguf else ["rope_to_interleaved", "num_attention_heads"])
    assert len(layers) == 9 and len(meta["tensor_map"]["side"]) == len(expected)


def test_sharded_source_metadata_hashes_every_shard(converted):
    src, out, _ = converted("sharded")
    files = json.loads((out / "byteify.json").read_text())["source"]["files"]
    shards = sorted(p.name for p in src.path.glob("model-*.safetensors"))
    assert sorted(files) == shards
    for rel, digest in files.items():
        assert digest == hashlib.sha256((src.path / rel).read_bytes()).hexdigest()


def test_convert_streams_one_source_tensor_at_a_time(sources, tiny_spec, tmp_path, monkeypatch):
    """No more than one tensor (or row block of an embedding table) read from the source is alive
    at any moment while writing, and the verification holds at most one layer."""
    live: set[int] = set()
    peak = {"n": 0, "reads": 0, "row_reads": set()}
    read, read_rows = SourceCheckpoint.read, SourceCheckpoint.read_rows

    def track(t):
        peak["reads"] += 1
        live.add(peak["reads"])
        weakref.finalize(t, live.discard, peak["reads"])
        peak["n"] = max(peak["n"], len(live))

    def tracking_read(self, name):
        t = read(self, name)
        track(t)
        return t

    def tracking_read_rows(self, name, rows=4096):
        peak["row_reads"].add(name)
        for block in read_rows(self, name, rows=2):  # many blocks even for tiny tables
            if self.format == "hf":  # GGUF blocks are views of one dequantized read(), tracked there
                track(block)
            yield block
            del block

    monkeypatch.setattr(SourceCheckpoint, "read", tracking_read)
    monkeypatch.setattr(SourceCheckpoint, "read_rows", tracking_read_rows)
    for name in ("mha-untied-fp32", "gguf-untied-mha"):  # untied: every layer tensor + 3 side tensors
        s = open_source(sources(name).path)
        side = {n for n, _, _ in s.side_entries()}
        peak.update(n=0, reads=0, row_reads=set())
        convert(s, tmp_path / name, tiny_spec, progress=False, verify=False)
        assert peak["row_reads"] == side  # side tensors (embeddings, head, norm) in row blocks
        n_tensors = len(list(s.layer_entries())) + len(side)
        if s.format == "hf":  # every side tensor in several row blocks
            assert peak["reads"] > n_tensors
        else:  # GGUF: each tensor dequantised exactly once (the embeddings too, RMS tallied on the way)
            assert peak["reads"] == n_tensors
        assert peak["n"] == 1, f"{name}: {peak['n']} source tensors alive at once"
    peak.update(n=0, reads=0)
    convert(open_source(sources("mha-untied-fp32").path), tmp_path / "v", tiny_spec, progress=False, log=lambda m: None)
    assert 1 < peak["n"] <= 9  # one layer's 9 tensors


def test_shard_writer_header_overflow_rewrites(tmp_path):
    """Every dtype round-trips, and a shard with more tensors than the reserved header room holds
    is still a valid file."""
    from safetensors.torch import load_file

    w = ShardWriter(tmp_path, 1 << 30, header_reserve=64)
    tensors = {f"t.{i}": torch.arange(i + 1, dtype=torch.float32) * i for i in range(20)}
    tensors["b"] = torch.ones(3, 2, dtype=torch.bfloat16)
    tensors["h"] = torch.randn(2, 5).half()
    tensors["step"] = torch.tensor(12345678901, dtype=torch.int64)
    tensors["mask"] = torch.tensor([True, False, True])
    tensors["f8"] = torch.randn(4).to(torch.float8_e4m3fn)
    tensors["empty"] = torch.zeros(0, 3)
    for k, v in tensors.items():
        w.add(k, v)
    assert w.close() == ["model.safetensors"]
    got = load_file(str(tmp_path / "model.safetensors"))
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_mistral_sliding_window_warns(sources, tiny_spec, tmp_path):
    import shutil

    d = tmp_path / "mistral-sw"
    shutil.copytree(sources("mistral").path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    report = convert(open_source(d), tmp_path / "out", tiny_spec, progress=False, log=lambda m: None)
    assert any("sliding window" in w for w in report.warnings)
    assert report.verification.passed


# ---- the real checkpoint -------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_gguf(tmp_path):
    """SmolLM2-135M (Q4_1 GGUF): converts with verification, loads with stock transformers, gives a
    finite loss, and matches transformers' own reading of the GGUF under the independent check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from byteify.convert.presets import load_spec

    gguf = smollm2_gguf()
    out = tmp_path / "smollm2-blt"
    report = convert(open_source(gguf), out, load_spec("auto"), progress=False, log=lambda m: None)
    assert report.verification.passed and report.verification.max_rel <= TOL
    assert len(report.verification.per_layer_rel) == 30

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    batch = tok(["The capital of France is Paris.", "def f(x):\n    return x + 1\n"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], labels=labels).loss
    assert torch.isfinite(loss)
    del model

    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    src_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = src_tok("Byte Latent Transformers read bytes, not tokens.", return_tensors="pt").input_ids
    assert transplant_rel_diff(source.eval(), out, ids) <= TOL


def test_shard_writer_chunks_round_trip_and_size_check(tmp_path):
    from safetensors.torch import load_file

    w = ShardWriter(tmp_path, 1 << 30)
    table = torch.randn(10, 3).to(torch.bfloat16)
    w.add_chunks("table", (10, 3), torch.bfloat16, iter(table.split(4)))
    w.add("bias", torch.ones(3))
    with pytest.raises(ValueError, match="short: 24 bytes written for shape \\[5, 3\\] \\(30 expected\\)"):
        w.add_chunks("short", (5, 3), torch.bfloat16, iter([table[:4]]))
    with pytest.raises(ValueError, match="float32, expected torch.bfloat16"):
        w.add_chunks("mixed", (2, 3), torch.bfloat16, iter([torch.zeros(2, 3)]))
    w.close()
    got = load_file(str(tmp_path / "model.safetensors"))  # the failed tensors left no bytes behind
    assert got.keys() == {"table", "bias"}
    assert torch.equal(got["table"], table) and torch.equal(got["bias"], torch.ones(3))
