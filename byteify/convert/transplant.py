"""Conversion: stream a validated source checkpoint into a BLT model directory that
``transformers.AutoModelForCausalLM`` loads as ``BltForCausalLM``.

The source's decoder layers become the global transformer, tensor by tensor, following the
declarative map (``tensor_maps/llama.json``) and the few transforms that need code
(:data:`TRANSFORMS`, the RoPE permutation).  Fresh parts come from :mod:`byteify.fresh`.
The output is built in a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import ByteifyError
from ..modelfiles import AtomicDirectory, ShardWriter, check_output_path, dtype_name, parse_dtype, parse_size, write_json
from ..resolve import METADATA_FILE, SIDE_DIR
from ..tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_byte_tokenizer
from .fresh import fresh_parts, fresh_shapes
from .memory import release_freed_memory
from .presets import ArchitectureSpec, resolve
from .sources import SourceCheckpoint, load_tensor_map, sha256_file


def rope_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF Llama q/k rows are ordered for ``rotate_half`` (first half, second half of each head);
    BLT rotates adjacent pairs (Meta's interleaved convention).  Reorder each head's rows
    (x0..x_{d/2-1}, y0..y_{d/2-1}) -> (x0, y0, x1, y1, ...)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim).contiguous()


def interleaved_to_rope_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`rope_to_interleaved` (used when exporting back to Llama layout)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim).contiguous()


TRANSFORMS = {"rope_to_interleaved": rope_to_interleaved}


def apply_transform(entry: dict, fmt: str, tensor: torch.Tensor, config) -> torch.Tensor:
    spec = entry.get("transform", {}).get(fmt)
    if not spec:
        return tensor
    name, arg = spec
    return TRANSFORMS[name](tensor, getattr(config, arg))


def global_params(source: SourceCheckpoint) -> int:
    d = source.dims()
    per_layer = d["hidden"] * (2 * d["q_dim"] + 2 * d["kv_dim"]) + 3 * d["hidden"] * d["ffn"] + 2 * d["hidden"]
    return per_layer * source.config.num_hidden_layers


def build_blt_config(source: SourceCheckpoint, spec: ArchitectureSpec):
    """The full ``BltConfig``: global transformer = the source's shape; the rest from the spec."""
    from transformers import BltConfig

    s = resolve(spec, source.config.hidden_size, global_params(source))
    src = source.config
    global_cfg = {k: getattr(src, k) for k in load_tensor_map()["global_config_from_source"]}
    global_cfg["rope_parameters"] = dict(global_cfg["rope_parameters"])

    def local(part, **extra):
        return {
            "hidden_size": part.hidden_size, "num_attention_heads": part.num_attention_heads,
            "num_hidden_layers": part.num_hidden_layers, "intermediate_size": part.intermediate_size,
            "cross_attn_k": s.cross_attn_k, "hidden_size_global": src.hidden_size,
            "max_position_embeddings": s.max_byte_positions, "rms_norm_eps": src.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": part.rope_theta}, **extra,
        }

    e = s.entropy
    config = BltConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=src.max_position_embeddings,
        patch_in_forward=True,
        patching_mode=s.patching.mode,
        patching_threshold=s.patching.threshold,
        patch_size=s.patching.patch_size,
        max_patch_length=s.patching.max_patch_length,
        local_attention_window_len=s.local_attention_window,
        cross_attn_k=s.cross_attn_k,
        encoder_hash_byte_group_size=list(s.hash.ngram_sizes),
        encoder_hash_byte_group_vocab=s.hash.vocab_size,
        encoder_hash_byte_group_nb_functions=s.hash.functions,
        encoder_config=local(s.encoder, cross_attn_all_layers=False),
        decoder_config=local(s.decoder, cross_attn_all_layers=True),
        global_config=global_cfg,
        patcher_config={
            "hidden_size": e.hidden_size, "num_hidden_layers": e.num_hidden_layers,
            "num_attention_heads": e.num_attention_heads, "intermediate_size": e.intermediate_size,
            "sliding_window": e.sliding_window, "max_position_embeddings": e.max_position_embeddings,
            "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_theta},
        },
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        # transformers 5.24's BLT fails to build its cache (AttributeError on num_hidden_layers):
        # forward passes and generate() must run cache-free unless byteify's generator is used.
        use_cache=False,
    )
    config.architectures = ["BltForCausalLM"]
    return config, s


def _converted(blocks, dtype):
    """``blocks`` cast to ``dtype``, each released before the next is read."""
    for block in blocks:
        out = block.to(dtype)
        del block
        yield out
        del out


def _counted(chunks, bar):
    for c in chunks:
        bar.update(c.numel() * c.element_size())
        yield c


@dataclass
class ConvertReport:
    out: Path
    config: object
    shards: list[str]
    seconds: float
    source_bytes_per_token: float | None = None
    verification: object | None = None
    warnings: list[str] = field(default_factory=list)
    warm_start: dict | None = None  # the vocabulary warm start's statistics, when it ran


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled, leave=False)


def convert(
    source: SourceCheckpoint,
    out: str | Path,
    spec: ArchitectureSpec,
    *,
    seed: int = 0,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
    progress: bool = True,
    log=print,
) -> ConvertReport:
    """Write the BLT for ``source`` to ``out``; see the module docstring."""
    t0 = time.perf_counter()
    out = Path(out)
    check_output_path(source.path, out, force)
    out_dtype = source.dtype if dtype == "auto" else parse_dtype(dtype, allowed=("auto", "fp32", "fp16", "bf16"))
    max_bytes = parse_size(max_shard_size)
    config, resolved = build_blt_config(source, spec)
    warnings = []
    sw = getattr(source.config, "sliding_window", None)
    if sw and sw < source.config.max_position_embeddings:
        warnings.append(f"source uses a {sw}-token sliding window; BLT's global attention is full causal")

    with AtomicDirectory(out) as tmp:
        layer_entries = list(source.layer_entries())
        fresh_bytes = sum(math.prod(shape) for shape in fresh_shapes(config).values()) * out_dtype.itemsize
        total = sum(source.nbytes(n) for n, _, _ in layer_entries) + fresh_bytes
        copied = [n for n, _, _ in layer_entries] + [n for n, _, _ in source.side_entries()]
        _check_disk_space(out, tmp, fresh_bytes + out_dtype.itemsize * sum(math.prod(source.shape(n)) for n in copied))
        writer = ShardWriter(tmp, max_bytes)
        tokenizer, warm = None, None
        if resolved.vocab_warm_start.enabled:  # from the source's own embeddings, whatever the output dtype
            tokenizer = source.load_tokenizer()
            warm = _plan_warm_start(source, config, resolved, tokenizer, seed)
        embeddings_rms = _write_side_weights(source, tmp, out_dtype)  # before the fresh init: it needs the RMS
        with _progress(total, progress, "convert") as bar:
            target_rms = embeddings_rms if (spec.match_embedding_scale and warm is None) else None
            for name, shape, chunks in fresh_parts(config, seed, out_dtype, patch_rms=target_rms, warm=warm):
                writer.add_chunks(name, shape, out_dtype, _counted(chunks, bar))
            for src_name, blt_name, entry in layer_entries:
                t = apply_transform(entry, source.format, source.read(src_name), source.config)
                writer.add(blt_name, t.to(out_dtype))
                del t  # before the next read: one source tensor in memory at a time
                bar.update(source.nbytes(src_name))
        shards = writer.close()
        config.dtype = dtype_name(out_dtype)
        config.save_pretrained(str(tmp))
        save_byte_tokenizer(tmp)
        bpt = _write_side_files(source, tmp, tokenizer)
        warm_stats = warm.stats if warm is not None else None
        del warm
        _write_metadata(source, tmp, resolved, out_dtype, seed, bpt, warnings, warm_stats)
        report = ConvertReport(out=out, config=config, shards=shards, seconds=0.0, source_bytes_per_token=bpt,
                               warnings=warnings, warm_start=warm_stats)
        if verify:
            from .verification import verify_transplant

            report.verification = verify_transplant(source, tmp, tolerance=tolerance, log=log)
            meta = json.loads((tmp / METADATA_FILE).read_text())
            v = report.verification
            meta["verification"] = {"max_abs": v.max_abs, "max_rel": v.max_rel, "tolerance": v.tolerance,
                                    "probe_tokens": v.n_tokens, "passed": v.passed}
            write_json(tmp / METADATA_FILE, meta)
            if not report.verification.passed:
                raise ByteifyError(
                    f"verification failed: max relative difference {report.verification.max_rel:.3e} "
                    f"> tolerance {tolerance:.1e} (max abs {report.verification.max_abs:.3e}); nothing written"
                )
    report.seconds = time.perf_counter() - t0
    return report


def _check_disk_space(out: Path, tmp: Path, need: int) -> None:
    """Refuse before writing any weight when the output's file system cannot hold ``need`` bytes of
    them (64 MiB more for headers, config, tokenizer and index files)."""
    free = shutil.disk_usage(tmp).free
    if need + (64 << 20) > free:
        raise ByteifyError(
            f"{out}: not enough disk space for the conversion: it writes {need / 2**20:,.1f} MiB of weights, "
            f"{free / 2**20:,.1f} MiB free (choose another output directory, or --dtype bf16 to halve it)"
        )


def _write_side_weights(source: SourceCheckpoint, tmp: Path, out_dtype: torch.dtype) -> float | None:
    """Source embeddings / head / final norm beside the BLT (row blocks, one file); returns the
    input embeddings' root-mean-square, tallied on the way (None if the source has none)."""
    side = tmp / SIDE_DIR
    side.mkdir()
    writer = ShardWriter(side, 1 << 62, prefix="source_weights", header_reserve=4096)  # one file, streamed
    tally = [0.0, 0]
    for src_name, name, _ in source.side_entries():
        blocks = _converted(source.read_rows(src_name), out_dtype)
        if name == "embed_tokens.weight":
            blocks = _tallied(blocks, tally)
        writer.add_chunks(name, source.shape(src_name), out_dtype, blocks)
    writer.close()
    source.close()  # unmap the shard
    release_freed_memory()
    return math.sqrt(tally[0] / tally[1]) if tally[1] else None


def _tallied(blocks, tally: list):
    """``blocks`` passed through, their sum of squares and element count added to ``tally``."""
    for block in blocks:
        tally[0] += float(block.float().pow(2).sum())
        tally[1] += block.numel()
        yield block
        del block


def _plan_warm_start(source: SourceCheckpoint, config, resolved: ArchitectureSpec, tokenizer, seed: int):
    """The vocabulary warm start (:mod:`byteify.convert.warmstart`) from the source tokenizer and
    the source's input embeddings (read twice, in row blocks)."""
    from .warmstart import plan_warm_start

    if tokenizer is None:
        raise ByteifyError(f"{source.path}: vocab_warm_start needs the source tokenizer, and the source ships none "
                           "that transformers can load")
    name = next(src for src, side, _ in source.side_entries() if side == "embed_tokens.weight")
    t = time.perf_counter()
    warm = plan_warm_start(config, resolved.vocab_warm_start, tokenizer, lambda: source.read_rows(name, 8192), seed=seed)
    warm.stats["seconds"] = round(time.perf_counter() - t, 2)
    release_freed_memory()
    return warm


def _write_side_files(source: SourceCheckpoint, tmp: Path, tok=None) -> float | None:
    """Source config and tokenizer beside the BLT; returns the tokenizer's bytes per token on the
    probe text (None without a tokenizer).  ``tok``: the source tokenizer, if already loaded."""
    side = tmp / SIDE_DIR
    src_cfg = source.config.to_dict()
    src_cfg.pop("quantization_config", None)
    src_cfg["architectures"] = [source.architecture]
    src_cfg["tie_word_embeddings"] = source.tied_embeddings
    (side / "config.json").write_text(json.dumps(src_cfg, indent=2, default=str) + "\n")
    tok = tok if tok is not None else source.load_tokenizer()
    if tok is None:
        return None
    tok.save_pretrained(str(side / "tokenizer"))
    from ..data.corpus import probe_text

    text = probe_text()
    n_tokens = len(tok(text, add_special_tokens=False).input_ids)
    return len(text.encode("utf-8")) / max(1, n_tokens)


def _write_metadata(source, tmp, resolved, out_dtype, seed, bpt, warnings, warm_stats=None) -> None:
    import safetensors
    import transformers

    tmap = load_tensor_map()
    meta = {
        "byteify_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__},
        "source": {
            "path": str(source.path.resolve()),
            "format": source.format,
            "architecture": source.architecture,
            "files": {str(f.relative_to(source.path) if source.path.is_dir() else f.name): sha256_file(f)
                      for f in source.files},
            "tied_embeddings": source.tied_embeddings,
            "hub_id": source.hub_id,
            "dtype": dtype_name(source.dtype),
        },
        "output_dtype": dtype_name(out_dtype),
        "seed": seed,
        "architecture_spec": resolved.model_dump(),
        "tensor_map": {
            "layers": {e[source.format].format(i="{i}"): {"to": tmap["layer_target"] + e["blt"],
                                                            "transform": (e.get("transform") or {}).get(source.format)}
                       for e in tmap["layer"]},
            "side": {e[source.format]: f"{SIDE_DIR}/source_weights.safetensors:{e['name']}"
                     for e in tmap["side"] if not (e.get("absent_when_tied") and source.tied_embeddings)},
        },
        "side_files": {f"{SIDE_DIR}/{e['name']}": e["use"] for e in tmap["side"]},
        "source_bytes_per_token": bpt,
        "warnings": warnings,
    }
    if warm_stats is not None:
        meta["vocab_warm_start"] = warm_stats
    write_json(tmp / METADATA_FILE, meta)
