"""The parts of transformers' ``BltForCausalLM`` that byteify freezes, trains, counts and shards
separately, and which part a parameter name belongs to (through peft, FSDP and compile wrappers)."""

from __future__ import annotations

PARTS = ("local_encoder", "hash_embeddings", "global", "local_decoder", "entropy_model")
HASH_TABLE = "model.encoder_hash_tok_embedding.weight"
_WRAPPERS = ("model.model.", "model.lm_head", "model.base_model.", "base_model.model.", "_orig_mod.")
_PREFIXES = (
    ("model.encoder_hash_tok_embedding", "hash_embeddings"),
    ("model.local_encoder", "local_encoder"),
    ("model.global_transformer", "global"),
    ("model.local_decoder", "local_decoder"),
    ("lm_head", "local_decoder"),
    ("model.patcher", "entropy_model"),
)


def part_of(name: str) -> str:
    """``model.local_encoder.layers.0.mlp.up_proj.weight`` -> ``local_encoder``; KeyError otherwise."""
    n = name.replace("._checkpoint_wrapped_module", "").replace("._fsdp_wrapped_module", "")
    while n.startswith(_WRAPPERS):
        n = n.removeprefix("base_model.model.") if n.startswith("base_model.model.") else n.split(".", 1)[1]
    for prefix, part in _PREFIXES:
        if n.startswith(prefix):
            return part
    raise KeyError(name)


def plain_name(fqn: str) -> str | None:
    """A training module's parameter name (``TrainModule`` -> peft -> BLT) as the plain
    ``BltForCausalLM`` name; None for a LoRA tensor (see :func:`adapter_key`)."""
    n = fqn.removeprefix("model.").removeprefix("base_model.model.")
    return None if ".lora_" in n else n.replace(".base_layer.", ".")


def adapter_key(fqn: str) -> str:
    """A LoRA tensor's name as peft saves it in ``adapter_model.safetensors``."""
    n = fqn.removeprefix("model.")
    return n.replace(".default.", ".") if n.startswith("base_model.model.") else "base_model.model." + n.replace(".default.", ".")
