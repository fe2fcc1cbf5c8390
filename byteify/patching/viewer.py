"""``byteify patch``: show where a patcher puts patch boundaries in a text.

In the terminal the patches alternate colours (ANSI escapes) when the output is a TTY, and are
separated by ``|`` otherwise; below, the mean bytes per patch.  With a PNG path, a plot of the
entropy model's per-byte entropy (the entropy of the prediction of each byte, nats) with the
threshold line and the patch starts, like the BLT paper's figure; it needs matplotlib (the
``plot`` extra: ``pip install 'byteify[plot]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ByteifyError
from ..resolve import locate
from ..tokenizer import encode_bytes
from .patchers import EntropyPatcher, char_byte_offsets, build_patcher, load_entropy_model
from .spec import MODES, PatchingSpec, config_threshold, default_patching

PLOT_MAX_BYTES = 400
COLOURS = ("\x1b[30;46m", "\x1b[30;43m")  # black on cyan, black on yellow
RESET = "\x1b[0m"


@dataclass
class PatchView:
    data: bytes  # the text
    starts: np.ndarray  # [len(data)] bool: byte i starts a patch (the BOS patch is not shown)
    entropies: np.ndarray | None  # [len(data)]: entropy (nats) of the prediction of byte i
    threshold: float | None  # entropy patching: the threshold (global or monotonic rule)
    monotonic: bool
    description: str

    @property
    def patches(self) -> int:
        return int(self.starts.sum())

    @property
    def mean_bytes_per_patch(self) -> float:
        return len(self.data) / max(self.patches, 1)

    def pieces(self) -> list[bytes]:
        idx = list(np.flatnonzero(self.starts)) + [len(self.data)]
        return [self.data[a:b] for a, b in zip(idx[:-1], idx[1:])]

    def summary(self) -> str:
        return (f"{len(self.data)} bytes, {self.patches} patches, {self.mean_bytes_per_patch:.2f} bytes/patch "
                f"({self.description})")


def _resolve_spec(config, meta: dict, mode: str | None, threshold: float | None, monotonic: bool,
                  max_patch_length: int | None, patch_size: int | None) -> PatchingSpec:
    """The model's default patching (:func:`~byteify.patching.spec.default_patching`) with the
    command line's choices on top."""
    spec = default_patching(config, meta)
    if mode is not None:
        if mode not in MODES:
            raise ByteifyError(f"--patching '{mode}': unknown; choose one of {', '.join(MODES)}")
        spec = PatchingSpec(mode=mode, patch_size=getattr(config, "patch_size", None) or 4,
                            max_patch_length=getattr(config, "max_patch_length", None))
    given = {"threshold": threshold, "max_patch_length": max_patch_length, "patch_size": patch_size}
    spec = spec.model_copy(update={k: v for k, v in given.items() if v is not None} | ({"monotonic": True} if monotonic else {}))
    if spec.mode == "entropy" and spec.threshold is None:
        spec.threshold = config_threshold(config, spec.monotonic)
        if spec.threshold is None:
            raise ByteifyError("entropy patching: the model config has no "
                               f"{'patching_monotonic_threshold' if spec.monotonic else 'patching_threshold'}; "
                               "pass --threshold or run 'byteify calibrate'")
    return spec


def compute_view(model_dir: str | Path, data: bytes, mode: str | None = None, threshold: float | None = None,
                 monotonic: bool = False, max_patch_length: int | None = None, patch_size: int | None = None,
                 with_entropies: bool = True) -> PatchView:
    """Patch ``[BOS] + data`` with the chosen patcher (default: the model config's patching)."""
    from transformers import AutoConfig

    loc = locate(model_dir)
    if not data:
        raise ByteifyError("no text to patch")
    config = AutoConfig.from_pretrained(str(loc.config_dir))
    spec = _resolve_spec(config, loc.metadata, mode, threshold, monotonic, max_patch_length, patch_size)
    ids = torch.tensor([encode_bytes(data)])
    ent_model = None
    if spec.mode == "entropy" or with_entropies:
        if config.patcher_config is not None:
            limit = config.patcher_config.max_position_embeddings
            if ids.shape[1] > limit:
                raise ByteifyError(f"text of {len(data)} bytes is longer than the entropy model's "
                                   f"{limit} positions; shorten it")
            ent_model, _ = load_entropy_model(loc)
        elif spec.mode == "entropy":
            raise ByteifyError(f"{model_dir}: no entropy model (patch_in_forward is off)")
    patcher = build_patcher(spec, entropy_model=ent_model, config=config, model_dir=loc)
    entropies = None
    if ent_model is not None:
        ent = EntropyPatcher(ent_model, 0.0).entropies(ids)[0].numpy()
        entropies = ent[:-1]  # byte i (id i + 1) is predicted at position i
        if spec.mode == "entropy":
            starts = patcher.starts_from_entropies(ids, torch.from_numpy(ent)[None])[0, : ids.shape[1]]
        else:
            starts = patcher.starts(ids)[0]
    else:
        starts = patcher.starts(ids)[0]
    return PatchView(data=data, starts=starts[1:].numpy().astype(bool), entropies=entropies,
                     threshold=spec.threshold if spec.mode == "entropy" else None,
                     monotonic=spec.mode == "entropy" and spec.monotonic, description=patcher.describe())


def render(view: PatchView, color: bool) -> str:
    """The text with patch boundaries: alternating ANSI background colours, or ``|`` markers."""
    text, offs = char_byte_offsets(view.data)
    starts = view.starts
    out: list[str] = []
    patch = -1
    for i, ch in enumerate(text):
        a, b = int(offs[i]), int(offs[i + 1])
        if starts[a:b].any() or patch < 0:
            patch += 1
            if color:
                out.append(RESET + COLOURS[patch % 2])
            elif patch > 0:
                out.append("|")
        if color and ch == "\n":
            out.append(RESET + "\n" + COLOURS[patch % 2])
        else:
            out.append(ch)
    if color:
        out.append(RESET)
    return "".join(out)


def _label(b: int) -> str:
    if b == 0x20:
        return "\u2423"  # open box
    if b == 0x0A:
        return "\u23ce"
    if 0x21 <= b < 0x7F:
        return chr(b)
    return f"x{b:02x}"


def plot_png(view: PatchView, path: str | Path, max_bytes: int = PLOT_MAX_BYTES) -> Path:
    """Per-byte entropy, the threshold line and the patch starts (the first ``max_bytes`` bytes)."""
    try:
        import matplotlib
    except ImportError:
        raise ByteifyError("--png needs matplotlib: pip install 'byteify[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if view.entropies is None:
        raise ByteifyError("--png needs the model's entropy model (patch_in_forward)")
    n = min(len(view.data), max_bytes)
    ent = view.entropies[:n]
    x = np.arange(n)
    width = float(np.clip(n * 0.13, 8, 48))
    fig, ax = plt.subplots(figsize=(width, 3.6), dpi=110)
    ax.plot(x, ent, color="#1f5fa8", lw=1.2, marker="o", ms=2.5, zorder=3)
    first = np.flatnonzero(view.starts[:n])
    ax.scatter(first, ent[first], color="#d62728", s=12, zorder=4, label="patch start")
    bounds = list(np.flatnonzero(view.starts[:n])) + [n]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if i % 2:
            ax.axvspan(a - 0.5, b - 0.5, color="#f0f0f0", lw=0, zorder=0)
        ax.axvline(a - 0.5, color="#999999", lw=0.7, zorder=1)
    if view.threshold is not None and not view.monotonic:
        ax.axhline(view.threshold, color="#d62728", ls="--", lw=1.2, label=f"threshold {view.threshold:.3f}", zorder=2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xlim(-0.8, n - 0.2)
    top = max(float(np.max(ent)) if n else 1.0, view.threshold or 0.0)
    ax.set_ylim(0, top * 1.12 + 1e-6)
    ax.set_ylabel("entropy (nats)")
    if n <= 200:
        ax.set_xticks(x)
        ax.set_xticklabels([_label(b) for b in view.data[:n]], fontsize=7, family="monospace")
    else:
        ax.set_xlabel("byte")
    shown = "" if n == len(view.data) else f", first {n} of {len(view.data)} bytes"
    ax.set_title(f"{view.description}: {view.patches} patches, {view.mean_bytes_per_patch:.2f} bytes/patch{shown}"
                 + " (grey lines: patch starts)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
