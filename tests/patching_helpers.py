"""Shared pieces of the patching, calibration and viewer tests: a tiny converted BLT whose entropy
model has spread-out entropies (random weights scaled up), and a tiny byte-level BPE source
tokenizer trained on the embedded corpus, saved where ``byteify convert`` keeps the source's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from byteify.convert.warmstart import one_thread  # noqa: F401  (re-exported for the tests)
from helpers import make_hf_source

PATCHER_SCALE = 8.0  # random entropy-model weights x this: entropies spread over ~0..3 nats


def corpus_texts(n: int = 40, offset: int = 0) -> list[str]:
    from byteify.data.corpus import pydoc_topic_documents

    return [t for _, t in pydoc_topic_documents()[offset: offset + n]]


def make_source_tokenizer(out: Path, vocab_size: int = 600) -> Path:
    """A fast byte-level BPE (GPT-2 style offsets) trained on corpus text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"], show_progress=False)
    tok.train_from_iterator(corpus_texts(60), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(str(out))
    return out


def make_tiny_blt(root: Path, *, tokenizer: bool = True, patcher_scale: float = PATCHER_SCALE) -> Path:
    """``byteify convert`` of a tiny random Llama (tiny preset), entropy model weights scaled up."""
    from byteify.convert.presets import load_spec
    from byteify.convert.sources import open_source
    from byteify.convert.transplant import convert

    root.mkdir(parents=True, exist_ok=True)
    src = make_hf_source(root / "src", layers=2, heads=4, kv_heads=2, vocab=300)
    out = root / "blt"
    convert(open_source(src), out, load_spec("tiny"), progress=False, log=lambda m: None)
    sd = load_file(str(out / "model.safetensors"))
    for k in sd:
        if k.startswith("model.patcher.") and sd[k].ndim > 1:
            sd[k] = sd[k] * patcher_scale
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        make_source_tokenizer(out / "byteify_source" / "tokenizer")
    return out


def tiny_patcher_model(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A stand-alone random BltPatcher (fp32, eval) with spread-out entropies."""
    from transformers import BltConfig
    from transformers.models.blt.modeling_blt import BltPatcher

    cfg = BltConfig(patcher_config={"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                                    "intermediate_size": 64, "sliding_window": 64, "max_position_embeddings": 1024,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    torch.manual_seed(seed)
    model = BltPatcher(cfg.patcher_config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(PATCHER_SCALE)
    return model


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
