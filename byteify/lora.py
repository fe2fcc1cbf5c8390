"""LoRA without peft's model wrappers: the plain deltas of an adapter (``B @ A * scaling``, with
rsLoRA's ``alpha / sqrt(r)``, peft's ``rank_pattern`` / ``alpha_pattern``), merged tensor by tensor
into weights as they are read, and a weights reader that does it (so merging never holds more
than one weight).  The adapter comes from a peft directory or from a sharded training checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .errors import ByteifyError


class LoraMerger:
    """Plain LoRA deltas of a peft adapter, per base weight name: ``B @ A * scaling``."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], where: str):
        """``cfg``: peft's adapter_config; ``tensors``: the adapter's tensors under peft's saved names
        (``base_model.model.<module>.lora_A.weight``); ``where`` names them in errors."""
        cfg_path = where
        unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora") if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported or cfg.get("modules_to_save") \
                or cfg.get("trainable_token_indices") or cfg.get("layer_replication"):
            what = unsupported[0] if unsupported else f"peft_type {cfg.get('peft_type')}"
            if cfg.get("modules_to_save"):
                what = "modules_to_save"
            raise ByteifyError(f"{cfg_path}: the adapter uses {what}; byteify export merges plain LoRA only "
                               f"(pass --no-merge-lora to copy the adapter beside the weights instead)")
        self.cfg = cfg
        self.rslora = bool(cfg.get("use_rslora"))
        f = where
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
        a_suffix = re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$")
        for k, a in tensors.items():
            if not a_suffix.search(k):
                continue
            module = a_suffix.sub("", k).removeprefix("base_model.model.")
            b_key = a_suffix.sub(lambda m: m.group(0).replace("lora_A", "lora_B"), k)
            if b_key not in tensors:
                raise ByteifyError(f"{f}: '{k}' has no matching lora_B tensor")
            self.pairs[module + ".weight"] = (a, tensors[b_key], module)
        others = [k for k in tensors if "lora_A" not in k and "lora_B" not in k]
        if others:
            raise ByteifyError(f"{f}: tensor '{others[0]}' is not a LoRA A/B matrix; byteify export merges plain LoRA "
                               f"only (pass --no-merge-lora)")

    @classmethod
    def from_adapter_dir(cls, adapter_dir: Path) -> "LoraMerger":
        """A peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from safetensors.torch import load_file

        cfg_path = adapter_dir / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ByteifyError(f"{cfg_path}: unreadable ({exc.__class__.__name__})") from None
        f = adapter_dir / "adapter_model.safetensors"
        if not f.exists():
            raise ByteifyError(f"{adapter_dir}: no adapter_model.safetensors")
        return cls(cfg, load_file(str(f)), str(f))

    def _pattern_value(self, patterns: dict, module: str, default):
        for key, value in (patterns or {}).items():  # peft's get_pattern_key
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def scaling(self, module: str, rank: int) -> float:
        alpha = self._pattern_value(self.cfg.get("alpha_pattern"), module, self.cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the adapter's delta added (in fp32 for half-precision weights)."""
        a, b, module = self.pairs[name]
        if b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1]:
            raise ByteifyError(f"adapter: LoRA for '{module}' has shapes {list(b.shape)} @ {list(a.shape)}, "
                               f"the weight is {list(weight.shape)}")
        work = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        delta = (b.to(work) @ a.to(work)) * self.scaling(module, a.shape[0])
        return (weight.to(work) + delta).to(weight.dtype)


class MergedWeights:
    """A weights reader (``keys``/``get``/``stored_dtype``, e.g. :class:`~byteify.modelfiles.SafetensorsDir`)
    whose ``get`` adds the LoRA delta of the weights the adapter adapts."""

    def __init__(self, base, merger: LoraMerger):
        self.base, self.merger = base, merger
        missing = [k for k in merger.pairs if k not in base.keys()]
        if missing:
            raise ByteifyError(f"adapter: it adapts '{missing[0]}', which the model has no weight for")
        self.merged = 0

    def keys(self) -> list[str]:
        return self.base.keys()

    def stored_dtype(self) -> torch.dtype:
        return self.base.stored_dtype()

    def get(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        if name in self.merger.pairs:
            self.merged += 1
            return self.merger.merge(name, t)
        return t
