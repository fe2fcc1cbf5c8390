"""Sizes of the fresh BLT parts (local encoder, local decoder, hash n-gram tables, entropy model),
scaled to the source model, plus named presets and ``key=value`` / YAML overrides.

The global transformer's shape is never a choice: it is the source's.  Everything else is an
:class:`ArchitectureSpec`, validated strictly (unknown keys name the closest valid key).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..errors import ByteifyError
from ..patching.spec import BLT_DEFAULT_THRESHOLD, PatchingSpec
from ..schema import Strict as _Strict
from ..schema import apply_overrides, load_yaml_mapping, validate


class LocalSpec(_Strict):
    hidden_size: int | None = None  # None: global hidden / cross_attn_k
    num_hidden_layers: int = 1
    num_attention_heads: int | None = None  # None: hidden / 64 (or / 32)
    intermediate_size: int | None = None  # None: 8/3 * hidden, rounded up to 32
    rope_theta: float = 500000.0


class EntropySpec(_Strict):
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    sliding_window: int = 512
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0


class HashSpec(_Strict):
    ngram_sizes: list[int] = [3, 4, 5, 6, 7, 8]
    vocab_size: int | None = None  # per n-gram size; None: scaled to the global transformer
    functions: int = 1

    @field_validator("ngram_sizes")
    @classmethod
    def _sizes(cls, v):
        if not v or any(n < 1 for n in v):
            raise ValueError("ngram_sizes must be a non-empty list of positive integers")
        return v


class WarmStartSpec(_Strict):
    """The vocabulary warm start (:mod:`byteify.convert.warmstart`): the source's token embeddings
    written into the fresh hash tables and encoder, so the global transformer reads them at step 0."""

    enabled: bool = False
    # token counts for the SVD weights and the collision order: the source tokenizer on the
    # training part of the embedded corpus, or none (all alike; collisions by token id)
    frequencies: Literal["corpus", "uniform"] = "corpus"
    # tokens longer than the largest n-gram size: into the bucket of their last n bytes, or left out
    long_tokens: Literal["suffix", "drop"] = "suffix"
    # content clipped at this many standard deviations per coordinate (sets the grid's resolution)
    clip: float = Field(4.0, gt=0)
    # length offset per byte, in units of the clipped content's range: >= 1 makes amax selection exact
    offset: float = Field(1.0, gt=0)
    rank: int | None = Field(None, ge=1)  # None: encoder width - 1
    # write only this many multi-byte tokens, the most frequent (corpus counts, then BPE order): fewer
    # occupied buckets, so fewer non-token n-grams that land on one; None: every token
    max_tokens: int | None = Field(None, ge=0)
    # write a token only where the other n-grams of the corpus that land in its bucket occur at most
    # this many times as often as the token's own string (None: write regardless of bucket traffic)
    noise_ratio: float | None = Field(1.0, ge=0)
    # content and offsets on a grid exact in bf16 (and a projection whose bf16 rows sum to zero)
    bf16_exact: bool = True
    # the grid step is 2^unit_exponent: table values are integers times it (|value| <= 256 steps);
    # a power of two, so every exactness above holds at any step.  It sets the byte states' scale,
    # which the fresh decoder reads: -11 puts them at the fresh modules' initial scale (-6, ~30x
    # that, trained slower: 4.164 vs 3.842 bits/byte in benchmarks/byteify_quality.py rows 2/2s)
    unit_exponent: int = Field(-11, ge=-20, le=0)
    # the last free_dims coordinates of the encoder width are left out of the written content and
    # offsets (the rank drops to width - free_dims - 1) and hold random n-gram features instead,
    # drawn like a fresh model's: the projection ignores them (the global reads the same kind of
    # vectors), while the decoder, which reads the byte states, gets n-gram codes beside them
    free_dims: int = Field(0, ge=0)
    # the fresh decoder's input projections (and the LM head) blind to the all-ones direction, so
    # they read the byte states' content, not the length offsets (~10x larger) the encoder leaves;
    # measured no better on SmolLM2 (benchmarks/byteify_quality.py row 2b), so off by default
    decoder_ignores_offset: bool = False
    # the free coordinates hold each written token's next-byte distribution under the vocabulary
    # (byteify.convert.spelling) instead of random codes, and the decoder starts as an identity
    # whose LM head reads them: the converted model predicts bytes at step 0 (needs free_dims >= 2)
    spelling: bool = False


class ArchitectureSpec(_Strict):
    cross_attn_k: int | None = None  # None: 2, or 4 for global hidden >= 4096
    local_attention_window: int | None = 512
    max_byte_positions: int = 24576
    encoder: LocalSpec = LocalSpec()
    decoder: LocalSpec = LocalSpec(num_hidden_layers=0)  # 0: scaled to the source
    entropy: EntropySpec = EntropySpec()
    hash: HashSpec = HashSpec()
    patching: PatchingSpec = PatchingSpec()
    # scale the fresh encoder's outputs to the source embeddings' RMS (what the transplanted layers expect)
    match_embedding_scale: bool = True
    # write the source vocabulary into the hash tables and encoder (scale matching then does not apply)
    vocab_warm_start: WarmStartSpec = WarmStartSpec()


PRESETS: dict[str, dict] = {
    # Sizes follow the source (see resolve()); the default.
    "auto": {},
    # For tests and smoke runs: tiny everything.
    "tiny": {
        "encoder": {"hidden_size": 32, "num_attention_heads": 2},
        "decoder": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2},
        "entropy": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
        "hash": {"vocab_size": 512},
        "max_byte_positions": 4096,
    },
    # The vocabulary warm start (byteify.convert.warmstart) with the sizes it needs: local width =
    # global width (k = 1: the patch vectors keep rank D - 1 of the embeddings; the decoder, which
    # reads the encoder's byte states, is as wide), n-gram sizes from 2 (2-byte tokens), 131,072
    # buckets per size (SmolLM2: 528M table parameters; measured in benchmarks/warmstart_probe.py).
    # Its step-0 bound is the tightest measured (SmolLM2: 1.27x the exact embeddings), but Adam over
    # the tables does not fit a CPU step, so its recipe keeps them frozen, and then the local
    # modules learn slowly (benchmarks/byteify_quality.py rows 2, 2s).
    "warm": {
        "cross_attn_k": 1,
        "vocab_warm_start": {"enabled": True},
        "hash": {"ngram_sizes": [2, 3, 4, 5, 6, 7, 8], "vocab_size": 131072},
    },
    # The released BLT-1B's local sizes (3B parameters of hash tables: GPU only).
    "blt-1b": {
        "cross_attn_k": 2,
        "encoder": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 1, "intermediate_size": 2816},
        "decoder": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 9, "intermediate_size": 2816},
        "entropy": {"hidden_size": 768, "num_hidden_layers": 14, "num_attention_heads": 12, "intermediate_size": 2048},
        "hash": {"vocab_size": 500002},
    },
}
# The warm start with 16,384 buckets per n-gram size (SmolLM2: 66M table parameters): a looser
# step-0 bound (1.52x, still within the 1.6x gate) but small enough for every part, the tables
# too, to train; with every part training (the smollm2-135m recipe without keep_warm_start)
# 2.576 bits/byte after ~460 KB vs 2.706 without a warm start; after ~1.5 MB 1.977 vs a random
# global's 1.998 (benchmarks/byteify_quality.py row 2q; warm-kept below does better).
PRESETS["warm-16k"] = {**PRESETS["warm"], "hash": {**PRESETS["warm"]["hash"], "vocab_size": 16384}}
# warm-16k with 128 encoder coordinates left free of the written content (free_dims), for recipes
# whose stages keep the written content (``keep_warm_start: true``, byteify.train.written: the
# global reads the converted patch vectors throughout, the local side trains in the free
# coordinates).  With the smollm2-135m recipe without teacher_kl (SmolLM2: 2.468 bits/byte after
# ~460 KB, 1.833 after ~1.5 MB, vs 2.576 / 1.977 for warm-16k trained whole and 2.623 / 1.998 for a
# random global: benchmarks/byteify_quality.py row 2qw); its step-0 bound 1.628 (1.52x the exact
# embeddings).
PRESETS["warm-kept"] = {**PRESETS["warm-16k"], "vocab_warm_start": {"enabled": True, "free_dims": 128}}
# warm-kept with 65,536 buckets per n-gram size (SmolLM2: 264M table parameters instead of 66M):
# fewer collisions, step-0 bound 1.440 (1.35x).  The shipped conversion: with the smollm2-135m
# recipe (keep_warm_start + teacher_kl) 2.360 bits/byte after ~460 KB and 1.740 after ~1.5 MB, the
# best rows measured (0.900x / 0.871x a random global; row 2qw64k), at ~40% more CPU time per step
# than warm-kept (the 4x larger tables' gradients and AdamW update).
PRESETS["warm-kept-64k"] = {**PRESETS["warm-kept"], "hash": {**PRESETS["warm-kept"]["hash"], "vocab_size": 65536}}
# warm-kept-64k with the spelling warm start (byteify.convert.spelling): the free coordinates carry
# every written token's next-byte distribution under the source vocabulary, and the decoder starts
# as an identity whose LM head reads it.  SmolLM2 at step 0: 2.960 bits/byte held out (8.738 for
# warm-kept-64k, whose fresh decoder is near uniform); after ~460 KB of training 2.104 (2.287), after
# ~1.5 MB 1.656 (1.658): it gains early, not at the end.  benchmarks/byteify_quality.py row 2qw64ks.
PRESETS["warm-spell-64k"] = {**PRESETS["warm-kept-64k"],
                             "vocab_warm_start": {**PRESETS["warm-kept-64k"]["vocab_warm_start"], "spelling": True}}


def load_spec(preset: str | None = "auto", overrides: list[str] | None = None) -> ArchitectureSpec:
    """A named preset or a YAML file, then ``key=value`` overrides, validated."""
    preset = preset or "auto"
    if preset in PRESETS:
        data, where = dict(PRESETS[preset]), f"preset '{preset}'"
    elif preset.endswith((".yaml", ".yml")):
        p = Path(preset)
        if not p.exists():
            raise ByteifyError(f"{p}: preset file not found")
        data, where = load_yaml_mapping(p), str(p)
    else:
        raise ByteifyError(f"--preset '{preset}': unknown; choose one of {', '.join(PRESETS)} or a .yaml file")
    data = copy.deepcopy(data)
    if overrides:
        apply_overrides(data, overrides, "--set")
        where += " with --set overrides"
    return validate(ArchitectureSpec, data, where)


def _round_up(x: float, m: int) -> int:
    return int(-(-int(x) // m) * m)


def _heads(hidden: int) -> int:
    for hd in (64, 32, 16, 8):
        if hidden % hd == 0:
            return hidden // hd
    return 1


def resolve(spec: ArchitectureSpec, global_hidden: int, global_params: int) -> ArchitectureSpec:
    """Fill every size left open with a value scaled to the source's global transformer."""
    s = spec.model_copy(deep=True)
    k = s.cross_attn_k or (4 if global_hidden >= 4096 else 2)
    s.cross_attn_k = k
    default_local = max(32, _round_up(global_hidden / k, 32))
    for part, default_layers in ((s.encoder, 1), (s.decoder, 4 if global_hidden < 1024 else 6 if global_hidden < 2048 else 9)):
        part.hidden_size = part.hidden_size or default_local
        part.num_attention_heads = part.num_attention_heads or _heads(part.hidden_size)
        part.intermediate_size = part.intermediate_size or _round_up(8 * part.hidden_size / 3, 32)
        if part.num_hidden_layers <= 0:
            part.num_hidden_layers = default_layers
    if s.entropy.intermediate_size is None:
        s.entropy.intermediate_size = _round_up(8 * s.entropy.hidden_size / 3, 32)
    if s.hash.vocab_size is None:
        # Hash tables cost memory, not FLOPs: budget about a quarter of the global parameters.
        n_tables = len(s.hash.ngram_sizes) * s.hash.functions
        per = 0.25 * global_params / (n_tables * s.encoder.hidden_size)
        s.hash.vocab_size = int(min(500002, max(4096, _round_up(per, 1024))))
    if s.patching.threshold is None:
        s.patching.threshold = BLT_DEFAULT_THRESHOLD
    if s.patching.monotonic:
        raise ByteifyError("patching.monotonic: a model config can only carry the global entropy rule (stock "
                           "transformers); calibrate a monotonic threshold with 'byteify calibrate --monotonic'")
    if s.encoder.hidden_size != s.decoder.hidden_size:  # BLT's decoder starts from the encoder's byte states
        raise ByteifyError(f"encoder.hidden_size {s.encoder.hidden_size} != decoder.hidden_size {s.decoder.hidden_size}: "
                           "BLT's local decoder reads the encoder's byte states, so both must be equally wide")
    for name, part in (("encoder", s.encoder), ("decoder", s.decoder), ("entropy", s.entropy)):
        if part.hidden_size % part.num_attention_heads:
            raise ByteifyError(
                f"{name}.hidden_size {part.hidden_size} is not divisible by {name}.num_attention_heads {part.num_attention_heads}"
            )
    return s
