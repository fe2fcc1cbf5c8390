"""Where things are.  Every command that takes "a model" accepts a BLT model directory, a training
checkpoint or a training run (its newest checkpoint); :func:`locate` resolves any of them to the
model directory, the LoRA adapter (inside a LoRA stage), the checkpoint and the converted
directory that holds the source's side files (embeddings, head, norm, tokenizer).  Also the
layout names those directories share, and loading the BLT (adapter merged) from any of them.
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
    return (p / TRAINER_STATE).exists() and (p / "model" / "config.json").exists()


@dataclass
class Location:
    """What a path given on the command line (or as a recipe's ``model``) stands for."""

    given: Path
    kind: str  # "run", "checkpoint" or "model"
    model_dir: Path  # config.json + safetensors
    checkpoint_dir: Path | None = None
    adapter_dir: Path | None = None  # a peft LoRA adapter (checkpoints inside a LoRA stage)

    @cached_property
    def metadata(self) -> dict:
        return read_json(self.model_dir / METADATA_FILE)

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
        loc = Location(p, "checkpoint", p / "model", checkpoint_dir=p)
    elif (p / CHECKPOINTS_DIR).is_dir() and not (p / "config.json").exists():
        ck = latest_checkpoint(p)
        if ck is None or not is_checkpoint(ck):
            raise ByteifyError(f"{p}: a training run with no finished checkpoint under {p / CHECKPOINTS_DIR}")
        loc = Location(p, "run", ck / "model", checkpoint_dir=ck)
    elif (p / "config.json").exists():
        loc = Location(p, "model", p)
        if p.name == "model" and is_checkpoint(p.parent):  # a checkpoint's model/: keep its adapter
            loc.checkpoint_dir = p.parent
    else:
        raise ByteifyError(f"{p}: not a BLT model directory (no config.json), a checkpoint (no {TRAINER_STATE}) "
                           f"or a training run (no {CHECKPOINTS_DIR}/)")
    if loc.checkpoint_dir is not None and (loc.checkpoint_dir / "adapter" / "adapter_config.json").exists():
        loc.adapter_dir = loc.checkpoint_dir / "adapter"
    _check_blt_model_dir(loc.model_dir, p)
    return loc


def _check_blt_model_dir(model_dir: Path, given: Path) -> None:
    cfg_path = model_dir / "config.json"
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != "blt":
        raise ByteifyError(f"{given}: not a BLT model directory ({cfg_path} model_type is {cfg.get('model_type')!r}, "
                           f"expected 'blt'; run 'byteify convert' first)")
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        raise ByteifyError(f"{given}: no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_blt(where: str | Path | Location, dtype: torch.dtype = torch.float32, device="cpu", merge_adapter: bool = True):
    """(location, ``BltForCausalLM``) for a model directory, checkpoint or run; a checkpoint's LoRA
    adapter is merged (``merge_adapter``), so every command sees the weights the run trained."""
    from transformers import AutoModelForCausalLM

    loc = where if isinstance(where, Location) else locate(where)
    model = AutoModelForCausalLM.from_pretrained(str(loc.model_dir), dtype=dtype)
    if merge_adapter and loc.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(loc.adapter_dir)).merge_and_unload()
    return loc, model.to(device)


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
