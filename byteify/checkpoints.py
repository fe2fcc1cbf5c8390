"""Training checkpoints: a model directory ``AutoModelForCausalLM.from_pretrained`` loads as-is
(plus a peft adapter beside it during LoRA stages) and the resume state (optimizer, scheduler,
data position, RNG states, step, stage), written to a temporary path and renamed; the last K kept.

Layout: ``RUN/checkpoints/step-00000100/{model/, adapter/, state.pt, trainer.json}``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .conversion import METADATA_FILE, AtomicDirectory, ShardWriter
from .errors import ByteifyError
from .tokenizer import TOKENIZER_FILES



def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer.json").exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if (p / "trainer.json").exists():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise ByteifyError(f"--resume {resume}: not a checkpoint directory (no trainer.json) and no checkpoints under it")
    return latest


def clean_model_state(full_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full training state dict -> plain BltForCausalLM names (drops LoRA tensors and wrappers)."""
    out = {}
    for k, v in full_sd.items():
        if "lora_" in k:
            continue
        k = k.removeprefix("model.")  # the training wrapper's attribute
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")  # peft's wrappers
        out[k] = v
    return out


def write_model_dir(out: Path, config, state: dict[str, torch.Tensor], source_model_dir: Path, extra_meta: dict) -> None:
    out.mkdir(parents=True)
    writer = ShardWriter(out, 5 << 30)
    for k in sorted(state):
        writer.add(k, state[k].detach().to("cpu").contiguous())
    writer.close()
    config.save_pretrained(str(out))
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (source_model_dir / name).exists():
            shutil.copyfile(source_model_dir / name, out / name)
    meta_path = source_model_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("converted_model_dir", str(source_model_dir.resolve()))
    meta.update(extra_meta)
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def rng_state() -> dict:
    st = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.random.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_checkpoint(run_dir: Path, step: int) -> AtomicDirectory:
    """``with atomic_checkpoint(run_dir, step) as tmp:`` -> renamed to ``step-XXXXXXXX`` on success."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return AtomicDirectory(root / f"step-{step:08d}")


def prune(run_dir: Path, keep_last: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory from a model dir, a checkpoint dir (its model/) or a run dir (newest)."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    if (p / "model" / "config.json").exists():
        return p / "model"
    latest = latest_checkpoint(p)
    if latest is not None and (latest / "model" / "config.json").exists():
        return latest / "model"
    raise ByteifyError(f"{p}: not a model directory, checkpoint or training run (no config.json found)")
