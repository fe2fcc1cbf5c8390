"""The model a training stage optimises: the BLT wrapped so that one root forward computes a
stage's losses (what FSDP2 needs), built for each stage on the meta device with the stage's
freezing and LoRA, sharded (FSDP2) once per stage, then filled with the weights the run carries
from stage to stage (LoRA merged at the end of its stage, shard by shard, so no process ever holds
the whole model); and the BLT forward split around its global transformer (for distillation,
which feeds the local decoder the teacher's states instead of the global transformer's)."""

from __future__ import annotations

import zlib
from typing import NamedTuple

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


class Losses(NamedTuple):
    """Summed losses of one micro-batch (zero where a term is off)."""

    blt: torch.Tensor  # BLT byte cross-entropy, nats
    entropy: torch.Tensor  # entropy model's byte cross-entropy, nats
    boundary: torch.Tensor  # the entropy model's source-boundary term (see boundary_loss)
    kl: torch.Tensor  # KL(teacher || BLT) over the bytes the teacher predicts, nats (see teacher_kl)
    patch_norm: torch.Tensor  # the global input's norm penalty, unweighted (see patch_norm_penalty)


class TrainModule(nn.Module):
    """The BLT (possibly peft-wrapped) under one root module: ``forward`` returns the summed
    losses a stage trains on, so FSDP2 sees one root forward per micro-step.

    * byte stages: ``forward(ids, labels, patcher=..., entropy_loss=..., boundaries=...,
      byte_kl=..., max_patch_norm=..., decoder_byte_dropout=...)`` -> :class:`Losses`; the patch
      lengths come from ``patcher(ids)`` without gradients (inside the root forward, as FSDP2
      wants every unit to be), ``patcher`` None skips the BLT loss (an entropy-model-only stage);
      ``byte_kl(logits)`` is the summed teacher KL on the BLT's logits; ``max_patch_norm``: also
      :func:`patch_norm_penalty` of the global's input; ``decoder_byte_dropout``: in training
      mode, :func:`drop_bytes` on the local decoder's input;
    * distillation: ``forward(..., distill=fn)`` runs ``fn(self.blt)`` inside the root forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def blt(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids, labels, patcher=None, entropy_loss=False, distill=None, boundaries=None,
                byte_kl=None, max_patch_norm=None, decoder_byte_dropout=0.0):
        if distill is not None:
            return distill(self.blt)
        zero = input_ids.new_zeros((), dtype=torch.float32)
        blt_nats = ent_nats = boundary = kl = norm = zero
        if patcher is not None:
            with torch.no_grad():
                patch_lengths = patcher(input_ids)
            box = {}

            def capture(_module, _args, kwargs):  # the patch vectors where the global transformer receives them
                box.setdefault("x", kwargs["inputs_embeds"])

            def withhold(_module, args, kwargs):  # the encoder's byte states where the local decoder receives them
                dropped = drop_bytes(kwargs["inputs_embeds"], decoder_byte_dropout, input_ids)
                return args, {**kwargs, "inputs_embeds": dropped}

            hooks = []
            if max_patch_norm is not None:
                hooks.append(self.blt.model.global_transformer.register_forward_pre_hook(capture, with_kwargs=True))
            if decoder_byte_dropout and self.training:
                hooks.append(self.blt.model.local_decoder.register_forward_pre_hook(withhold, with_kwargs=True))
            try:
                logits = self.model(input_ids=input_ids, patch_lengths=patch_lengths, use_cache=False).logits
            finally:
                for hook in hooks:
                    hook.remove()
            if max_patch_norm is not None:
                norm = patch_norm_penalty(box["x"], patch_lengths, max_patch_norm)
            blt_nats = summed_nll(logits, labels)
            if byte_kl is not None:
                kl = byte_kl(logits)
        if entropy_loss:
            entropies, _, logits = self.blt.model.patcher(input_ids)
            ent_nats = summed_nll(logits, labels)
            if boundaries is not None:  # (targets, mask, spec): see BoundarySpec
                boundary = boundary_loss(entropies, *boundaries)
        return Losses(blt_nats, ent_nats, boundary, kl, norm)


def patch_norm_penalty(vectors: torch.Tensor, patch_lengths: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``sum relu(log(|v| / max_norm))^2`` over the non-empty patches' vectors ``v`` ([B, P, D];
    ``patch_lengths`` [B, P]): zero up to ``max_norm``, then growing with the log of the excess
    (a patch vector 1000x too long costs ~48, not 1e6)."""
    log_ratio = torch.log(vectors.float().norm(dim=-1).clamp(min=1e-12) / max_norm)
    return (F.relu(log_ratio).pow(2) * (patch_lengths > 0)).sum()


def drop_bytes(states: torch.Tensor, p: float, input_ids: torch.Tensor) -> torch.Tensor:
    """``states`` [B, T, D] with each byte's whole vector zeroed with probability ``p`` and the
    others scaled by ``1 / (1 - p)`` (dropout over bytes, not coordinates).  Which bytes is a
    function of each row's ``input_ids`` (their CRC-32 seeds the row's draw), so the masks do not
    depend on the number of processes or on where a run resumed."""
    draws = [torch.rand(len(row), generator=torch.Generator().manual_seed(zlib.crc32(row.numpy().tobytes())))
             for row in input_ids.cpu()]
    keep = torch.stack(draws) >= p
    return states * keep[..., None].to(states.device, states.dtype) / (1.0 - p)


def boundary_loss(entropies: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, spec) -> torch.Tensor:
    """Summed ``weight * BCE(sigmoid(sharpness * (H - threshold)), target)`` over ``mask``:
    ``H[t]`` (nats) should exceed the threshold exactly where byte t+1 starts a source token."""
    z = spec.sharpness * (entropies.float() - spec.threshold)
    bce = F.binary_cross_entropy_with_logits(z, targets.float(), reduction="none")
    return spec.weight * (bce * mask).sum()


def boundary_targets(ids: torch.Tensor, source_patcher) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) [B, T] for :func:`boundary_loss`: target t = byte t+1 starts a source token;
    positions whose next byte is a forced start (after BOS/EOS, position 1) or padding are masked."""
    from ..patching.patchers import forced_starts
    from ..tokenizer import OFFSET

    starts = source_patcher.starts_with_next(ids)[:, 1:]  # [B, T]: does position t+1 start
    nxt = torch.cat([ids[:, 1:], ids.new_zeros(ids.shape[0], 1)], 1)
    mask = (nxt >= OFFSET) & ~forced_starts(ids)[:, 1:]
    mask[:, -1] = False  # the byte after the window is unknown
    return starts & mask, mask


def apply_stage(model, stage: StageSpec):
    """Freeze everything the stage does not train; inject LoRA into the global transformer.
    Returns the (possibly peft) model."""
    from .written import FROZEN_WHOLE

    def trains(name: str) -> bool:
        return part_of(name) in stage.train and not (stage.keep_warm_start and FROZEN_WHOLE.search(name))

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in base.named_parameters():
        p.requires_grad_(trains(name))
    if stage.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    mods = "|".join(stage.lora.target_modules)
    cfg = LoraConfig(r=stage.lora.rank, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                     target_modules=rf".*global_transformer\.layers\.\d+\..*\.({mods})", bias="none")
    peft_model = get_peft_model(base, cfg)
    # peft freezes everything but the adapters: re-enable the stage's fully trained parts.
    for name, p in peft_model.named_parameters():
        if "lora_" not in name and trains(name):
            p.requires_grad_(True)
    return peft_model


def build_module(config, stage: StageSpec, dist, run) -> TrainModule:
    """The stage's training module with *uninitialised* parameters on the process's device:
    built on the meta device, stage applied (freezing, LoRA), attention kernels (``run.attention``),
    activation checkpointing, FSDP2 when there are several processes, then allocated; fill it
    with :func:`load_weights`."""
    from transformers import BltForCausalLM

    from ..resolve import init_rotary_buffers
    from .distributed import shard

    from ..attention import configure_attention, use_attention

    with torch.device("meta"):
        model = apply_stage(BltForCausalLM(config), stage)
    blt = model.get_base_model() if hasattr(model, "get_base_model") else model
    if run.attention == "auto":
        configure_attention(blt, dist.device)  # memory-efficient local attention on CUDA
    else:
        use_attention(blt, run.attention)
    if run.activation_checkpointing:
        blt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = TrainModule(model)
    if dist.sharded:
        shard(module, dist, run)
    module.to_empty(device=dist.device)
    init_rotary_buffers(blt, dist.device)
    return module


def _rows(t: torch.Tensor, start: int, stop: int, full_rows: int) -> torch.Tensor:
    return t if (start, stop) == (0, full_rows) else t[start:stop]


@torch.no_grad()
def load_weights(module: TrainModule, weights, seed: int = 0) -> None:
    """Fill the module's parameters from ``weights`` (plain BLT names: a reader with ``keys``,
    ``get`` and optionally ``read_rows(name, start, stop)``, or a dict of tensors or DTensor shards); each process
    reads only its own rows of a sharded parameter.  LoRA matrices are initialised as peft does
    (A: Kaiming-uniform, B: zero), from ``seed`` and their name, identically for every number of
    processes."""
    from torch.distributed.tensor import DTensor

    from ..parts import plain_name

    missing = []
    for fqn, p in module.named_parameters():
        name = plain_name(fqn)
        local = p.to_local() if isinstance(p, DTensor) else p
        start, stop = _local_rows(p)
        if name is None:
            local.copy_(_lora_init(fqn, tuple(p.shape), seed)[start:stop].to(local.dtype))
            continue
        src = weights.get(name) if isinstance(weights, dict) else None
        if src is None and not isinstance(weights, dict):
            if name not in weights.keys():
                missing.append(name)
                continue
            src = weights.read_rows(name, start, stop) if hasattr(weights, "read_rows") \
                else _rows(weights.get(name), start, stop, p.shape[0])
        elif src is None:
            missing.append(name)
            continue
        elif isinstance(src, DTensor):
            src = src.to_local()  # the same sharding: this process's rows
        elif tuple(src.shape) == tuple(p.shape):
            src = _rows(src, start, stop, p.shape[0])
        local.copy_(src.to(local.dtype))
    if missing:
        raise ByteifyError(f"weights: {len(missing)} tensors missing, e.g. '{missing[0]}'")


def _local_rows(p) -> tuple[int, int]:
    """The rows of a (possibly FSDP-sharded, dim 0) parameter this process holds."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor) or p.ndim == 0:
        return 0, (p.shape[0] if p.ndim else 1)
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // world)  # torch.chunk's split, as FSDP2 shards
    start = min(rank * chunk, n)
    return start, start + p.to_local().shape[0]


def _lora_init(fqn: str, shape: tuple, seed: int) -> torch.Tensor:
    import hashlib
    import math

    if ".lora_B." in fqn:
        return torch.zeros(shape)
    key = int.from_bytes(hashlib.blake2b(fqn.encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed((seed * 1_000_003 + key) % (1 << 63))
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in], as peft
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


@torch.no_grad()
def carried_weights(module: TrainModule) -> dict[str, torch.Tensor]:
    """The weights the next stage starts from, under plain BLT names: this process's shards
    (DTensors) or whole tensors, a LoRA stage's adapters merged into the weights they adapt
    (``W + B @ A * scaling``, computed on this process's rows of W and B)."""
    from torch.distributed.tensor import DTensor

    from ..parts import plain_name

    params = dict(module.named_parameters())
    out = {}
    for fqn, p in params.items():
        name = plain_name(fqn)
        if name is None:
            continue
        w = p.detach()
        prefix = fqn.removesuffix(".base_layer.weight")
        if prefix != fqn:  # a LoRA-wrapped linear layer
            a, b = params[prefix + ".lora_A.default.weight"], params[prefix + ".lora_B.default.weight"]
            scaling = module.get_submodule(prefix).scaling["default"]
            a_full = a.full_tensor() if isinstance(a, DTensor) else a
            b_local = b.to_local() if isinstance(b, DTensor) else b
            w_local = (w.to_local() if isinstance(w, DTensor) else w) + (b_local @ a_full) * scaling
            w = DTensor.from_local(w_local, w.device_mesh, w.placements, shape=w.shape, stride=w.stride()) \
                if isinstance(w, DTensor) else w_local
        out[name] = w.clone()
    return out


def param_counts(model) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameters per BLT part."""
    out = {p: {"trainable": 0, "frozen": 0} for p in PARTS}
    for name, p in model.named_parameters():
        out[part_of(name)]["trainable" if p.requires_grad else "frozen"] += p.numel()
    return out
