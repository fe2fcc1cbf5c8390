"""Training checkpoints, written by every process at once and loadable into any number of
processes:

``RUN/checkpoints/step-00000100/``

* ``sharded/``: ``torch.distributed.checkpoint`` of the training module and the optimizer, each
  process writing only its own shards (keys are parameter names, so any world size loads them),
  with the model's ``config.json``, tokenizer files and ``byteify.json`` (and a LoRA stage's
  ``adapter_config.json``) beside them;
* ``data.json`` (every process's data-stream position), ``rng.pt`` (each process's RNG states),
  ``scheduler.pt``, ``trainer.json`` (step, stage, bytes seen);
* at the end of a stage (or always, ``run.consolidate: always``): ``model/``, a plain
  transformers directory consolidated tensor by tensor (memory: one tensor), and in a LoRA stage
  ``adapter/`` (peft).

The directory is built under a hidden name that every process agrees on and renamed when all of
them are done, so a crash or SIGKILL during a save leaves the previous checkpoint the newest.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import ByteifyError
from ..modelfiles import ShardWriter, dcp_call, read_json, write_json
from ..resolve import CHECKPOINTS_DIR, METADATA_FILE, SHARDED_DIR, TRAINER_STATE, checkpoint_dirs, latest_checkpoint
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


# ---- saving ---------------------------------------------------------------------------------
def staging_dir(run_dir: Path, step: int, dist) -> Path:
    """The hidden directory a checkpoint is built in (cleared by the main process first)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = root / f".step-{step:08d}.tmp"
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
        tmp.mkdir()
    dist.barrier()
    return tmp


def save_sharded(path: Path, module, optimizer) -> None:
    """Model and optimizer state, each process its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp_call(dcp.save, {"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, module, optimizer) -> None:
    """The inverse of :func:`save_sharded`, into any number of processes (resharded on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp_call(dcp.load, state, checkpoint_id=str(path))
    except Exception as exc:  # a checkpoint of another model or stage layout
        raise ByteifyError(f"{path}: cannot load this checkpoint into the stage's model "
                           f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def write_side_files(out: Path, config, base_dir: Path, meta: dict) -> None:
    """config.json, the tokenizer files and byteify.json (the base model's, updated) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out / name)
    full = read_json(base_dir / METADATA_FILE)
    full.setdefault("converted_model_dir", str(base_dir.resolve()))
    full.update(meta)
    write_json(out / METADATA_FILE, full)


@torch.no_grad()
def write_consolidated(out: Path, module, dist) -> None:
    """``model.safetensors`` (plain BLT names, base weights without LoRA) and, in a LoRA stage,
    ``../adapter`` (peft): every process takes part in gathering one tensor at a time; only the
    main process holds it and writes."""
    from torch.distributed.tensor import DTensor

    from ..parts import adapter_key, plain_name

    writer = ShardWriter(out, 5 << 30) if dist.main else None
    lora = {}
    for fqn, p in sorted(module.named_parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if dist.main:
            name = plain_name(fqn)
            if name is None:
                lora[adapter_key(fqn)] = full.cpu().clone()
            else:
                writer.add(name, full.cpu().contiguous())
        del full
    if dist.main:
        writer.close()
        if lora:
            from safetensors.torch import save_file

            adapter = out.parent / "adapter"
            adapter.mkdir()
            module.model.peft_config["default"].save_pretrained(str(adapter))
            save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


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


def finish(tmp: Path, run_dir: Path, step: int, keep_last: int) -> Path:
    """Rename the staged checkpoint into place (main process) and keep the last ``keep_last``."""
    final = Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading --------------------------------------------------------------------------------
def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def check_resumable(checkpoint: Path) -> None:
    if not (checkpoint / SHARDED_DIR / ".metadata").exists():
        raise ByteifyError(f"{checkpoint}: no {SHARDED_DIR}/ training state (a checkpoint written by byteify < 0.2 "
                           f"cannot be resumed; export it or start a new run from its model/)")


def read_rng(checkpoint: Path, rank: int) -> dict | None:
    """This rank's RNG states, or rank 0's when the checkpoint was written by fewer processes."""
    states = torch.load(checkpoint / "rng.pt", map_location="cpu", weights_only=False)
    return states[rank] if rank < len(states) else states[0]
