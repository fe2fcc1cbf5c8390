"""``byteify eval``: bits per byte of a BLT on text, with its patching statistics, and the same
measurement for the source (tokenizer) model, side by side.

**BLT.**  Each document is framed like training data, ``[BOS] + (byte + 4)... + [EOS]``, and cut
into windows of at most ``seq_len + 1`` ids that overlap by one id (window ``k`` holds ids
``k*seq_len ... (k+1)*seq_len``), so every id after the document's BOS is predicted exactly once,
each window with fresh context.  Windows never mix documents; a batch right-pads them with BOE,
and padded positions are neither predicted nor counted.  Bits per byte = sum of next-id
cross-entropy (nats) / ln 2 / number of predicted ids (the document's bytes plus its EOS, as in
training validation).  Patch lengths come from :func:`byteify.patching.build_patcher`.  Patch
statistics count patches that start at a real input position (not padding, not BLT's
include-next-byte patch); bytes per patch and global steps per KB use those that start at a text
byte (not a BOS), as ``byteify calibrate`` does, so they compare with the source's bytes per
token and tokens per KB.

**Source.**  Each document is tokenized by the source tokenizer with its own special tokens (a
BOS if the source adds one), cut into windows of ``source_seq_len + 1`` tokens the same way, and
the summed token NLL (nats) is divided by ln 2 and by the UTF-8 bytes the predicted tokens cover:
all of the document's bytes when its first token is a special token (BOS), otherwise all but the
bytes of that first, unpredicted token.

**Step-0 gate** (``--teacher-forced-bound``, :func:`teacher_forced_bound`).  What the transplanted
global transformer can make of the encoder's patch vectors, before any training: the source
model (rebuilt from the converted directory: its layers, final norm and head) is fed the stock
forward's patch vectors as ``inputs_embeds``, on windows of whole source tokens with one patch
per token (``byteify.train.aligned``), and scored on the next token, next to the same model fed
its own embeddings of the same tokens.  Token bits per byte over the predicted tokens' bytes;
the gate passes when the bound is within 1.6x of the exact-embedding figure.  Source-token
patches look ahead, so this is a bound on what the encoder delivers, not a byte-level figure;
the true bits per byte of the converted model (a fresh decoder: ~8-9 before training) is the
ordinary evaluation beside it.  ``--data default:val`` evaluates on the held-out documents of
the embedded corpus (the recipes' split).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ByteifyError
from .tokenizer import BOE_ID, BOS_ID, EOS_ID, IGNORE_INDEX, OFFSET

LN2 = math.log(2.0)
DEFAULT_HELD_OUT = "default:val"  # --data name: the held-out documents of the embedded corpus
BOUND_TARGET = 1.6  # the step-0 gate: the teacher-forced bound within 1.6x of the exact-embedding figure


# ------------------------------------------------------------------------------------------
@dataclass
class BltResult:
    bits_per_byte: float
    nats: float
    predicted: int  # predicted ids: bytes + one EOS per document
    documents: int
    text_bytes: int
    windows: int
    seq_len: int
    patches: int  # global-transformer positions over real input (BOS patches included, padding excluded)
    text_patches: int  # patches that start at a text byte (not at a BOS)
    input_positions: int  # real (non-padding) input ids
    mean_bytes_per_patch: float  # text bytes / text patches (as 'byteify calibrate' counts)
    global_steps_per_kb: float  # text patches per 1024 text bytes
    patching: dict = field(default_factory=dict)


@dataclass
class SourceResult:
    bits_per_byte: float
    nats: float
    predicted_tokens: int
    bytes_covered: int
    documents: int
    text_bytes: int
    tokens: int  # all tokens, specials included
    windows: int
    seq_len: int
    bytes_per_token: float
    global_steps_per_kb: float  # tokens per 1024 text bytes
    source: str = ""
    adds_bos: bool = False


@dataclass
class EvalReport:
    model: str
    data: list[str]
    documents: int
    text_bytes: int
    blt: BltResult
    source: SourceResult | None = None
    notes: list[str] = field(default_factory=list)
    bound: BoundResult | None = None  # the step-0 gate's teacher-forced bound (--teacher-forced-bound)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.source is not None:
            d["bits_per_byte_gap"] = self.blt.bits_per_byte - self.source.bits_per_byte
        return d


# ------------------------------------------------------------------------------------------
def load_eval_documents(paths: list[str], max_bytes: int | None = None, text_field: str = "text") -> list[bytes]:
    """The documents of the given .txt/.jsonl files (or ``default``, or ``default:val``: the
    embedded corpus's held-out documents, see :func:`held_out_corpus`), in order, capped at
    ``max_bytes`` in total (the last one cut at a UTF-8 character boundary)."""
    from .data.readers import SourceSpec, open_source

    if not paths:
        raise ByteifyError("--data: give at least one .txt or .jsonl file")
    if max_bytes is not None and max_bytes < 1:
        raise ByteifyError(f"--max-bytes {max_bytes}: must be at least 1")
    docs: list[bytes] = []
    total, limit = 0, max_bytes if max_bytes is not None else float("inf")
    for p in paths:
        held = str(p) == DEFAULT_HELD_OUT
        found = ((None, d) for d in held_out_corpus()) if held else \
            open_source(SourceSpec(path=str(p), text_field=text_field)).documents()
        for _, d in found:
            if total + len(d) > limit:
                cut = int(limit - total)
                while 0 < cut < len(d) and (d[cut] & 0xC0) == 0x80:  # not inside a UTF-8 character
                    cut -= 1
                if cut > 0:
                    docs.append(d[:cut])
                total = limit
                break
            docs.append(d)
            total += len(d)
        if total >= limit:
            break
    if not docs:
        raise ByteifyError("--data: no text to evaluate")
    return docs


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Windows of at most ``seq_len + 1`` ids overlapping by one: every id after the first is a
    target of exactly one window."""
    return [ids[s: s + seq_len + 1] for s in range(0, max(len(ids) - 1, 0), seq_len)]


def _batches(rows: list[list[int]], batch_size: int, pad: int):
    """(input_ids [B, T], labels [B, T], real input lengths [B]) per batch of windows, padded on the right."""
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        t = max(len(r) for r in chunk) - 1
        ids = torch.full((len(chunk), t + 1), pad, dtype=torch.long)
        labels = torch.full((len(chunk), t), IGNORE_INDEX, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            labels[j, : len(r) - 1] = torch.tensor(r[1:])
        yield ids[:, :-1].contiguous(), labels, torch.tensor([len(r) - 1 for r in chunk])


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="window", disable=not enabled, leave=False)


def count_patches(ids: torch.Tensor, lengths: torch.Tensor, real: torch.Tensor) -> tuple[int, int]:
    """(patches, text patches) of a batch: patches (from right-zero-padded ``lengths``) that start
    at a real input position (before ``real``, the row's non-padding length; so neither padding
    nor the include-next-byte patch counts), and those of them that start at a text byte."""
    starts = lengths.cumsum(1) - lengths
    real_start = (lengths > 0) & (starts < real[:, None].to(starts.device))
    at = ids.gather(1, starts.clamp(max=ids.shape[1] - 1))
    return int(real_start.sum()), int((real_start & (at >= OFFSET)).sum())


# ------------------------------------------------------------------------------------------
def frame(doc: bytes) -> list[int]:
    return [BOS_ID] + [b + OFFSET for b in doc] + [EOS_ID]


@torch.no_grad()
def evaluate_blt(model, docs: list[bytes], patcher, *, seq_len: int = 1024, batch_size: int = 8,
                 progress: bool = False) -> BltResult:
    """Bits per byte and patch statistics of ``model`` (a ``BltForCausalLM``) on ``docs``."""
    if seq_len < 2:
        raise ByteifyError(f"--seq-len {seq_len}: must be at least 2")
    if batch_size < 1:
        raise ByteifyError(f"--batch-size {batch_size}: must be at least 1")
    model.eval()
    device = next(model.parameters()).device
    rows = [w for d in docs for w in windows(frame(d), seq_len)]
    nats, predicted, patches, text_patches, positions = 0.0, 0, 0, 0, 0
    with _progress(len(rows), progress, "eval") as bar:
        for ids, labels, real in _batches(rows, batch_size, BOE_ID):
            ids, labels = ids.to(device), labels.to(device)
            lengths = patcher(ids)
            logits = model(input_ids=ids, patch_lengths=lengths, use_cache=False).logits
            nats += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
            predicted += int((labels != IGNORE_INDEX).sum())
            n, n_text = count_patches(ids, lengths, real)
            patches, text_patches = patches + n, text_patches + n_text
            positions += int(real.sum())
            bar.update(len(real))
    text_bytes = sum(len(d) for d in docs)
    return BltResult(
        bits_per_byte=nats / max(predicted, 1) / LN2, nats=nats, predicted=predicted, documents=len(docs),
        text_bytes=text_bytes, windows=len(rows), seq_len=seq_len, patches=patches, text_patches=text_patches,
        input_positions=positions, mean_bytes_per_patch=text_bytes / max(text_patches, 1),
        global_steps_per_kb=1024 * text_patches / max(text_bytes, 1),
        patching=describe_patcher(patcher))


def describe_patcher(patcher) -> dict:
    d = {"mode": getattr(patcher, "name", type(patcher).__name__)}
    for k in ("patch_size", "threshold", "monotonic", "max_patch_length"):
        v = getattr(patcher, k, None)
        if v is not None:
            d[k] = v
    return d


# ------------------------------------------------------------------------------------------
def _special_ids(tok) -> set[int]:
    return {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}


def tokenize_document(tok, text: str, specials: set[int] | None = None) -> tuple[list[int], int]:
    """(token ids with the source's own special tokens, UTF-8 bytes the predicted tokens cover)."""
    specials = _special_ids(tok) if specials is None else specials
    total = len(text.encode("utf-8"))
    try:
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True, split_special_tokens=True)
        offsets = enc.get("offset_mapping")
    except (NotImplementedError, TypeError, ValueError):
        enc, offsets = tok(text, add_special_tokens=True), None
    ids = list(enc["input_ids"])
    if len(ids) < 2:
        return ids, 0
    if ids[0] in specials:
        return ids, total
    if offsets is not None:  # the first token is text that nothing predicts
        first = len(text[: offsets[0][1]].encode("utf-8"))
    else:
        first = len(tok.decode(ids[:1]).encode("utf-8"))
    return ids, max(total - first, 0)


@torch.no_grad()
def _token_nll(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token NLL; the LM head runs row by row so a large vocabulary fits in memory."""
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if base is None or head is None:
        logits = model(input_ids=ids, use_cache=False).logits
        return float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state
    total = 0.0
    for h, y in zip(hidden, labels):
        total += float(F.cross_entropy(head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum"))
    return total


@torch.no_grad()
def evaluate_source(model, tok, docs: list[bytes], *, seq_len: int | None = None, batch_size: int = 8,
                    blt_seq_len: int = 1024, progress: bool = False, name: str = "") -> SourceResult:
    """Bits per byte of a token-level causal LM on ``docs`` (see the module docstring).
    ``seq_len`` None: windows of about ``blt_seq_len`` bytes at the source's bytes per token."""
    model.eval()
    device = next(model.parameters()).device
    texts = [d.decode("utf-8", "replace") for d in docs]
    specials = _special_ids(tok)
    encoded = [tokenize_document(tok, t, specials) for t in texts]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids, _ in encoded)
    if seq_len is None:
        seq_len = max(16, round(blt_seq_len * n_tokens / max(text_bytes, 1)))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        seq_len = min(seq_len, max_pos - 1)
    if seq_len < 1:
        raise ByteifyError(f"--source-seq-len {seq_len}: must be at least 1")
    rows = [w for ids, _ in encoded for w in windows(ids, seq_len)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    nats, predicted = 0.0, 0
    with _progress(len(rows), progress, "eval source") as bar:
        for ids, labels, real in _batches(rows, batch_size, pad):
            nats += _token_nll(model, ids.to(device), labels.to(device))
            predicted += int((labels != IGNORE_INDEX).sum())
            bar.update(len(real))
    covered = sum(c for _, c in encoded)
    text_tokens = sum(sum(1 for i in ids if i not in specials) for ids, _ in encoded)
    adds_bos = bool(encoded) and bool(encoded[0][0]) and encoded[0][0][0] in specials
    return SourceResult(
        bits_per_byte=nats / max(covered, 1) / LN2, nats=nats, predicted_tokens=predicted, bytes_covered=covered,
        documents=len(docs), text_bytes=text_bytes, tokens=n_tokens, windows=len(rows), seq_len=seq_len,
        bytes_per_token=text_bytes / max(text_tokens, 1), global_steps_per_kb=1024 * text_tokens / max(text_bytes, 1),
        source=name, adds_bos=adds_bos)


# ------------------------------------------------------------------------------------------
def load_source_model(source, dtype: torch.dtype, device):
    """The source checkpoint (HF directory or GGUF) as a transformers causal LM."""
    from transformers import AutoModelForCausalLM

    try:
        if source.format == "gguf":
            model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    except Exception as exc:
        raise ByteifyError(f"{source.path}: transformers cannot load the source model: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def evaluate(
    model_path: str | Path,
    data: list[str],
    *,
    patching: str | None = None,
    patch_size: int = 4,
    threshold: float | None = None,
    seq_len: int = 1024,
    max_bytes: int | None = None,
    batch_size: int = 8,
    source: str | None = None,
    use_recorded_source: bool = True,
    source_seq_len: int | None = None,
    dtype: str = "fp32",
    device: str = "auto",
    progress: bool = False,
    teacher_forced: bool = False,
) -> EvalReport:
    """Evaluate the BLT at ``model_path`` (and, with ``source`` or a recorded source, the source
    model) on the documents of ``data``.  ``teacher_forced``: also the step-0 gate's bound
    (:func:`teacher_forced_bound`, the source rebuilt from the converted directory)."""
    from .modelfiles import parse_dtype
    from .patching.patchers import build_patcher
    from .resolve import load_blt
    from .train.distributed import device_for

    torch_dtype = parse_dtype(dtype)
    dev = device_for(device)
    docs = load_eval_documents(data, max_bytes)
    inp, model = load_blt(model_path, torch_dtype, dev)
    model.eval()
    meta = inp.metadata
    notes = []
    spec = _patching_spec(model.config, meta, patching, patch_size, threshold, notes)
    patcher = build_patcher(spec, model, model_dir=inp)
    blt = evaluate_blt(model, docs, patcher, seq_len=seq_len, batch_size=batch_size, progress=progress)
    bound = None
    if teacher_forced:
        bound = _step0_bound(inp, model, docs, torch_dtype, dev, seq_len=seq_len, batch_size=batch_size,
                             progress=progress)
    src_result = None
    compared = _source_to_compare(source, use_recorded_source, meta, notes)
    if compared is not None:
        s, tok = compared
        del model
        src_model = load_source_model(s, torch_dtype, dev)
        src_result = evaluate_source(src_model, tok, docs, seq_len=source_seq_len, batch_size=batch_size,
                                     blt_seq_len=seq_len, progress=progress, name=str(s.path))
    return EvalReport(model=str(model_path), data=[str(p) for p in data], documents=len(docs),
                      text_bytes=sum(len(d) for d in docs), blt=blt, source=src_result, notes=notes, bound=bound)


def _patching_spec(config, meta: dict, patching: str | None, patch_size: int, threshold: float | None,
                   notes: list[str]):
    """The patching to evaluate with: the model's default (a note when it is entropy patching with
    an uncalibrated threshold), or ``patching`` with ``patch_size``; ``threshold`` overrides."""
    from .patching.spec import MODES, PatchingSpec, default_patching, uncalibrated

    if patching is None:
        spec = default_patching(config, meta)
        if threshold is None and uncalibrated(spec, meta):
            notes.append(f"patching: entropy with the config's uncalibrated threshold {config.patching_threshold:.4f} "
                         "(BLT's default; run 'byteify calibrate', or pass --patching static)")
    elif patching not in MODES:
        raise ByteifyError(f"--patching '{patching}': expected {', '.join(MODES)}")
    else:
        spec = PatchingSpec(mode=patching, patch_size=patch_size)
    if threshold is not None:
        spec.threshold = threshold
    return spec


def _step0_bound(inp, model, docs: list[bytes], torch_dtype: torch.dtype, dev, *, seq_len: int, batch_size: int,
                 progress: bool) -> BoundResult:
    """The step-0 gate's teacher-forced bound, the source rebuilt from the converted directory."""
    from .resolve import load_source_tokenizer
    from .train.teacher import load_teacher

    teacher = load_teacher(inp, torch_dtype).to(dev)
    bound = teacher_forced_bound(model, teacher, load_source_tokenizer(inp), docs, seq_len=seq_len,
                                 batch_size=batch_size, progress=progress)
    del teacher
    return bound


def _source_to_compare(source: str | None, use_recorded_source: bool, meta: dict, notes: list[str]):
    """(the opened source, its tokenizer) to compare with: ``source``, else (``use_recorded_source``)
    the one recorded at conversion when it still exists; None (with a note why) when there is none
    or the recorded one ships no tokenizer.  An explicit ``source`` without a tokenizer is an error."""
    src = source
    if src is None and use_recorded_source:
        recorded = (meta.get("source") or {}).get("path")
        if recorded and Path(recorded).exists():
            src = recorded
        elif recorded:
            notes.append(f"source: recorded source {recorded} not found; pass --source to compare")
    if src is None:
        return None
    from .convert.sources import open_source

    s = open_source(src)
    tok = s.load_tokenizer()
    if tok is None and source is None:
        notes.append(f"source: recorded source {s.path} ships no tokenizer; not compared")
        return None
    if tok is None:
        raise ByteifyError(f"{s.path}: the source ships no tokenizer that transformers can load")
    return s, tok


def format_report(r: EvalReport) -> str:
    b, s = r.blt, r.source
    p = b.patching
    pdesc = p.get("mode", "?") + (f" {p['patch_size']}" if p.get("mode") == "static" else "") + (
        f" threshold {p['threshold']:.3f}" if p.get("mode") == "entropy" and p.get("threshold") is not None else "")
    lines = [f"data: {', '.join(r.data)}: {r.documents} document(s), {r.text_bytes:,} bytes"]
    rows = [
        ("", "BLT", "source"),
        ("bits per byte", f"{b.bits_per_byte:.4f}", f"{s.bits_per_byte:.4f}" if s else "-"),
        ("bytes per patch / token", f"{b.mean_bytes_per_patch:.2f}", f"{s.bytes_per_token:.2f}" if s else "-"),
        ("global steps per KB", f"{b.global_steps_per_kb:.1f}", f"{s.global_steps_per_kb:.1f}" if s else "-"),
        ("window", f"{b.seq_len} bytes", f"{s.seq_len} tokens" if s else "-"),
        ("predicted", f"{b.predicted:,} bytes", f"{s.predicted_tokens:,} tokens" if s else "-"),
    ]
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    for a, c, d in rows:
        lines.append(f"  {a:<{w0}}  {c:>{w1}}  {d:>14}")
    lines.append(f"BLT: {r.model} (patching {pdesc})")
    if s:
        lines.append(f"source: {s.source} ({'adds BOS' if s.adds_bos else 'no BOS: first token per document unscored'}"
                     f"; {s.bytes_covered:,} bytes scored)")
        lines.append(f"gap: BLT {b.bits_per_byte - s.bits_per_byte:+.4f} bits per byte vs the source "
                     f"({b.bits_per_byte / max(s.bits_per_byte, 1e-12):.2f}x)")
    if r.bound is not None:
        lines.append(format_bound(r.bound))
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The step-0 gate: what the transplanted global transformer can make of the encoder's patch vectors.


def held_out_corpus(max_bytes: int | None = None, val_fraction: float = 0.05, seed: int = 0) -> list[bytes]:
    """The validation documents of the embedded corpus under the recipes' default split
    (``val_fraction`` 0.05, seed 0), in order, capped at ``max_bytes`` (the last one cut at a
    UTF-8 character boundary): the held-out text of ``byteify train``'s validation and of
    ``benchmarks/byteify_quality.py``."""
    from .data.readers import open_source
    from .data.streams import decide_holdout, held_out_documents

    sources = [open_source("default")]
    out, total = [], 0
    docs = held_out_documents(sources, decide_holdout(sources, val_fraction, seed))
    try:
        for d in docs:
            if max_bytes is not None and total + len(d) > max_bytes:
                cut = max_bytes - total
                while 0 < cut < len(d) and (d[cut] & 0xC0) == 0x80:
                    cut -= 1
                if cut > 0:
                    out.append(d[:cut])
                break
            out.append(d)
            total += len(d)
    finally:
        docs.close()
    return out


@dataclass
class BoundResult:
    """The teacher-forced bound: the source model (its layers, final norm and head) fed the BLT
    encoder's patch vectors on source-token-aligned patches, next to the same model fed its own
    input embeddings of the same tokens; token bits per byte over the same predicted tokens."""

    bits_per_byte: float  # teacher fed the BLT's patch vectors
    exact_bits_per_byte: float  # teacher fed its own embeddings
    ratio: float
    target: float
    passed: bool
    patch_rel_error: float  # RMS over patches of |patch vector - embedding| / |embedding| (text tokens)
    predicted_tokens: int
    bytes_covered: int
    windows: int
    seq_len: int
    dtype: str = "float32"


class _Captured(Exception):
    pass


@torch.no_grad()
def encoder_patch_vectors(model, input_ids: torch.Tensor, patch_lengths: torch.Tensor) -> torch.Tensor:
    """The local encoder's patch outputs of the stock ``BltForCausalLM`` forward, [B, P, D]:
    captured where the global transformer receives them (the rest of the forward is skipped)."""
    box = {}

    def hook(_module, _args, kwargs):
        box["x"] = kwargs["inputs_embeds"]
        raise _Captured

    handle = model.model.global_transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model(input_ids=input_ids, patch_lengths=patch_lengths, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box["x"]


@torch.no_grad()
def _teacher_nll(teacher, targets: torch.Tensor, *, input_ids=None, inputs_embeds=None) -> float:
    """Summed next-token NLL (nats) of the teacher over ``targets`` [B, P] (-100: not scored)."""
    hidden = teacher.model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
    total = 0.0
    for h, y in zip(hidden, targets):
        keep = y != IGNORE_INDEX
        if keep.any():
            total += float(F.cross_entropy(teacher.lm_head(h[keep]).float(), y[keep], reduction="sum"))
    return total


@torch.no_grad()
def teacher_forced_bound(model, teacher, tokenizer, docs: list[bytes], *, seq_len: int = 1024, batch_size: int = 8,
                         target: float = BOUND_TARGET, exact_bits_per_byte: float | None = None,
                         patch_vectors=None, progress: bool = False) -> BoundResult:
    """The step-0 teacher-forced bound of ``model`` (a ``BltForCausalLM``) on ``docs``: windows of
    whole source tokens (``byteify.train.aligned``), one BLT patch per source token after the BOS
    patch; the encoder's patch vectors of the stock forward go to the ``teacher`` (the source
    ``LlamaForCausalLM``) as ``inputs_embeds``; token p+1 is predicted at patch p, for the tokens
    inside each window.  Bits per byte = summed NLL / ln 2 / bytes of the predicted tokens.
    ``exact_bits_per_byte``: the exact-embedding figure of an earlier call on the same text,
    teacher and dtype (its forward is then skipped).  ``patch_vectors(model, batch)``: another
    source of patch vectors for an :class:`~byteify.train.aligned.AlignedBatch` (oracles, tests);
    default the stock forward's (:func:`encoder_patch_vectors`)."""
    from .train.aligned import AlignedWindows

    model.eval()
    teacher.eval()
    device = next(teacher.parameters()).device
    aligned = AlignedWindows(docs, tokenizer, seq_len)
    embed = teacher.get_input_embeddings()
    nats = exact = 0.0
    tokens = covered = 0
    err_sq, err_n = 0.0, 0
    with _progress(len(aligned), progress, "bound") as bar:
        for i in range(0, len(aligned), batch_size):
            idx = list(range(i, min(i + batch_size, len(aligned))))
            batch = aligned.batch(idx)
            n_tok = torch.tensor([len(aligned.windows[j][1]) for j in idx])
            P = batch.teacher_ids.shape[1]
            targets = torch.full((len(idx), P), IGNORE_INDEX, dtype=torch.long)
            for r, n in enumerate(n_tok.tolist()):
                targets[r, :n] = batch.next_token[r, :n]
                covered += sum(aligned.windows[idx[r]][2])
            tokens += int(n_tok.sum())
            if patch_vectors is None:
                vectors = encoder_patch_vectors(model, batch.input_ids.to(device), batch.patch_lengths.to(device))[:, :P]
            else:
                vectors = patch_vectors(model, batch)[:, :P]
            teacher_ids = batch.teacher_ids.to(device)
            vectors = vectors.to(embed.weight.dtype)
            nats += _teacher_nll(teacher, targets.to(device), inputs_embeds=vectors)
            if exact_bits_per_byte is None:
                exact += _teacher_nll(teacher, targets.to(device), input_ids=teacher_ids)
            e = embed(teacher_ids).float()
            for r, n in enumerate(n_tok.tolist()):  # text tokens: patches 1..n
                diff = (vectors[r, 1:n + 1].float() - e[r, 1:n + 1]).norm(dim=-1) / e[r, 1:n + 1].norm(dim=-1).clamp(min=1e-12)
                err_sq += float(diff.pow(2).sum())
                err_n += n
            bar.update(len(idx))
    bpb = nats / max(covered, 1) / LN2
    exact_bpb = exact / max(covered, 1) / LN2 if exact_bits_per_byte is None else exact_bits_per_byte
    ratio = bpb / max(exact_bpb, 1e-12)
    return BoundResult(bits_per_byte=bpb, exact_bits_per_byte=exact_bpb, ratio=ratio, target=target,
                       passed=ratio <= target, patch_rel_error=math.sqrt(err_sq / max(err_n, 1)),
                       predicted_tokens=tokens, bytes_covered=covered, windows=len(aligned), seq_len=seq_len,
                       dtype=str(embed.weight.dtype).removeprefix("torch."))


def format_bound(b: BoundResult) -> str:
    return (f"step-0 gate: teacher-forced bound {b.bits_per_byte:.4f} bits/byte (source fed the encoder's patch "
            f"vectors) vs {b.exact_bits_per_byte:.4f} with its own embeddings: {b.ratio:.2f}x, target <= "
            f"{b.target:.1f}x: {'PASS' if b.passed else 'FAIL'} ({b.predicted_tokens:,} tokens, {b.bytes_covered:,} bytes, "
            f"{b.windows} windows of {b.seq_len} bytes; patch vectors' relative error {b.patch_rel_error:.3f})")
