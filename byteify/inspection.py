"""Inspection of a BLT model directory without loading it: parameter counts and dtypes per part
(read from safetensors headers), a config summary, a training-memory estimate and FLOPs per
byte at a given mean patch size."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ByteifyError
from .modelfiles import FROM_ST_CODE, numel, read_header
from .parts import PARTS, part_of


def read_headers(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype code, shape) for every tensor in the directory's safetensors files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ByteifyError(f"{model_dir}: no *.safetensors files; expected a BLT model directory from 'byteify convert'")
    return {k: (v["dtype"], v["shape"]) for f in files for k, v in read_header(f).items()}


@dataclass
class PartStats:
    params: int = 0
    bytes: int = 0
    dtypes: tuple = ()


@dataclass
class Inspection:
    parts: dict
    config: dict
    total_params: int
    train_memory_bytes: int
    flops_per_byte: float
    patch_size: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = {k: asdict(v) for k, v in self.parts.items()}
        return d


def flops_per_byte(parts: dict[str, int], patch_size: float, entropy: bool = True) -> float:
    """Forward FLOPs per byte ~ 2 x matmul parameters touched per byte (hash tables are lookups).
    The global transformer runs once per patch, so its share divides by the mean patch size."""
    local = parts["local_encoder"] + parts["local_decoder"]
    f = 2.0 * local + 2.0 * parts["global"] / patch_size
    if entropy:
        f += 2.0 * parts["entropy_model"]
    return f


def inspect_model(model_dir: str | Path, patch_size: float | None = None) -> Inspection:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise ByteifyError(f"{cfg_path}: not found; expected a BLT model directory from 'byteify convert'")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "blt":
        raise ByteifyError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'blt'")
    parts = {p: PartStats() for p in PARTS}
    dtypes = {p: set() for p in PARTS}
    for name, (dtype, shape) in read_headers(model_dir).items():
        try:
            p = part_of(name)
        except KeyError:
            continue
        n = numel(shape)
        parts[p].params += n
        parts[p].bytes += n * (FROM_ST_CODE[dtype].itemsize if dtype in FROM_ST_CODE else 4)
        dtypes[p].add(dtype)
    for p in PARTS:
        parts[p].dtypes = tuple(sorted(dtypes[p]))
    total = sum(s.params for s in parts.values())
    from .train.budget import training_state_bytes

    # everything trains but the entropy model (the recipes' end-to-end stage)
    memory = training_state_bytes(total - parts["entropy_model"].params, parts["entropy_model"].params)
    if patch_size is None:
        meta = model_dir / "byteify.json"
        bpt = json.loads(meta.read_text()).get("source_bytes_per_token") if meta.exists() else None
        patch_size = float(bpt or cfg.get("patch_size") or 4.5)
    g, e, d = cfg["global_config"], cfg["encoder_config"], cfg["decoder_config"]
    summary = {
        "global": f"{g['num_hidden_layers']} layers, hidden {g['hidden_size']}, heads {g['num_attention_heads']}"
                  f"/{g.get('num_key_value_heads')} kv, ffn {g['intermediate_size']}, rope {g.get('rope_parameters')}",
        "local_encoder": f"{e['num_hidden_layers']} layers, hidden {e['hidden_size']}, heads {e['num_attention_heads']}",
        "local_decoder": f"{d['num_hidden_layers']} layers, hidden {d['hidden_size']}, heads {d['num_attention_heads']}",
        "hash": f"n={cfg['encoder_hash_byte_group_size']}, {cfg['encoder_hash_byte_group_vocab']} entries each, "
                f"{cfg['encoder_hash_byte_group_nb_functions']} function(s)",
        "entropy_model": f"{cfg['patcher_config']['num_hidden_layers']} layers, hidden {cfg['patcher_config']['hidden_size']}",
        "patching": f"{cfg.get('patching_mode')} threshold {cfg.get('patching_threshold')}",
        "cross_attn_k": cfg.get("cross_attn_k"),
    }
    fpb = flops_per_byte({p: parts[p].params for p in PARTS}, patch_size)
    return Inspection(parts=parts, config=summary, total_params=total, train_memory_bytes=memory,
                      flops_per_byte=fpb, patch_size=patch_size)


def format_inspection(ins: Inspection) -> str:
    lines = [f"{'part':<16}{'params':>14}{'size':>12}  dtypes"]
    for p, s in ins.parts.items():
        lines.append(f"{p:<16}{s.params:>14,}{s.bytes / 2**20:>10.1f}MB  {','.join(s.dtypes)}")
    lines.append(f"{'total':<16}{ins.total_params:>14,}")
    lines.append("")
    lines += [f"{k:<14} {v}" for k, v in ins.config.items()]
    lines.append("")
    lines.append(f"training memory (fp32 weights+grads+AdamW, entropy model frozen): {ins.train_memory_bytes / 2**30:.2f} GiB"
                 " + activations")
    lines.append(f"forward FLOPs per byte at {ins.patch_size:.2f} bytes/patch: {ins.flops_per_byte / 1e6:.1f} MFLOP")
    return "\n".join(lines)
