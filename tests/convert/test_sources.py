"""Opening and validating source checkpoints (HF directories, sharded or not, and GGUF files)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from byteify.errors import ByteifyError
from byteify.convert.sources import open_source
from conftest import GGUF_SHAPES, HF_SHAPES, SHAPES
from helpers import hf_to_interleaved, llama_config, random_causal_lm, write_gguf


@pytest.mark.parametrize("name", HF_SHAPES + GGUF_SHAPES)
def test_open_source_reads_shape(sources, name):
    src = sources(name)
    spec = SHAPES[name]
    s = open_source(src.path)
    c = s.config
    assert s.format == ("gguf" if src.is_gguf else "hf")
    assert s.architecture == ("MistralForCausalLM" if spec.get("cls_name") == "mistral" else "LlamaForCausalLM")
    assert c.hidden_size == 64
    assert c.num_hidden_layers == spec.get("layers", 2)
    assert c.num_key_value_heads == spec.get("kv_heads", 4)
    assert s.tied_embeddings == spec.get("tied", False)
    assert s.dtype == spec.get("dtype", torch.float32)
    assert s.dims() == {"hidden": 64, "q_dim": 64, "kv_dim": 16 * spec.get("kv_heads", 4), "ffn": 96, "vocab": 96}
    n_side = 2 if s.tied_embeddings else 3
    assert len(list(s.layer_entries())) == 9 * c.num_hidden_layers
    assert len(list(s.side_entries())) == n_side


@pytest.mark.parametrize("name", ["legacy-llama3-json", "legacy-linear-json"])
def test_legacy_rope_config_is_understood(sources, name):
    s = open_source(sources(name).path)
    rope = dict(s.config.rope_parameters)
    assert rope["rope_type"] == SHAPES[name]["rope_parameters"]["rope_type"]
    assert rope["rope_theta"] == SHAPES[name]["legacy"]["rope_theta"]
    assert rope["factor"] == SHAPES[name]["legacy"]["rope_scaling"]["factor"]


def test_sharded_source_spans_several_files(sources):
    src = sources("sharded")
    s = open_source(src.path)
    assert (src.path / "model.safetensors.index.json").exists()
    assert len(s.files) >= 3
    ref = src.reference().state_dict()
    for name, _, _ in list(s.layer_entries()) + list(s.side_entries()):
        assert torch.equal(s.read(name), ref[name]), name


def test_read_returns_stored_tensor(sources):
    src = sources("gqa-untied-bf16")
    s = open_source(src.path)
    ref = src.reference().state_dict()
    t = s.read("model.layers.1.self_attn.k_proj.weight")
    assert t.dtype == torch.bfloat16 and t.shape == (32, 64)
    assert torch.equal(t.float(), ref["model.layers.1.self_attn.k_proj.weight"])


def test_gguf_read_is_llama_cpp_layout(sources):
    """GGUF tensors come back in llama.cpp's (interleaved) q/k layout, with torch shapes."""
    src = sources("gguf-tied-gqa")
    s = open_source(src.path)
    sd = src.memory_model.state_dict()
    q = s.read("blk.0.attn_q.weight")
    k = s.read("blk.0.attn_k.weight")
    assert q.shape == (64, 64) and k.shape == (32, 64)
    assert torch.equal(q, hf_to_interleaved(sd["model.layers.0.self_attn.q_proj.weight"], 4))
    assert torch.equal(k, hf_to_interleaved(sd["model.layers.0.self_attn.k_proj.weight"], 2))
    assert not torch.equal(k, sd["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(s.read("token_embd.weight"), sd["model.embed_tokens.weight"])
    # transformers' own GGUF reader (the verification reference) undoes the permutation
    hf = s.source_state_dict_hf_layout()
    assert torch.allclose(torch.as_tensor(hf["model.layers.0.self_attn.k_proj.weight"]),
                          sd["model.layers.0.self_attn.k_proj.weight"])


def test_gguf_tokenizer_metadata_is_loaded(sources):
    s = open_source(sources("gguf-tied-gqa").path)
    tok = s.load_tokenizer()
    assert tok is not None and len(tok) == 96


def test_gguf_without_tokenizer_opens(tmp_path):
    model = random_causal_lm(llama_config(kv_heads=2, tied=True))
    s = open_source(write_gguf(model, tmp_path / "bare.gguf", with_tokenizer=False))
    assert s.config.vocab_size == 96
    assert s.load_tokenizer() is None


# ---- bad input, at the library level (the CLI tests check exit codes and leftovers) ------------
def _copy(src_path, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(src_path, dst)
    return dst


def test_missing_tensor_in_index_shard(sources, tmp_path):
    d = _copy(sources("sharded").path, tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    other = next(s for s in idx["weight_map"].values() if s != shard)
    idx["weight_map"]["model.layers.0.mlp.up_proj.weight"] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ByteifyError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*not in that shard"):
        open_source(d)


def test_invalid_index_json(sources, tmp_path):
    d = _copy(sources("sharded").path, tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ByteifyError, match="model.safetensors.index.json"):
        open_source(d)


def test_bin_only_directory_gets_a_hint(sources, tmp_path):
    d = _copy(sources("mha-untied-fp32").path, tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ByteifyError, match="pytorch_model.bin"):
        open_source(d)


def test_layer_tensor_missing(sources, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(sources("mha-untied-fp32").path, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.self_attn.v_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ByteifyError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight' missing"):
        open_source(d)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    with pytest.raises(ByteifyError, match="not a .gguf file"):
        open_source(f)


def test_truncated_gguf(sources, tmp_path):
    data = sources("gguf-tied-gqa").path.read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ByteifyError, match="cut.gguf"):
        open_source(f)


def test_gguf_wrong_shape(tmp_path):
    model = random_causal_lm(llama_config(kv_heads=2))
    f = write_gguf(model, tmp_path / "bad.gguf", reshape={"blk.1.ffn_up.weight": torch.zeros(80, 64)})
    with pytest.raises(ByteifyError, match=r"blk\.1\.ffn_up\.weight.*\[80, 64\].*GGUF metadata implies \[96, 64\]"):
        open_source(f)


def test_gguf_missing_tensor(tmp_path):
    model = random_causal_lm(llama_config())
    f = write_gguf(model, tmp_path / "bad.gguf", drop=("blk.0.attn_v.weight",))
    with pytest.raises(ByteifyError, match=r"blk\.0\.attn_v\.weight' missing"):
        open_source(f)


def test_gguf_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ByteifyError, match="GGUF architecture 'gpt2' is not supported"):
        open_source(tmp_path / "gpt2.gguf")


@pytest.mark.parametrize("key,value,match", [
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("head_dim", 32, "head_dim 32"),
])
def test_unsupported_llama_variants(sources, tmp_path, key, value, match):
    d = _copy(sources("mha-untied-fp32").path, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ByteifyError, match=match):
        open_source(d)


@pytest.mark.parametrize("name", ["mha-untied-fp32", "gguf-untied-mha"])
def test_read_rows_concatenate_to_the_tensor(sources, name):
    s = open_source(sources(name).path)
    src_name = next(n for n, side, _ in s.side_entries() if side == "embed_tokens.weight")
    blocks = list(s.read_rows(src_name, rows=7))
    assert len(blocks) > 1 and all(b.shape[0] <= 7 for b in blocks)
    assert torch.equal(torch.cat(blocks), s.read(src_name))
