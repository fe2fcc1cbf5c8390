"""Patchers: where patches start in a byte sequence.

Every patcher answers, for ids ``[B, T]``, a boolean *start mask* over ``T + 1`` positions
(:meth:`Patcher.starts_with_next`): position ``t < T`` says whether byte ``t`` starts a patch,
position ``T`` whether the *next* byte (not yet seen) will.  :meth:`Patcher.starts` is the first
``T`` columns; calling the patcher gives the right-zero-padded ``patch_lengths`` ``[B, P]`` that
``BltForCausalLM.forward`` takes, each row summing to ``T + 1`` (BLT's include-next-byte
convention, see :func:`lengths_from_starts`).

The rules (all of them *causal*: the decision for position ``t`` uses bytes ``< t`` only, so
patching a prefix gives exactly the boundaries of the full text up to that point, including
the next-byte decision; that is what lets generation patch incrementally):

* **forced starts** (every patcher): positions 0 and 1 (the first byte is a patch of its own,
  as in BLT); the byte after every BOS or EOS, so a BOS that follows an EOS (packed documents)
  is a patch of its own; and every BOS (a BOS *not* after an EOS is only known once seen, so
  it cannot be announced by the next-byte decision).
* ``static``: fixed-size patches of ``patch_size`` bytes, counted from each forced start.
* ``byte``: every byte is a patch (what the entropy model trains with).
* ``space``: BLT's space patching: a patch starts after the first byte of every run of
  non-word bytes, so ``"hello, world"`` is ``"hello,"`` ``" world"``.  Non-word bytes are ASCII
  bytes that are not letters or digits (and the special ids); unlike BLT's reference code,
  bytes >= 0x80 count as word bytes, so a multi-byte UTF-8 character is never split and
  non-Latin letters join words.
* ``entropy``: the BLT paper's rules on the entropy model's next-byte entropies ``H`` (nats):
  global, byte ``t`` starts a patch if ``H[t-1] > threshold``; relative (``monotonic``), if
  ``H[t-1] - H[t-2] > threshold``.  The global rule is what transformers' own
  ``BltPatcher`` does when ``config.patch_in_forward`` and ``patching_mode="entropy"``: on a text
  that starts with BOS, the boundaries are the same as the stock model's (and, with the
  next-byte decision, so are the logits, see ``tests/test_patching.py``).  The monotonic rule
  has no stock equivalent: a model directory cannot make plain transformers patch that way.
* ``source_tokens``: boundaries at the source tokenizer's token starts (the tokenizer that
  ``byteify convert`` kept in ``MODEL/byteify_source/tokenizer``), so that a transplanted global
  transformer sees units like its pretraining tokens; meant for a first adaptation stage.  The
  tokenizer looks ahead (a token's end depends on the bytes after it), so this patcher is
  **not incremental**: :func:`build_patcher` refuses it with ``for_generation=True``, and its
  next-byte decision is always "continue the last patch".

An optional ``max_patch_length`` splits longer patches into pieces of that many bytes counted
from the patch start (what transformers' ``process_patch_lengths`` does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ByteifyError
from ..resolve import Location, load_source_tokenizer, locate
from ..tokenizer import BOS_ID, EOS_ID, OFFSET
from .spec import MODES, PatchingSpec, config_threshold


# ------------------------------------------------------------------------------------------
# Start masks <-> patch lengths


def lengths_from_starts(starts: torch.Tensor, next_start: torch.Tensor | None = None) -> torch.Tensor:
    """Start mask [B, T] -> patch lengths [B, P], zero-padded on the right, rows summing to T + 1.

    Positions 0 and 1 always start (the first byte is a patch of its own, as in BLT).  Rows sum
    to T + 1: BLT's include-next-byte convention.  ``next_start`` ([B] bool) says whether the
    next byte (position T) starts a patch of its own (a last patch of length 1); without it (or
    where it is False) the next byte is counted in the last patch.  transformers' decoder
    predicts byte t+1 from the global output of the patch *before* the one holding byte t+1
    (it counts shifted patch starts), so the next-byte patch decides which global state the
    last position reads; and without the extra byte, a row right-padded with empty patches
    (because another row of the batch has more) would send its last patch's bytes to an empty
    patch, and a row's logits would depend on the rest of the batch."""
    if next_start is None:
        next_start = torch.zeros(starts.shape[0], dtype=torch.bool, device=starts.device)
    ext = torch.cat([starts, next_start.to(torch.bool).reshape(-1, 1)], 1)
    ext[:, : min(2, ext.shape[1])] = True
    patch_id = ext.long().cumsum(1) - 1
    n = int(patch_id[:, -1].max()) + 1
    lengths = torch.zeros(ext.shape[0], n, dtype=torch.long, device=ext.device)
    lengths.scatter_add_(1, patch_id, torch.ones_like(patch_id))
    return lengths


def starts_from_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Patch lengths [B, P] (rows summing to ``seq_len`` or ``seq_len + 1``, zero-padded) ->
    start mask [B, seq_len].  Also reads transformers' own patcher's lengths."""
    lengths = lengths.long().clamp(max=seq_len + 1)
    ends = lengths.cumsum(1)
    starts = torch.zeros(lengths.shape[0], seq_len + 2, dtype=torch.bool, device=lengths.device)
    idx = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1).clamp(max=seq_len + 1)
    starts.scatter_(1, idx, lengths > 0)
    return starts[:, :seq_len]


def forced_starts(ids: torch.Tensor) -> torch.Tensor:
    """[B, T+1]: positions 0 and 1, after each BOS/EOS, and at each BOS."""
    B, T = ids.shape
    f = torch.zeros(B, T + 1, dtype=torch.bool, device=ids.device)
    f[:, : min(2, T + 1)] = True
    f[:, 1:] |= (ids == BOS_ID) | (ids == EOS_ID)
    f[:, :T] |= ids == BOS_ID
    return f


def cap_length(starts: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """Split patches longer than ``max_len`` into pieces of ``max_len`` counted from each patch
    start (causal: position t only looks at earlier starts).  Position 0 must be a start."""
    if not max_len:
        return starts
    pos = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    last = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    return starts | ((pos - last) % max_len == 0)


def _nonword(ids: torch.Tensor) -> torch.Tensor:
    b = ids - OFFSET
    alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
    return ~(alnum | (b >= 0x80))  # special ids (b < 0) are non-word too


def entropy_starts(entropies: torch.Tensor, threshold: float, monotonic: bool = False,
                   include_next: bool = False) -> torch.Tensor:
    """BLT's rules on entropies [B, T] (``H[t]`` is the entropy of the prediction of byte t+1):
    global: byte t starts a patch if ``H[t-1] > threshold``; monotonic: if
    ``H[t-1] - H[t-2] > threshold``.  Positions 0 and 1 always start.  Returns [B, T], or with
    ``include_next`` [B, T+1] (the last column: does the next byte start a patch)."""
    B, T = entropies.shape
    s = torch.zeros(B, T + 1, dtype=torch.bool, device=entropies.device)
    if monotonic:
        if T >= 2:
            s[:, 2:] = (entropies[:, 1:] - entropies[:, :-1]) > threshold
    else:
        s[:, 1:] = entropies > threshold
    s[:, :2] = True
    return s if include_next else s[:, :T]


# ------------------------------------------------------------------------------------------
# Patchers


class Patcher:
    """Base: subclasses implement ``_rule(ids) -> [B, T+1]`` (their own starts, before the
    forced starts and ``max_patch_length``)."""

    name = "base"
    incremental = True  # boundaries of a prefix == the full text's boundaries up to there

    def __init__(self, max_patch_length: int | None = None):
        self.max_patch_length = max_patch_length

    def _rule(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _cap(self) -> int | None:
        return self.max_patch_length

    def starts_with_next(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T+1] start mask; column T: whether the next byte starts a patch."""
        return cap_length(self._rule(ids) | forced_starts(ids), self._cap())

    def starts(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] start mask."""
        return self.starts_with_next(ids)[:, : ids.shape[1]]

    def lengths(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.starts_with_next(ids)
        return lengths_from_starts(s[:, :-1], s[:, -1])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lengths(ids)

    def describe(self) -> str:
        return self.name + (f", max_patch_length {self.max_patch_length}" if self.max_patch_length else "")


def _empty(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.bool, device=ids.device)


class StaticPatcher(Patcher):
    """Fixed-size patches, counted from position 1 and from each forced start (BOS/EOS)."""

    name = "static"

    def __init__(self, patch_size: int = 4, max_patch_length: int | None = None):
        super().__init__(max_patch_length)
        self.patch_size = patch_size

    def _rule(self, ids):
        return _empty(ids)

    def _cap(self):
        return min(self.patch_size, self.max_patch_length or self.patch_size)

    def describe(self):
        return f"static, patch_size {self.patch_size}" + (f", max_patch_length {self.max_patch_length}" if self.max_patch_length else "")


class BytePatcher(Patcher):
    """Every byte is a patch (what the entropy model trains with)."""

    name = "byte"

    def _rule(self, ids):
        return torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.bool, device=ids.device)


class SpacePatcher(Patcher):
    """BLT's space patching: a patch starts after the first byte of each run of non-word bytes
    (ASCII non-alphanumerics and special ids; bytes >= 0x80 are word bytes, see the module doc)."""

    name = "space"

    def _rule(self, ids):
        nw = _nonword(ids)
        end = nw.clone()
        end[:, 1:] &= ~nw[:, :-1]  # only the first non-word byte of a run ends a patch
        s = _empty(ids)
        s[:, 1:] = end
        return s


class EntropyPatcher(Patcher):
    """Entropy patching with a (frozen) ``BltPatcher`` byte LM; entropies in nats, computed
    without gradients, in fp32 (autocast off), ``batch_size`` rows at a time (no padding, so a
    row's entropies never depend on the other rows)."""

    name = "entropy"

    def __init__(self, model, threshold: float, monotonic: bool = False, max_patch_length: int | None = None,
                 batch_size: int = 8):
        super().__init__(max_patch_length)
        if threshold is None:
            raise ByteifyError("entropy patching needs a threshold (calibrate the model with 'byteify calibrate')")
        self.model, self.threshold, self.monotonic, self.batch_size = model, float(threshold), monotonic, batch_size

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.autocast(ids.device.type, enabled=False):
            for chunk in ids.split(self.batch_size):
                ent, _, _ = self.model(chunk)
                out.append(ent.float())
        return torch.cat(out)

    def starts_from_entropies(self, ids: torch.Tensor, entropies: torch.Tensor) -> torch.Tensor:
        """[B, T+1] from precomputed entropies (what a cache of entropies would feed)."""
        s = entropy_starts(entropies, self.threshold, self.monotonic, include_next=True)
        return cap_length(s | forced_starts(ids), self.max_patch_length)

    def starts_with_next(self, ids):
        return self.starts_from_entropies(ids, self.entropies(ids))

    def describe(self):
        rule = "monotonic" if self.monotonic else "global"
        return f"entropy ({rule}), threshold {self.threshold:.4f}" + (
            f", max_patch_length {self.max_patch_length}" if self.max_patch_length else "")


def char_byte_offsets(seg: bytes) -> tuple[str, np.ndarray]:
    """Text to tokenize for ``seg`` and the byte offset of each of its characters (plus the end).
    Invalid UTF-8: one U+FFFD per invalid byte, so every byte keeps a place."""
    try:
        text = seg.decode("utf-8")
        arr = np.frombuffer(seg, dtype=np.uint8)
        starts = np.flatnonzero((arr & 0xC0) != 0x80)
    except UnicodeDecodeError:
        raw = seg.decode("utf-8", "surrogateescape")
        sizes = [len(c.encode("utf-8", "surrogateescape")) for c in raw]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
        text = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in raw)
    return text, np.concatenate([starts, [len(seg)]]).astype(np.int64)


class SourceTokenPatcher(Patcher):
    """Boundaries at the source tokenizer's token starts, per run of text bytes (the bytes
    between special ids), tokenized without special tokens.  A boundary sits at the start of
    each token's character span (the end of the previous token's span where the tokenizer
    trims whitespace from offsets), so a multi-byte character is never split.  Not incremental:
    a token's extent depends on the bytes after it."""

    name = "source_tokens"
    incremental = False

    def __init__(self, tokenizer, max_patch_length: int | None = None):
        super().__init__(max_patch_length)
        if not getattr(tokenizer, "is_fast", False):
            raise ByteifyError("patching.mode 'source_tokens' needs a fast (tokenizers) source tokenizer for offsets")
        self.tokenizer = tokenizer

    def segment_starts(self, seg: bytes) -> np.ndarray:
        """Byte offsets (within ``seg``) where a token starts."""
        if not seg:
            return np.zeros(0, np.int64)
        text, char_off = char_byte_offsets(seg)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        bounds = [0]
        prev_end = None
        for a, b in enc["offset_mapping"]:
            if b <= a:
                continue
            start = a if prev_end is None else min(a, prev_end)
            bounds.append(start)
            prev_end = b
        return np.unique(char_off[np.clip(np.asarray(bounds, dtype=np.int64), 0, len(text))])

    def _rule(self, ids):
        s = _empty(ids)
        rows = ids.detach().cpu().numpy()
        for r, row in enumerate(rows):
            text = np.concatenate([[False], row >= OFFSET, [False]])
            edges = np.flatnonzero(text[1:] != text[:-1])  # run starts and ends, alternating
            for a, b in zip(edges[::2], edges[1::2]):
                seg = (row[a:b] - OFFSET).astype(np.uint8).tobytes()
                offs = self.segment_starts(seg)
                s[r, torch.from_numpy(a + offs[offs < b - a])] = True
        return s


# ------------------------------------------------------------------------------------------
# Building patchers


def load_entropy_model(model_dir: str | Path | Location, device="cpu"):
    """(BltPatcher in fp32, eval mode; the BltConfig) from a model directory (or checkpoint or run),
    reading only the ``model.patcher.*`` tensors (the global transformer is never loaded)."""
    from transformers import AutoConfig
    from transformers.models.blt.modeling_blt import BltPatcher

    loc = model_dir if isinstance(model_dir, Location) else locate(model_dir)
    config = AutoConfig.from_pretrained(str(loc.config_dir))
    weights = loc.weights()
    prefix = "model.patcher."
    state = {k[len(prefix):]: weights.get(k).float() for k in weights.keys() if k.startswith(prefix)}
    if not state or config.patcher_config is None:
        raise ByteifyError(f"{loc.config_dir}: no entropy model weights (model.patcher.*) or patcher_config")
    model = BltPatcher(config.patcher_config).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ByteifyError(f"{loc.config_dir}: entropy model weights do not match patcher_config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), config


def build_patcher(spec: PatchingSpec, model=None, *, for_generation: bool = False,
                  model_dir: str | Path | Location | None = None, entropy_model=None, config=None) -> Patcher:
    """The patcher a :class:`~byteify.patching.spec.PatchingSpec` describes.

    ``model`` is the BltForCausalLM (its entropy model and config threshold; its directory for
    the source tokenizer), or pass ``entropy_model`` (a ``BltPatcher``), ``config`` and
    ``model_dir``.  ``for_generation=True`` refuses patchers that are not incremental
    (``source_tokens``)."""
    mode = spec.mode
    mpl = spec.max_patch_length
    if mode == "static":
        return StaticPatcher(spec.patch_size, mpl)
    if mode == "byte":
        return BytePatcher()
    if mode == "space":
        return SpacePatcher(mpl)
    if mode == "entropy":
        ent = entropy_model
        config = config if config is not None else getattr(model, "config", None)
        if ent is None and model is not None:
            ent = getattr(getattr(model, "model", None), "patcher", None)
        if ent is None:
            raise ByteifyError("patching.mode 'entropy' needs a model with an entropy model (patch_in_forward)")
        threshold = spec.threshold
        if threshold is None and config is not None:
            threshold = config_threshold(config, spec.monotonic)
        if threshold is None and spec.monotonic:
            raise ByteifyError("patching.monotonic needs patching.threshold, or a model calibrated with "
                               "'byteify calibrate --monotonic' (patching_monotonic_threshold in config.json)")
        return EntropyPatcher(ent, threshold, spec.monotonic, mpl)
    if mode == "source_tokens":
        if for_generation:
            raise ByteifyError("patching.mode 'source_tokens' cannot be used for generation: the source tokenizer "
                               "looks ahead (a token's end depends on later bytes), so boundaries of a prefix are not "
                               "final; generate with entropy, static, space or byte patching")
        if model_dir is None:
            raise ByteifyError("patching.mode 'source_tokens' needs the model directory (for byteify_source/tokenizer)")
        return SourceTokenPatcher(load_source_tokenizer(model_dir), mpl)
    raise ByteifyError(f"patching.mode '{mode}': unknown; choose one of {', '.join(MODES)}")
