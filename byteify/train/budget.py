"""What a training stage costs on one GPU, estimated from the model config and the recipe: memory
per process under FSDP2 (parameters, gradients, optimizer state, gathered units, activations at
the micro-batch with and without activation checkpointing, attention masks) and the bytes per
second to expect.  ``byteify train --dry-run`` prints it for the world size given (``WORLD_SIZE``
or ``--world-size``) and warns when a stage will not fit the GPU's memory.

The model (bf16 compute, fp32 master weights, gradients and AdamW moments):

* fp32 master weights of every parameter, fp32 gradients and two fp32 moments of the trainable
  ones, sharded over the processes;
* under ``grad_accum`` > 1 with several processes, gradients are not reduce-scattered between
  micro-steps (FSDP2 keeps them unsharded, fp32, until the last micro-step): 4 bytes per
  trainable parameter, unsharded;
* the two largest units gathered in bf16 at a time (one computing, one prefetched);
* activations per transformer layer and token, bf16: without checkpointing the inputs of its norms,
  projections and MLP (``2 * (6 h + 4 f)`` bytes; cross-attention layers ``2 * 4 h``); with
  per-layer checkpointing only each layer's input (``2 h``) plus one layer's full activations
  while it is recomputed; logits in fp32;
* transformers' BLT builds dense masks: the local causal/sliding mask ``[b, 1, T, T]`` and the
  two cross-attention masks ``[b, 1, P k, T]``, bf16, kept for the backward pass;
* a stage that distils (``teacher_kl``, ``distill``) runs the source model beside it, forward
  only: its weights in the teacher's dtype, sharded like the student's (one unit per layer), its
  root unit (embeddings, head, norm: FSDP2 keeps the root gathered after the forward) and two
  layers gathered, one chunk of its head's logits at a time with the float64 prefix sums that
  marginalise them (:class:`byteify.train.teacher.MarginalHead`), and the targets (256 fp32
  per byte);
* FLOPs per byte: ``6 x`` the parameters a byte touches (the global transformer once per patch)
  plus the attention the dense masks make the kernels compute (all ``T^2`` pairs in the local
  stacks), ``x 4/3`` with checkpointing (one more forward), plus the teacher's forward (``2 x``
  its parameters per token); bytes per second at an assumed MFU of a 989 TFLOP/s (H100/H200
  dense bf16) GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
PEAK_FLOPS = 989e12  # H100 / H200 SXM, dense bf16
ASSUMED_MFU = 0.25  # useful work with dense local masks (reference/scale-path-findings.md: ~22%)


@dataclass
class TeacherShape:
    """The source model a distilling stage runs beside the student (forward only, no gradients)."""

    params: int
    layer: int  # the largest decoder layer's parameters
    root: int  # the parameters outside the layers (embeddings, head, final norm)
    vocab: int
    dtype_bytes: int  # 2 for a bf16 teacher, 4 for fp32
    head_rows: int  # positions per chunk of its LM head (byteify.train.teacher.HEAD_CHUNK / vocab)


@dataclass
class StageBudget:
    world: int
    micro_per_process: int  # sequences per micro-step on one process
    seq_len: int
    patch_bytes: float
    params: int
    trainable: int
    state: int  # bytes: fp32 weights + gradients + moments, sharded
    unsharded_grads: int  # bytes: accumulated gradients between micro-steps
    gathered: int  # bytes: bf16 units gathered at a time
    activations: dict  # {"checkpointing": bytes, "no checkpointing": bytes}
    masks: int  # bytes
    flops_per_byte: dict  # {"checkpointing": ..., "no checkpointing": ...}
    teacher: int = 0  # bytes: the distilling teacher's sharded weights, gathered layers and logits

    def total(self, checkpointing: bool) -> int:
        act = self.activations["checkpointing" if checkpointing else "no checkpointing"]
        return self.state + self.unsharded_grads + self.gathered + act + self.masks + self.teacher

    def bytes_per_second(self, checkpointing: bool) -> float:
        return ASSUMED_MFU * PEAK_FLOPS / self.flops_per_byte["checkpointing" if checkpointing else "no checkpointing"]


def training_state_bytes(trainable: int, frozen: int, world: int = 1) -> int:
    """Bytes of training state per process: fp32 master weights of every parameter, fp32
    gradients and two fp32 AdamW moments of the trainable ones, sharded over ``world``."""
    return (4 * (trainable + frozen) + 12 * trainable) // world


def _stack(layers: int, h: int, f: int, tokens: int, cross: int = 0) -> tuple[int, int, int]:
    """(activation bytes without checkpointing, with it, the largest layer's) of a stack."""
    per_layer = 2 * (6 * h + 4 * f) * tokens + 2 * 4 * h * tokens * (cross > 0)
    return layers * per_layer, layers * 2 * h * tokens, per_layer if layers else 0


def stage_budget(config, counts: dict, stage, seq_len: int, world: int, patch_bytes: float,
                 teacher: TeacherShape | None = None) -> StageBudget:
    """The estimate of a stage (``counts``: trainable/frozen parameters per part; ``teacher``: the
    source model, for a stage that distils)."""
    params = sum(c["trainable"] + c["frozen"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    micro = stage.batch_bytes // seq_len // stage.grad_accum // world
    T, P = seq_len, max(1, int(seq_len / patch_bytes))
    g, e, d = config.global_config, config.encoder_config, config.decoder_config
    k = config.cross_attn_k
    tokens_local, tokens_global = micro * T, micro * P
    parts = [_stack(g.num_hidden_layers, g.hidden_size, g.intermediate_size, tokens_global),
             _stack(e.num_hidden_layers, e.hidden_size, e.intermediate_size, tokens_local, cross=1),
             _stack(d.num_hidden_layers, d.hidden_size, d.intermediate_size, tokens_local, cross=1)]
    logits = micro * T * config.vocab_size * 4 * 2  # fp32 logits and their gradient
    no_ckpt = sum(p[0] for p in parts) + logits
    ckpt = sum(p[1] for p in parts) + max(p[2] for p in parts) + logits
    masks = micro * (T * T + 2 * P * k * T) * 2
    unit = max(g.hidden_size * (2 * g.hidden_size + 2 * g.hidden_size * g.num_key_value_heads // g.num_attention_heads)
               + 3 * g.hidden_size * g.intermediate_size,
               counts["hash_embeddings"]["trainable"] + counts["hash_embeddings"]["frozen"])
    state = training_state_bytes(trainable, params - trainable, world)
    unsharded = 4 * trainable if (stage.grad_accum > 1 and world > 1) else 0
    local_params = sum(counts[p]["trainable"] + counts[p]["frozen"] for p in ("local_encoder", "local_decoder"))
    global_params = counts["global"]["trainable"] + counts["global"]["frozen"]
    attn = 4 * T * (e.hidden_size * e.num_hidden_layers + d.hidden_size * d.num_hidden_layers) \
        + 4 * P * g.hidden_size * g.num_hidden_layers / patch_bytes
    forward = 2 * local_params + 2 * global_params / patch_bytes + attn
    if stage.train != ["entropy_model"]:
        forward += 2 * (counts["entropy_model"]["trainable"] + counts["entropy_model"]["frozen"])  # patch lengths
    teacher_mem = teacher_flops = 0
    if teacher is not None:
        # a chunk of the head's logits (teacher dtype, fp32, its softmax, the float64 gathered
        # probabilities and prefix sums of the byte-trie marginals) and the fp32 targets of every byte
        head = min(tokens_global, teacher.head_rows) * teacher.vocab * (teacher.dtype_bytes + 4 + 4 + 8 + 8)
        teacher_mem = (teacher.dtype_bytes * (teacher.params // world + teacher.root + 2 * teacher.layer)
                       + head + tokens_local * 256 * 4)
        teacher_flops = 2 * teacher.params / patch_bytes
    return StageBudget(world=world, micro_per_process=micro, seq_len=T, patch_bytes=patch_bytes, params=params,
                       trainable=trainable, state=state, unsharded_grads=unsharded, gathered=2 * 2 * unit,
                       activations={"checkpointing": ckpt, "no checkpointing": no_ckpt}, masks=masks,
                       flops_per_byte={"checkpointing": 4 * forward + teacher_flops,
                                       "no checkpointing": 3 * forward + teacher_flops}, teacher=teacher_mem)


def budget_lines(b: StageBudget, checkpointing: bool, gpu_gib: float = 80.0) -> list[str]:
    """The dry-run's lines for one stage (memory per process, bytes/s, a warning when it will not fit)."""
    gib = lambda x: f"{x / GIB:.1f} GiB"  # noqa: E731
    lines = [f"  per-GPU estimate with {b.world} process(es), {b.micro_per_process} x {b.seq_len}-byte sequences "
             f"per micro-step, {b.patch_bytes:.1f} bytes/patch:",
             f"    weights + grads + AdamW (fp32, sharded): {gib(b.state)}; gathered units (bf16): {gib(b.gathered)}"
             + (f"; gradients accumulated between micro-steps (unsharded fp32): {gib(b.unsharded_grads)}"
                if b.unsharded_grads else ""),
             f"    activations: {gib(b.activations['checkpointing'])} with checkpointing, "
             f"{gib(b.activations['no checkpointing'])} without; dense attention masks: {gib(b.masks)}"]
    if b.teacher:
        lines.append(f"    teacher (the source model, forward only: sharded weights, gathered layers, a chunk of its head, byte targets): {gib(b.teacher)}")
    for ac in (True, False):
        mark = "  <- this recipe" if ac == checkpointing else ""
        lines.append(f"    total {'with' if ac else 'without'} activation checkpointing: {gib(b.total(ac))}; "
                     f"~{b.bytes_per_second(ac) / 1e3:.0f} kB/s per GPU at {ASSUMED_MFU:.0%} MFU{mark}")
    if b.total(checkpointing) > gpu_gib * GIB:
        lines.append(f"  WARNING: {gib(b.total(checkpointing))} per GPU will not fit an {gpu_gib:.0f} GB GPU: lower the "
                     f"micro-batch (raise grad_accum), turn on run.activation_checkpointing, or use more processes")
    return lines
