"""Where things are.  Every command that takes "a model" accepts a BLT model directory, a training
checkpoint or a training run (its newest checkpoint); :func:`locate` resolves any of them to the
model directory, the LoRA adapter (inside a LoRA stage), the checkpoint and the converted
directory that holds the source's side files (embeddings, head, norm, tokenizer).  Also the
layout names those directories share, and reading the weights (LoRA merged, tensor by tensor)
or loading the BLT from any of them.

A checkpoint is ``step-XXXXXXXX/`` with ``trainer.json`` and ``sharded/`` (a
``torch.distributed.checkpoint`` of the training module and optimizer, with the model's
config, tokenizer and ``byteify.json`` beside it); at the end of a stage also ``model/`` (a plain
transformers directory, consolidated) and, in a LoRA stage, ``adapter/`` (peft).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .errors import ByteifyError
from .modelfiles import read_json

SIDE_DIR = "byteify_source"  # in a converted directory: the source's tokenizer, config, embeddings, head, norm
METADATA_FILE = "byteify.json"  # in every model directory byteify writes
CHECKPOINTS_DIR = "checkpoints"  # in a run directory
TRAINER_STATE = "trainer.json"  # in a checkpoint: step, stage, bytes seen
SHARDED_DIR = "sharded"  # in a checkpoint: the torch.distributed.checkpoint files


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / TRAINER_STATE).exists())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def is_checkpoint(p: Path) -> bool:
    return (p / TRAINER_STATE).exists() and ((p / "model" / "config.json").exists() or
                                            (p / SHARDED_DIR / "config.json").exists())


@dataclass
class Location:
    """What a path given on the command line (or as a recipe's ``model``) stands for."""

    given: Path
    kind: str  # "run", "checkpoint" or "model"
    model_dir: Path | None  # config.json + safetensors (a checkpoint has one at the end of a stage)
    checkpoint_dir: Path | None = None
    adapter_dir: Path | None = None  # a peft LoRA adapter (beside model/ inside a LoRA stage)
    sharded_dir: Path | None = None  # a checkpoint's torch.distributed.checkpoint files

    @property
    def config_dir(self) -> Path:
        """Where config.json, byteify.json and the tokenizer files are."""
        return self.model_dir if self.model_dir is not None else self.sharded_dir

    @cached_property
    def metadata(self) -> dict:
        return read_json(self.config_dir / METADATA_FILE)

    def weights(self, merge_lora: bool = True):
        """The weights under plain ``BltForCausalLM`` names, read one tensor at a time
        (``keys``, ``get``, ``stored_dtype``); a LoRA adapter merged when ``merge_lora``."""
        from .lora import LoraMerger, MergedWeights

        if self.model_dir is not None:
            from .modelfiles import SafetensorsDir

            base = SafetensorsDir(self.model_dir)
            if merge_lora and self.adapter_dir is not None:
                return MergedWeights(base, LoraMerger.from_adapter_dir(self.adapter_dir))
            return base
        shards = TrainingShards(self.sharded_dir)
        return MergedWeights(shards, shards.lora_merger()) if merge_lora and shards.lora else shards

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None or (self.model_dir is None and (self.sharded_dir / "adapter_config.json").exists())

    @property
    def converted_dir(self) -> Path | None:
        """The directory with ``byteify_source/``: the model directory itself (``byteify convert``'s
        output) or, for a checkpoint or export, the converted directory it was trained from."""
        if (self.model_dir / SIDE_DIR).is_dir():
            return self.model_dir
        conv = self.metadata.get("converted_model_dir")
        return Path(conv) if conv and (Path(conv) / SIDE_DIR).is_dir() else None

    def side_dir(self, what: str = "the source's side files") -> Path:
        conv = self.converted_dir
        if conv is None:
            raise ByteifyError(f"{self.given}: no {SIDE_DIR}/ ({what}); convert the source with 'byteify convert'")
        return conv / SIDE_DIR

    @property
    def source_tokenizer_dir(self) -> Path | None:
        conv = self.converted_dir
        d = conv / SIDE_DIR / "tokenizer" if conv is not None else None
        return d if d is not None and d.is_dir() and any(d.iterdir()) else None


def locate(path: str | Path) -> Location:
    """Classify ``path``; one-line errors for anything that is not a BLT run, checkpoint or model."""
    p = Path(path).expanduser()
    what = "a training run, a checkpoint or a BLT model directory"
    if not p.exists():
        raise ByteifyError(f"{p}: not found (expected {what})")
    if not p.is_dir():
        raise ByteifyError(f"{p}: not a directory (expected {what})")
    if is_checkpoint(p):
        loc = _checkpoint_location(p, p, "checkpoint")
    elif (p / CHECKPOINTS_DIR).is_dir() and not (p / "config.json").exists():
        ck = latest_checkpoint(p)
        if ck is None or not is_checkpoint(ck):
            raise ByteifyError(f"{p}: a training run with no finished checkpoint under {p / CHECKPOINTS_DIR}")
        loc = _checkpoint_location(p, ck, "run")
    elif (p / "config.json").exists() and p.name == SHARDED_DIR and is_checkpoint(p.parent):
        loc = _checkpoint_location(p, p.parent, "checkpoint")
    elif (p / "config.json").exists():
        loc = Location(p, "model", p)
        if p.name == "model" and is_checkpoint(p.parent):  # a checkpoint's model/: keep its adapter
            loc.checkpoint_dir = p.parent
            loc.adapter_dir = _adapter_dir(p.parent)
    else:
        raise ByteifyError(f"{p}: not a BLT model directory (no config.json), a checkpoint (no {TRAINER_STATE}) "
                           f"or a training run (no {CHECKPOINTS_DIR}/)")
    _check_blt_config(loc.config_dir, p)
    if loc.model_dir is not None and not (loc.model_dir / "model.safetensors").exists() \
            and not (loc.model_dir / "model.safetensors.index.json").exists():
        raise ByteifyError(f"{p}: no model.safetensors or model.safetensors.index.json in {loc.model_dir}")
    return loc


def _adapter_dir(checkpoint: Path) -> Path | None:
    a = checkpoint / "adapter"
    return a if (a / "adapter_config.json").exists() else None


def _checkpoint_location(given: Path, ck: Path, kind: str) -> Location:
    """A checkpoint: its consolidated model/ when it has one (end of a stage), else its shards."""
    if (ck / "model" / "config.json").exists():
        return Location(given, kind, ck / "model", checkpoint_dir=ck, adapter_dir=_adapter_dir(ck))
    return Location(given, kind, None, checkpoint_dir=ck, sharded_dir=ck / SHARDED_DIR)


def _check_blt_config(config_dir: Path, given: Path) -> None:
    cfg_path = config_dir / "config.json"
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != "blt":
        raise ByteifyError(f"{given}: not a BLT model directory ({cfg_path} model_type is {cfg.get('model_type')!r}, "
                           f"expected 'blt'; run 'byteify convert' first)")


def load_blt(where: str | Path | Location, dtype: torch.dtype = torch.float32, device="cpu", merge_adapter: bool = True):
    """(location, ``BltForCausalLM``) for a model directory, checkpoint or run; a checkpoint's LoRA
    adapter is merged (``merge_adapter``), so every command sees the weights the run trained."""
    from transformers import AutoModelForCausalLM

    loc = where if isinstance(where, Location) else locate(where)
    if loc.model_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(str(loc.model_dir), dtype=dtype)
        if merge_adapter and loc.adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(loc.adapter_dir)).merge_and_unload()
        return loc, model.to(device)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(loc.config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = loc.weights(merge_lora=merge_adapter)
    model.load_state_dict({k: weights.get(k).to(dtype) for k in weights.keys()}, strict=True, assign=True)
    init_rotary_buffers(model)
    return loc, model.to(device)


def init_rotary_buffers(model, device="cpu") -> None:
    """Compute the rotary embeddings' (non-persistent) buffers of a model built on the meta
    device, with transformers' own init for them."""
    for m in model.modules():
        if "RotaryEmbedding" in type(m).__name__:
            m.to_empty(device=device)
            model._init_weights(m)


class TrainingShards:
    """The model weights of a sharded training checkpoint under plain ``BltForCausalLM`` names,
    read one tensor at a time (``lora``: the LoRA tensors of a LoRA stage, by peft's saved names)."""

    def __init__(self, sharded_dir: Path):
        from .modelfiles import ShardedTensors
        from .parts import adapter_key, plain_name

        self.dir = sharded_dir
        self.shards = ShardedTensors(sharded_dir)
        self.names = {plain_name(k): k for k in self.shards.keys() if plain_name(k) is not None}
        self.lora = {adapter_key(k): k for k in self.shards.keys() if plain_name(k) is None}

    def keys(self) -> list[str]:
        return list(self.names)

    def stored_dtype(self) -> torch.dtype:
        return torch.float32  # training keeps fp32 master weights

    def get(self, name: str) -> torch.Tensor:
        return self.shards.get(self.names[name])

    def lora_merger(self):
        from .lora import LoraMerger

        cfg = read_json(self.dir / "adapter_config.json")
        return LoraMerger(cfg, {k: self.shards.get(v) for k, v in self.lora.items()}, str(self.dir))


def load_source_tokenizer(where: str | Path | Location):
    """The source tokenizer ``byteify convert`` kept (one-line error when there is none)."""
    loc = where if isinstance(where, Location) else locate(where)
    d = loc.source_tokenizer_dir
    if d is None:
        raise ByteifyError(f"{loc.given}: no source tokenizer ({SIDE_DIR}/tokenizer); "
                           f"'byteify convert' keeps it when the source ships one")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a user-facing one-liner
        raise ByteifyError(f"{d}: cannot load the source tokenizer ({type(exc).__name__}: {exc})") from None
