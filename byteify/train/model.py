"""The model a training stage optimises: the BLT wrapped so that one root forward computes a
stage's losses (what FSDP2 needs), the stage's freezing and LoRA, merging LoRA back at the end of
its stage, and the BLT forward split around its global transformer (for distillation, which
feeds the local decoder the teacher's states instead of the global transformer's)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ByteifyError
from ..parts import PARTS, part_of
from ..tokenizer import IGNORE_INDEX
from .recipe import StageSpec


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-id cross-entropy (nats) over labels that are not :data:`IGNORE_INDEX`."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def blt_forward(blt, input_ids: torch.Tensor, patch_lengths: torch.Tensor, global_fn=None) -> torch.Tensor:
    """``BltForCausalLM`` logits computed piece by piece, as transformers' ``BltModel.forward``
    does without a cache, with ``global_fn(patch_embeds)`` standing in for the global transformer
    when given (equality with the stock forward is tested)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.blt.modeling_blt import _prepare_patch_cross_attention_mask, compute_hash_embeddings

    m, cfg = blt.model, blt.config
    B, T = input_ids.shape
    P = patch_lengths.shape[1]
    embeds = compute_hash_embeddings(input_ids, m.local_encoder, m.encoder_hash_tok_embedding,
                                     cfg.encoder_hash_byte_group_nb_functions, cfg.encoder_hash_byte_group_size,
                                     cfg.encoder_hash_byte_group_vocab)
    patch_ids = m._patch_ids_from_lengths(patch_lengths, T)
    position_ids = torch.arange(T, device=input_ids.device)[None]
    mask_fn = create_causal_mask if cfg.local_attention_window_len is None else create_sliding_window_causal_mask
    causal = mask_fn(config=cfg.encoder_config, inputs_embeds=embeds, attention_mask=None, cache=None,
                     position_ids=position_ids)
    enc_mask = _prepare_patch_cross_attention_mask(patch_ids=patch_ids, num_patches=P, sequence_length=T,
                                                   patches_as_queries=True, cross_attn_k=cfg.cross_attn_k,
                                                   dtype=embeds.dtype)
    hidden, cross = m.local_encoder(input_ids=input_ids, inputs_embeds=embeds, attention_mask=causal,
                                    position_ids=position_ids, encoder_attention_mask=enc_mask, num_patches=P,
                                    patch_ids=patch_ids)
    cross = cross.view(B, P, -1)
    if global_fn is None:
        g_mask = create_causal_mask(config=cfg, inputs_embeds=cross, attention_mask=None, cache=None, position_ids=None)
        global_states = m.global_transformer(inputs_embeds=cross, attention_mask=g_mask,
                                             position_ids=torch.arange(P, device=cross.device)[None])
    else:
        global_states = global_fn(cross)
    dec_ids = m._patch_ids_from_lengths(patch_lengths[:, 1:], T)
    dec_mask = _prepare_patch_cross_attention_mask(patch_ids=dec_ids, num_patches=P, sequence_length=T,
                                                   patches_as_queries=False, cross_attn_k=cfg.cross_attn_k,
                                                   dtype=embeds.dtype)
    out = m.local_decoder(input_ids=input_ids, inputs_embeds=hidden, patch_embeds=global_states,
                          attention_mask=causal, position_ids=position_ids, encoder_attention_mask=dec_mask)
    return blt.lm_head(out)


class TrainModule(nn.Module):
    """The BLT (possibly peft-wrapped) under one root module: ``forward`` returns the summed
    losses a stage trains on, so FSDP2 sees one root forward per micro-step.

    * byte stages: ``forward(ids, labels, patcher=..., entropy_loss=...)`` -> (BLT nats,
      entropy-model nats); the patch lengths come from ``patcher(ids)`` without gradients (inside
      the root forward, as FSDP2 wants every unit to be), ``patcher`` None skips the BLT loss (an
      entropy-model-only stage);
    * distillation: ``forward(..., distill=fn)`` runs ``fn(self.blt)`` inside the root forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def blt(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids, labels, patcher=None, entropy_loss=False, distill=None):
        if distill is not None:
            return distill(self.blt)
        blt_nats = ent_nats = input_ids.new_zeros((), dtype=torch.float32)
        if patcher is not None:
            with torch.no_grad():
                patch_lengths = patcher(input_ids)
            logits = self.model(input_ids=input_ids, patch_lengths=patch_lengths, use_cache=False).logits
            blt_nats = summed_nll(logits, labels)
        if entropy_loss:
            _, _, logits = self.blt.model.patcher(input_ids)
            ent_nats = summed_nll(logits, labels)
        return blt_nats, ent_nats


def apply_stage(model, stage: StageSpec, adapter_dir=None):
    """Freeze everything the stage does not train; inject LoRA into the global transformer
    (from ``adapter_dir`` when resuming inside a LoRA stage).  Returns the (possibly peft) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in base.named_parameters():
        p.requires_grad_(part_of(name) in stage.train)
    if stage.lora is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    else:
        mods = "|".join(stage.lora.target_modules)
        cfg = LoraConfig(r=stage.lora.rank, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                         target_modules=rf".*global_transformer\.layers\.\d+\..*\.({mods})", bias="none")
        peft_model = get_peft_model(base, cfg)
    # peft freezes everything but the adapters: re-enable the stage's fully trained parts.
    for name, p in peft_model.named_parameters():
        if "lora_" not in name and part_of(name) in stage.train:
            p.requires_grad_(True)
    return peft_model


def end_stage(model):
    """Merge a LoRA stage into the weights so the next stage starts from base + delta."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def param_counts(model) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameters per BLT part."""
    out = {p: {"trainable": 0, "frozen": 0} for p in PARTS}
    for name, p in model.named_parameters():
        out[part_of(name)]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return out


def load_model(model_dir, device):
    """The BLT of a model directory in fp32 (training keeps fp32 master weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if model.config.model_type != "blt":
        raise ByteifyError(f"{model_dir}/config.json: model_type '{model.config.model_type}', expected 'blt'")
    return model.to(device)
