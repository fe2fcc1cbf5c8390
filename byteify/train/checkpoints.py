"""Training checkpoints: a model directory ``AutoModelForCausalLM.from_pretrained`` loads as-is
(plus a peft adapter beside it during LoRA stages) and the resume state (optimizer, scheduler,
data position, RNG states, step, stage), built in a temporary directory and renamed; the last K
kept.

Layout: ``RUN/checkpoints/step-00000100/{model/, adapter/, state.pt, trainer.json}``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import ByteifyError
from ..modelfiles import AtomicDirectory, read_json, write_json, write_tensors
from ..resolve import CHECKPOINTS_DIR, METADATA_FILE, TRAINER_STATE, checkpoint_dirs, latest_checkpoint
from ..tokenizer import TOKENIZER_FILES


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``--resume auto`` (the newest checkpoint of the run, or None) or a checkpoint / run path."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if (p / TRAINER_STATE).exists():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise ByteifyError(f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE}) and no checkpoints under it")
    return latest


def plain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training state dict -> plain ``BltForCausalLM`` names (drops LoRA tensors and wrappers)."""
    out = {}
    for k, v in state.items():
        if "lora_" in k:
            continue
        k = k.removeprefix("model.")  # the training wrapper's attribute
        out[k.removeprefix("base_model.model.").replace(".base_layer.", ".")] = v
    return out


def write_model_dir(out: Path, config, state: dict[str, torch.Tensor], base_model_dir: Path, meta: dict) -> None:
    """A model directory: safetensors, config, tokenizer files, byteify.json (the base's, updated)."""
    out.mkdir(parents=True)
    write_tensors(out, ((k, state[k].detach().to("cpu").contiguous()) for k in sorted(state)))
    config.save_pretrained(str(out))
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (base_model_dir / name).exists():
            shutil.copyfile(base_model_dir / name, out / name)
    full = read_json(base_model_dir / METADATA_FILE)
    full.setdefault("converted_model_dir", str(base_model_dir.resolve()))
    full.update(meta)
    write_json(out / METADATA_FILE, full)


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (CUDA: its own device only)."""
    st = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    torch.random.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def atomic_checkpoint(run_dir: Path, step: int) -> AtomicDirectory:
    """``with atomic_checkpoint(run_dir, step) as tmp:`` -> renamed to ``step-XXXXXXXX`` on success."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    return AtomicDirectory(root / f"step-{step:08d}")


def prune(run_dir: Path, keep_last: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def load_resume_state(checkpoint: Path) -> dict:
    """Optimizer, scheduler, data and RNG states of a checkpoint, on the CPU."""
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
