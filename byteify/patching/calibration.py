"""Entropy-threshold calibration: choose the entropy patching threshold so that the mean bytes
per patch on held-out text equals a target.

By default the target is the *source tokenizer's* mean bytes per token on the same text (the
tokenizer ``byteify convert`` kept in ``MODEL/byteify_source/tokenizer``; without it, the
``source_bytes_per_token`` that ``byteify.json`` recorded on the probe text), so the
transplanted global transformer sees about as many units per text as in its pretraining.

The entropies are computed once (the entropy model is the expensive part); the threshold is then
found by bisection over them: the mean bytes per patch is a non-decreasing step function of the
threshold, for the global and the monotonic rule, with or without ``max_patch_length``.  The
chosen threshold is moved to the middle of its step (halfway between the two neighbouring
entropy values), so tiny numerical differences (another device, batch or dtype) do not move
boundaries of the calibration text.

Held-out text is cut into windows exactly as training rows are (documents framed as
``[BOS] bytes [EOS]``, packed, ``seq_len`` ids per window); bytes per patch counts text bytes
and the patches that start at a text byte (a BOS patch is not counted).  The spread is the
standard deviation of bytes per patch over windows (those at least a quarter full of text).

The result goes into the model directory's ``config.json`` (``patching_mode="entropy"``,
``patch_in_forward=True``, ``patching_threshold``, ``max_patch_length``), so plain
``BltForCausalLM`` patches by itself with the same boundaries as byteify's
:class:`~byteify.patching.EntropyPatcher`.  A *monotonic* threshold cannot be expressed in the
stock config (transformers only implements the global rule): it is written as
``patching_monotonic_threshold``, which byteify reads and transformers ignores, and
``patching_threshold`` is left alone.  ``byteify.json`` records the calibration.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ByteifyError
from ..modelfiles import atomic_write_text, read_json
from ..resolve import METADATA_FILE, Location, load_source_tokenizer, locate
from ..tokenizer import OFFSET
from .patchers import cap_length, forced_starts, build_patcher, entropy_starts, load_entropy_model
from .spec import MODES, PatchingSpec


@dataclass
class Calibration:
    threshold: float
    monotonic: bool
    max_patch_length: int | None
    target_bytes_per_patch: float
    target_from: str  # "given" | "source tokenizer on the data" | "byteify.json source_bytes_per_token"
    mean_bytes_per_patch: float
    std_bytes_per_patch: float  # over windows
    source_bytes_per_token: float | None  # the source tokenizer on the same text, if available
    windows: int
    bytes: int
    patches: int
    reachable: bool = True  # False: the target lies outside what any threshold gives
    boundaries: dict | None = None  # agreement with the source tokenizer's token starts (precision, recall, f1)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        rule = "monotonic" if self.monotonic else "global"
        line = (f"calibrated {rule} entropy threshold {self.threshold:.4f} nats: {self.mean_bytes_per_patch:.3f} "
                f"bytes/patch (std {self.std_bytes_per_patch:.3f} over {self.windows} windows, {self.bytes:,} bytes), "
                f"target {self.target_bytes_per_patch:.3f} ({self.target_from})")
        if self.source_bytes_per_token is not None and self.target_from != "source tokenizer on the data":
            line += f"; source tokenizer: {self.source_bytes_per_token:.3f} bytes/token"
        if not self.reachable:
            line += "; the target is out of reach, this is the closest"
        if self.boundaries:
            b = self.boundaries
            line += (f"; patch starts vs source-token starts: precision {b['precision']:.3f}, recall {b['recall']:.3f}, "
                     f"F1 {b['f1']:.3f}")
        return line


# ------------------------------------------------------------------------------------------
# The entropy model alone


@torch.no_grad()
def compute_entropies(entropy_model, ids: torch.Tensor, batch_size: int = 8, progress=None) -> torch.Tensor:
    """Next-byte entropies (nats, fp32) [N, T] of windows [N, T], ``batch_size`` at a time."""
    device = next(entropy_model.parameters()).device
    out = []
    with torch.autocast(device.type, enabled=False):
        for chunk in ids.split(batch_size):
            ent, _, _ = entropy_model(chunk.to(device))
            out.append(ent.float().cpu())
            if progress is not None:
                progress(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, ids.shape[1])


# ------------------------------------------------------------------------------------------
# Held-out windows


def held_out_windows(sources, seq_len: int, val_fraction: float = 0.0, seed: int = 0,
                     max_bytes: int | None = None) -> torch.Tensor:
    """Windows [N, seq_len] of held-out text, framed and packed like training rows (inputs only):
    with ``val_fraction`` > 0 the documents a recipe with the same data, ``val_fraction`` and
    ``seed`` holds out, with 0 all documents of the sources; read only until ``max_bytes``."""
    from ..data.readers import open_source
    from ..data.streams import pack_rows, validation_rows

    max_rows = None if max_bytes is None else max(1, -(-max_bytes // seq_len))
    if val_fraction > 0:
        rows, _ = validation_rows(sources, seq_len, val_fraction, seed, max_rows)
    else:
        docs = (doc for s in sources for _, doc in open_source(s).documents())
        rows = pack_rows(docs, seq_len, max_rows)
    if not len(rows):
        raise ByteifyError("calibration: the data holds no held-out text")
    return limit_windows(torch.from_numpy(rows[:, :-1].astype(np.int64)), max_bytes)


def limit_windows(rows: torch.Tensor, max_bytes: int | None) -> torch.Tensor:
    if max_bytes is None or rows.numel() <= max_bytes:
        return rows
    n = max(1, max_bytes // rows.shape[1])
    idx = torch.from_numpy(np.unique(np.linspace(0, rows.shape[0] - 1, n).round().astype(np.int64)))
    return rows[idx]


def text_segments(ids: torch.Tensor) -> list[bytes]:
    """The runs of text bytes (between special ids) of every window."""
    out = []
    for row in ids.cpu().numpy():
        text = np.concatenate([[False], row >= OFFSET, [False]])
        edges = np.flatnonzero(text[1:] != text[:-1])
        out.extend((row[a:b] - OFFSET).astype(np.uint8).tobytes() for a, b in zip(edges[::2], edges[1::2]))
    return out


def tokenizer_bytes_per_token(tokenizer, ids: torch.Tensor) -> float:
    """The source tokenizer's mean bytes per token on exactly the text bytes of the windows."""
    n_bytes = n_tokens = 0
    for seg in text_segments(ids):
        n_bytes += len(seg)
        n_tokens += len(tokenizer(seg.decode("utf-8", "replace"), add_special_tokens=False)["input_ids"])
    if n_tokens == 0:
        raise ByteifyError("calibration: the held-out text is empty")
    return n_bytes / n_tokens


# ------------------------------------------------------------------------------------------
# Bisection


def boundary_agreement(ids: torch.Tensor, starts: torch.Tensor, tokenizer) -> dict:
    """Precision, recall and F1 of patch starts [N, T] against the source tokenizer's token starts
    on the text bytes of windows ``ids`` (positions 0 and 1 and bytes after BOS/EOS, which every
    patcher starts, are left out)."""
    from .patchers import SourceTokenPatcher, forced_starts

    truth = torch.cat([SourceTokenPatcher(tokenizer).starts(chunk) for chunk in ids.split(64)])
    scored = (ids >= OFFSET) & ~forced_starts(ids)[:, : ids.shape[1]]
    pred, true = starts[:, : ids.shape[1]] & scored, truth & scored
    tp = int((pred & true).sum())
    precision, recall = tp / max(int(pred.sum()), 1), tp / max(int(true.sum()), 1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12)}


def patch_stats(ids: torch.Tensor, starts: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(text bytes, patches starting at a text byte, bytes/patch per window) for starts [N, T];
    the per-window numbers (for the spread) skip windows with less than a quarter of text (the
    padded tail of the packed text), whose ratios would be noise."""
    text = ids >= OFFSET
    b = text.sum(1)
    p = (starts[:, : ids.shape[1]] & text).sum(1)
    keep = (p > 0) & (b >= max(1, ids.shape[1] // 4))
    per = b[keep].double() / p[keep].double()
    return int(b.sum()), int(p.sum()), per


class _Evaluator:
    def __init__(self, ids, entropies, monotonic, max_patch_length):
        self.ids, self.ent = ids, entropies
        self.monotonic, self.mpl = monotonic, max_patch_length
        self.forced = forced_starts(ids)[:, : ids.shape[1]]
        self.text_bytes = int((ids >= OFFSET).sum())

    def starts(self, thr: float) -> torch.Tensor:
        s = entropy_starts(self.ent, thr, self.monotonic) | self.forced
        return cap_length(s, self.mpl)

    def mean(self, thr: float) -> float:
        _, p, _ = patch_stats(self.ids, self.starts(thr))
        return self.text_bytes / max(p, 1)

    def values(self) -> torch.Tensor:
        v = self.ent[:, 1:] - self.ent[:, :-1] if self.monotonic else self.ent
        return v.flatten().double()


def find_threshold(entropies: torch.Tensor, ids: torch.Tensor, target: float, monotonic: bool = False,
                   max_patch_length: int | None = None, iterations: int = 60) -> tuple[float, bool]:
    """(threshold, reachable): bisection for mean bytes/patch == target on precomputed entropies,
    the closer of the two sides of the final step, moved to the middle of its step."""
    ev = _Evaluator(ids, entropies.float(), monotonic, max_patch_length)
    vals = torch.unique(ev.values())
    if vals.numel() == 0:
        raise ByteifyError("calibration: windows too short to calibrate (need at least 3 ids)")
    lo, hi = float(vals[0]) - 1.0, float(vals[-1]) + 1.0
    f_lo, f_hi = ev.mean(lo), ev.mean(hi)
    reachable = f_lo <= target <= f_hi
    if target <= f_lo:
        thr = lo
    elif target >= f_hi:
        thr = hi
    else:
        for _ in range(iterations):  # invariant: f(lo) < target <= f(hi)
            mid = 0.5 * (lo + hi)
            if ev.mean(mid) < target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-7:
                break
        thr = lo if abs(ev.mean(lo) - target) < abs(ev.mean(hi) - target) else hi
    # the middle of the step holding thr: halfway between the neighbouring breakpoints
    below, above = vals[vals <= thr], vals[vals > thr]
    a = float(below[-1]) if below.numel() else thr - 1.0
    b = float(above[0]) if above.numel() else thr + 1.0
    return 0.5 * (a + b), reachable


def calibrate(entropy_model, ids: torch.Tensor, *, target: float | None = None, tokenizer=None,
              fallback_bytes_per_token: float | None = None, monotonic: bool = False,
              max_patch_length: int | None = None, batch_size: int = 8, entropies: torch.Tensor | None = None,
              progress=None) -> Calibration:
    """Calibrate on windows ``ids`` [N, T] (entropies computed once unless given)."""
    if ids.numel() == 0:
        raise ByteifyError("calibration: no held-out text")
    bpt = tokenizer_bytes_per_token(tokenizer, ids) if tokenizer is not None else None
    if target is not None:
        target_from = "given"
    elif bpt is not None:
        target, target_from = bpt, "source tokenizer on the data"
    elif fallback_bytes_per_token:
        target, target_from = float(fallback_bytes_per_token), "byteify.json source_bytes_per_token"
    else:
        raise ByteifyError("calibration: no source tokenizer and no source_bytes_per_token in byteify.json; "
                           "give a target (--target-bytes-per-patch / calibration.target_bytes_per_patch)")
    if not target > 1.0:
        raise ByteifyError(f"calibration: target bytes per patch must be > 1, got {target}")
    if entropies is None:
        entropies = compute_entropies(entropy_model, ids, batch_size, progress)
    thr, reachable = find_threshold(entropies, ids, target, monotonic, max_patch_length)
    ev = _Evaluator(ids, entropies.float(), monotonic, max_patch_length)
    starts = ev.starts(thr)
    n_bytes, n_patches, per = patch_stats(ids, starts)
    mean = n_bytes / max(n_patches, 1)
    std = float(per.std(unbiased=False)) if per.numel() > 1 else 0.0
    agreement = boundary_agreement(ids, starts, tokenizer) if tokenizer is not None else None
    return Calibration(threshold=thr, monotonic=monotonic, max_patch_length=max_patch_length,
                       target_bytes_per_patch=float(target), target_from=target_from, mean_bytes_per_patch=mean,
                       std_bytes_per_patch=std, source_bytes_per_token=bpt, windows=int(ids.shape[0]),
                       bytes=n_bytes, patches=n_patches, reachable=reachable, boundaries=agreement)


# ------------------------------------------------------------------------------------------
# Model directories


def _source_tokenizer(loc: Location):
    return load_source_tokenizer(loc) if loc.source_tokenizer_dir is not None else None


def write_calibration(model_dir: str | Path, cal: Calibration) -> None:
    """Threshold (and patching settings) into ``config.json``, the record into ``byteify.json``;
    each file written to a temporary file and renamed over the old one (atomic)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["patch_in_forward"] = True
    cfg["patching_mode"] = "entropy"
    cfg["max_patch_length"] = cal.max_patch_length
    if cal.monotonic:
        cfg["patching_monotonic_threshold"] = cal.threshold
    else:
        cfg["patching_threshold"] = cal.threshold
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    meta_path = model_dir / METADATA_FILE
    meta = read_json(meta_path)
    meta["calibration" + ("_monotonic" if cal.monotonic else "")] = cal.to_dict()
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_model_dir(src: Path, out: Path, force: bool = False) -> None:
    """Copy a model directory (hard links where possible; files are only ever replaced, never
    modified in place), via a temporary directory renamed into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ByteifyError(f"{out}: exists and is not empty; pass --force to replace it")
    if out.resolve() == Path(src).resolve():
        raise ByteifyError(f"{out}: is the model directory itself; leave out --out to calibrate in place")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=str(out.parent), prefix=f".{out.name}.tmp-"))
    try:
        shutil.copytree(src, tmp / "m", copy_function=_link_or_copy)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "m", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def calibrate_model_dir(model_dir: str | Path, ids: torch.Tensor, *, target: float | None = None,
                        monotonic: bool = False, max_patch_length: int | None = None, batch_size: int = 8,
                        device="cpu", out: str | Path | None = None, force: bool = False, write: bool = True,
                        progress=None) -> Calibration:
    """Load MODEL's entropy model, calibrate on windows ``ids`` and write the result into MODEL's
    model directory (in place) or into a copy at ``out``."""
    loc = locate(model_dir)
    if loc.model_dir is None:
        raise ByteifyError(f"{model_dir}: a sharded checkpoint; calibrate writes into a model directory "
                           "(export it first, or use the end of a stage's checkpoint, which has model/)")
    model_dir = loc.model_dir
    entropy_model, _ = load_entropy_model(loc, device)
    # the source tokenizer gives the default target, and the report's bytes/token otherwise
    tokenizer = _source_tokenizer(loc)
    cal = calibrate(entropy_model, ids, target=target, tokenizer=tokenizer,
                    fallback_bytes_per_token=loc.metadata.get("source_bytes_per_token"), monotonic=monotonic,
                    max_patch_length=max_patch_length, batch_size=batch_size, progress=progress)
    if write:
        dest = model_dir
        if out is not None:
            copy_model_dir(model_dir, Path(out), force)
            dest = Path(out)
        write_calibration(dest, cal)
    return cal



def measure_patcher(model_dir: str | Path, ids: torch.Tensor, mode: str, *, threshold: float | None = None,
                    monotonic: bool = False, max_patch_length: int | None = None, patch_size: int = 4,
                    batch_size: int = 8) -> dict:
    """Bytes per patch that a patcher gives on windows ``ids`` (no calibration, nothing written),
    with the source tokenizer's bytes/token on the same text when available."""
    if mode not in MODES:
        raise ByteifyError(f"--patching '{mode}': unknown; choose one of {', '.join(MODES)}")
    loc = locate(model_dir)
    ent_model = config = None
    if mode == "entropy":
        ent_model, config = load_entropy_model(loc)
    spec = PatchingSpec(mode=mode, patch_size=patch_size, threshold=threshold, monotonic=monotonic,
                        max_patch_length=max_patch_length)
    patcher = build_patcher(spec, entropy_model=ent_model, config=config, model_dir=loc)
    starts = torch.cat([patcher.starts(chunk) for chunk in ids.split(batch_size)])
    n_bytes, n_patches, per = patch_stats(ids, starts)
    tok = _source_tokenizer(loc)
    return {"mode": patcher.describe(), "mean_bytes_per_patch": n_bytes / max(n_patches, 1),
            "std_bytes_per_patch": float(per.std(unbiased=False)) if per.numel() > 1 else 0.0,
            "windows": int(ids.shape[0]), "bytes": n_bytes, "patches": n_patches,
            "source_bytes_per_token": tokenizer_bytes_per_token(tok, ids) if tok is not None else None,
            "boundaries": boundary_agreement(ids, starts, tok) if tok is not None else None}
