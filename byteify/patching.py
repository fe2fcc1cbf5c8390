"""Patchers: where patches start in a byte sequence.

Every patcher returns a boolean *start mask* ``[B, T]`` that depends on the past only (except
the source-token patcher, whose tokenizer looks ahead), and :func:`lengths_from_starts` turns
it into the right-zero-padded ``patch_lengths`` ``[B, P]`` (each row summing to ``T``) that
``BltForCausalLM.forward`` takes.  Position 0 and every BOS byte are patches of their own.
"""

from __future__ import annotations

import torch

from .tokenizer import BOS_ID, OFFSET


def lengths_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Start mask [B, T] -> patch lengths [B, P], zero-padded on the right.

    Positions 0 and 1 always start (the first byte is a patch of its own, as in BLT).  The last
    patch of each row is counted one byte longer, so rows sum to T + 1: BLT's include-next-byte
    convention.  transformers' decoder assigns byte i to the patch *before* the one holding
    byte i+1 by counting shifted patch starts; without the extra byte, a row right-padded with
    empty patches (because another row of the batch has more) would send its last patch's bytes
    to an empty patch, and a row's logits would depend on the rest of the batch."""
    starts = starts.clone()
    starts[:, : min(2, starts.shape[1])] = True
    patch_id = starts.long().cumsum(1) - 1
    n = int(patch_id[:, -1].max()) + 1
    lengths = torch.zeros(starts.shape[0], n, dtype=torch.long, device=starts.device)
    lengths.scatter_add_(1, patch_id, torch.ones_like(patch_id))
    lengths.scatter_add_(1, patch_id[:, -1:], torch.ones_like(patch_id[:, -1:]))
    return lengths


def starts_from_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    lengths = lengths.clamp(max=seq_len)
    ends = lengths.cumsum(1)
    starts = torch.zeros(lengths.shape[0], seq_len + 1, dtype=torch.bool, device=lengths.device)
    idx = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1).clamp(max=seq_len)
    starts.scatter_(1, idx, lengths > 0)
    return starts[:, :seq_len]


def _force_bos(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """BOS is its own patch: a patch starts at each BOS and right after it; likewise the first
    byte of every sequence (positions 0 and 1 start, as in BLT)."""
    bos = ids == BOS_ID
    starts = starts | bos
    starts[:, 1:] |= bos[:, :-1]
    starts[:, :2] = True
    return starts


def _cap_length(starts: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """Split patches longer than ``max_len`` (a causal rule: depends only on earlier starts)."""
    if not max_len:
        return starts
    starts = starts.clone()
    run = torch.zeros(starts.shape[0], dtype=torch.long, device=starts.device)
    for t in range(starts.shape[1]):
        run = torch.where(starts[:, t], torch.zeros_like(run), run + 1)
        force = run >= max_len
        starts[:, t] |= force
        run = torch.where(force, torch.zeros_like(run), run)
    return starts


class Patcher:
    """Base: subclasses implement ``starts(ids)``."""

    name = "base"
    incremental = True

    def __init__(self, max_patch_length: int | None = None):
        self.max_patch_length = max_patch_length

    def starts(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return lengths_from_starts(self.starts(ids))


class StaticPatcher(Patcher):
    """Fixed-size patches after the BOS patch (counted from position 1 and after each BOS)."""

    name = "static"

    def __init__(self, patch_size: int = 4, max_patch_length: int | None = None):
        super().__init__(max_patch_length)
        self.patch_size = patch_size

    def starts(self, ids):
        s = _force_bos(ids, torch.zeros_like(ids, dtype=torch.bool))
        return _cap_length(s, min(self.patch_size, self.max_patch_length or self.patch_size))


class BytePatcher(Patcher):
    """Every byte is a patch (what the entropy model trains with)."""

    name = "byte"

    def starts(self, ids):
        return torch.ones_like(ids, dtype=torch.bool)


class SpacePatcher(Patcher):
    """BLT's space patching: a patch starts at each byte that follows a non-word byte
    (not ASCII alphanumeric and not a UTF-8 continuation byte); runs of non-word bytes merge."""

    name = "space"

    def starts(self, ids):
        b = ids - OFFSET
        alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
        cont = (b >= 0x80) & (b < 0xC0)
        word = alnum | cont
        nonword = ~word
        s = torch.zeros_like(ids, dtype=torch.bool)
        # start where a word byte follows a non-word byte, or a non-word run follows a word byte
        s[:, 1:] = (word[:, 1:] & nonword[:, :-1]) | (nonword[:, 1:] & word[:, :-1])
        s = _force_bos(ids, s)
        return _cap_length(s, self.max_patch_length)


def entropy_starts(entropies: torch.Tensor, threshold: float, monotonic: bool = False) -> torch.Tensor:
    """BLT's rules: the entropy at position t (predicting t+1) decides whether t+1 starts a patch;
    global: H[t] > threshold; monotonic: H[t] - H[t-1] > threshold.  Positions 0 and 1 start."""
    s = torch.zeros_like(entropies, dtype=torch.bool)
    if monotonic:
        rise = entropies[:, 1:] - entropies[:, :-1]
        s[:, 2:] = rise[:, :-1] > threshold
    else:
        s[:, 1:] = entropies[:, :-1] > threshold
    s[:, :2] = True
    return s


class EntropyPatcher(Patcher):
    """Entropy patching with a (frozen) ``BltPatcher`` byte LM; entropies in nats."""

    name = "entropy"

    def __init__(self, model, threshold: float, monotonic: bool = False, max_patch_length: int | None = None,
                 batch_size: int = 8):
        super().__init__(max_patch_length)
        self.model, self.threshold, self.monotonic, self.batch_size = model, threshold, monotonic, batch_size

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in ids.split(self.batch_size):
            ent, _, _ = self.model(chunk)
            out.append(ent.float())
        return torch.cat(out)

    def starts(self, ids):
        s = entropy_starts(self.entropies(ids), self.threshold, self.monotonic)
        return _cap_length(_force_bos(ids, s), self.max_patch_length)


def build_patcher(spec, model=None) -> Patcher:
    """From a recipe ``PatchingSpec``; ``model`` is the BltForCausalLM (for its entropy model)."""
    from .errors import ByteifyError

    if spec.mode == "static":
        return StaticPatcher(spec.patch_size, spec.max_patch_length)
    if spec.mode == "byte":
        return BytePatcher()
    if spec.mode == "space":
        return SpacePatcher(spec.max_patch_length)
    if spec.mode == "entropy":
        if model is None or getattr(model.model, "patcher", None) is None:
            raise ByteifyError("patching.mode 'entropy' needs a model with an entropy model (patch_in_forward)")
        threshold = spec.threshold if spec.threshold is not None else model.config.patching_threshold
        return EntropyPatcher(model.model.patcher, threshold, spec.monotonic, spec.max_patch_length)
    raise ByteifyError(f"patching.mode '{spec.mode}' is not available yet")
