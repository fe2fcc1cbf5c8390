"""The optimizer and learning-rate schedule of a stage: AdamW over the trainable parameters only,
one group per (BLT part, weight decay or not) with the part's learning-rate multiplier, and
linear warm-up into a cosine, linear or constant schedule."""

from __future__ import annotations

import math

import torch

from ..errors import ByteifyError
from ..parts import part_of
from .recipe import StageSpec, parts_for


def build_optimizer(model, stage: StageSpec) -> torch.optim.AdamW:
    """AdamW with one group per (part, decay) of the trainable parameters only (frozen ones get
    no optimizer state).  In a LoRA stage the adapters are part ``global``."""
    mults = parts_for(stage)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name
        groups.setdefault((part_of(name), decay), []).append(p)
    param_groups = []
    for (part, decay), params in sorted(groups.items()):
        lr = stage.lr * mults.get(part, 1.0)
        param_groups.append({"params": params, "lr": lr, "initial_lr": lr,
                             "weight_decay": stage.weight_decay if decay else 0.0, "part": part})
    if not param_groups:
        raise ByteifyError(f"stage '{stage.name}': no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=stage.lr, betas=stage.betas, eps=1e-8, foreach=True)


def lr_lambda(stage: StageSpec):
    """Multiplier of each group's learning rate at a step (0-based)."""

    def f(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps))
        lo = stage.min_lr_ratio
        if stage.schedule == "linear":
            return lo + (1 - lo) * (1 - frac)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def build_scheduler(optimizer, stage: StageSpec):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
