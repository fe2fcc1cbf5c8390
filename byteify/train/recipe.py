"""Training recipes: the strict schema of a ``byteify train`` run, YAML loading with
``key=value`` command-line overrides, and the shipped recipes (``recipes/*.yaml``, installed
with the package as ``byteify/recipes``).

An unknown key fails before anything runs, naming the key path and the closest valid key;
wrong types and impossible values fail with one line (:class:`~byteify.errors.ByteifyError`).
"""

from __future__ import annotations

import copy
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..data.readers import SourceSpec
from ..errors import ByteifyError
from ..parts import PARTS
from ..patching.spec import PatchingSpec, default_patching, require_calibrated
from ..schema import Strict as _Strict
from ..schema import apply_overrides, load_yaml_mapping, validate
from .written import check_stages

Part = Literal["local_encoder", "hash_embeddings", "local_decoder", "global", "entropy_model"]


class DataSpec(_Strict):
    sources: list[SourceSpec] = [SourceSpec()]
    seq_len: int = Field(1024, ge=8, description="bytes per training sequence")
    val_fraction: float = Field(0.05, gt=0, lt=1)
    # which documents are held out is keyed by this seed (None: the run's seed); fix it to compare
    # runs with other seeds on the same held-out text, none of them training on it
    split_seed: int | None = None


class CalibrationSpec(_Strict):
    """Entropy-threshold calibration after the last stage (which must train only the entropy
    model): see :mod:`byteify.calibration`."""

    target_bytes_per_patch: float | None = Field(None, gt=1)  # None: the source tokenizer's bytes/token
    monotonic: bool = False
    max_patch_length: int | None = Field(None, ge=1)
    max_bytes: int = Field(262144, ge=64, description="held-out bytes to calibrate on (at most)")


class LoraSpec(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DistillSpec(_Strict):
    """A source-aligned distillation stage (global frozen, patches = source tokens, teacher = source)."""

    decoder: bool = True  # decoder half: reads the teacher's final hidden states
    encoder: bool = True  # encoder half: patch outputs through k frozen layers match the teacher's
    encoder_layers: int = Field(4, ge=1)  # k
    kl_weight: float = Field(1.0, ge=0)  # dense byte-marginal KL term (0 = byte cross-entropy only)
    temperature: float = Field(1.0, gt=0)
    encoder_weight: float = Field(1.0, ge=0)


class TeacherKlSpec(_Strict):
    """End-to-end distillation in a byte stage: besides the BLT's byte cross-entropy (under the
    stage's own patching), ``weight *`` KL(teacher || BLT) on every byte the teacher predicts: the
    source model run on the source tokenization of the same text, its next-token distribution
    marginalised to exact next-byte distributions by the byte trie (the distillation stage's
    dense term, here on packed byte rows and with the BLT's own global transformer)."""

    weight: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    # the teacher only makes targets: bf16 costs 0.0013 nats of KL to fp32's targets on SmolLM2
    # (4 KB of the corpus) and runs 1.5x faster on a CPU with AVX512-BF16
    teacher_dtype: Literal["bf16", "fp32"] = "bf16"


class PatchNormSpec(_Strict):
    """Keep the global transformer's input at its source's scale in a byte stage: ``weight *``
    ``relu(log(|v| / max_norm))^2`` summed over the patch vectors ``v`` the encoder hands the
    global.  Without it the encoder can grow its patch vectors until the global's layers barely
    change them (measured on SmolLM2: the patch vectors' norm went from 2.4 to ~8,600 in ~1.5 MB
    of training, the global's output kept cos 0.97 with its input: the transplant bypassed).
    ``max_norm``: about twice the source's mean token-embedding norm (SmolLM2-135M: 2.90).
    Measured there, the bound alone stalls training at small budgets (README, row 2qn)."""

    max_norm: float = Field(gt=0)
    weight: float = Field(1.0, gt=0)


class BoundarySpec(_Strict):
    """Teach the entropy model where the source tokenizer starts a token: besides the byte LM
    loss, its next-byte entropy ``H[t]`` is pushed above ``threshold`` where byte t+1 starts a
    source token and below it elsewhere (``weight * BCE(sigmoid(sharpness * (H - threshold)))``),
    so that stock BLT entropy patching (causal: from past bytes only) lands on token boundaries."""

    threshold: float = Field(2.0, gt=0)  # nats
    weight: float = Field(1.0, ge=0)
    sharpness: float = Field(4.0, gt=0)  # per nat


class StageSpec(_Strict):
    name: str = "adapt"
    train: list[Part] = ["local_encoder", "hash_embeddings", "local_decoder", "global"]
    lr: float = Field(1e-3, gt=0)
    lr_multipliers: dict[Part, float] = {}  # of the parts it trains; with lora, 'global' is the adapter's
    lora: LoraSpec | None = None
    steps: int = Field(100, ge=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    batch_bytes: int = Field(8192, ge=1, description="bytes per optimizer step over all processes")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    patching: PatchingSpec | None = None  # None: the recipe's patching (or the model's default)
    distill: DistillSpec | None = None
    teacher_kl: TeacherKlSpec | None = None  # byte stages: learn the source's next-byte distributions too
    patch_norm: PatchNormSpec | None = None  # byte stages: bound the global's input norm
    # byte stages: the probability with which each byte's encoder state is withheld from the local
    # decoder in training (zeroed, the kept ones scaled by 1/(1-p), as dropout does; the exported
    # model is unchanged): that byte is then predicted from earlier bytes and the global's states
    decoder_byte_dropout: float = Field(0.0, ge=0, lt=1)
    # byte stages on a warm-started model: the written content stays as converted (the global reads
    # the converted patch vectors at every step), the local side trains in the free_dims coordinates
    # (see byteify.train.written)
    keep_warm_start: bool = False
    boundaries: BoundarySpec | None = None  # entropy model: learn the source tokenizer's boundaries

    @property
    def teacher_dtype(self) -> str | None:
        """The dtype of the source model this stage runs beside the BLT: ``teacher_kl``'s
        ``teacher_dtype``, fp32 for a distillation stage (its encoder half matches the teacher's
        hidden states), None for a stage without a teacher."""
        if self.teacher_kl is not None:
            return self.teacher_kl.teacher_dtype
        return "fp32" if self.distill is not None else None

    @model_validator(mode="after")
    def _check(self):
        if self.distill is not None:
            if "global" in self.train or self.lora is not None:
                raise ValueError(f"stage '{self.name}': a distill stage keeps the global transformer frozen "
                                 "(no 'global' in train, no lora)")
            if not (self.distill.decoder or self.distill.encoder):
                raise ValueError(f"stage '{self.name}': distill needs decoder and/or encoder true")
        for key in ("teacher_kl", "patch_norm", "decoder_byte_dropout", "keep_warm_start"):
            if getattr(self, key) not in (None, 0.0, False) and (self.distill is not None or self.train == ["entropy_model"]):
                raise ValueError(f"stage '{self.name}': {key} trains the BLT in a byte stage (not with distill, "
                                 "not in an entropy-model-only stage)")
        if self.boundaries is not None and "entropy_model" not in self.train:
            raise ValueError(f"stage '{self.name}': 'boundaries' trains the entropy model; add entropy_model to 'train'")
        if not self.train and self.lora is None:
            raise ValueError(f"stage '{self.name}' trains nothing: list parts in 'train' or add 'lora'")
        if self.lora is not None and "global" in self.train:
            raise ValueError(f"stage '{self.name}': 'lora' adapts the global transformer, so 'global' cannot also be in 'train'")
        bad = [p for p, m in self.lr_multipliers.items() if m < 0]
        if bad:
            raise ValueError(f"stage '{self.name}': lr_multipliers.{bad[0]} must be >= 0")
        if self.warmup_steps > self.steps:
            raise ValueError(f"stage '{self.name}': warmup_steps {self.warmup_steps} > steps {self.steps}")
        return self


class FsdpSpec(_Strict):
    """FSDP2 under torchrun: mixed precision and resharding (see byteify.train.distributed)."""

    shard: Literal["auto", "always"] = "auto"  # auto: under torchrun with 2+ processes; always: also in one process
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # all-gather/compute dtype; auto: bf16 on CUDA, fp32 on CPU
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # False: keep layers gathered between forward and backward (faster, more memory)


class RunSpec(_Strict):
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    save_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = Field(None, ge=1)
    stop_after: int | None = Field(None, ge=1, description="stop (with a checkpoint) after this global step")
    fsdp: FsdpSpec = FsdpSpec()
    # attention kernels: auto = byteify's memory-efficient local attention on CUDA, transformers' sdpa elsewhere
    attention: Literal["auto", "sdpa", "eager", "byteify_local"] = "auto"
    consolidate: Literal["stage_end", "always"] = "stage_end"  # when a checkpoint also gets a plain model/ directory


class Recipe(_Strict):
    model: str
    output_dir: str
    seed: int = 0
    data: DataSpec = DataSpec()
    patching: PatchingSpec | None = None  # None: the model's default patching (see byteify.patching.spec)
    stages: list[StageSpec] = Field(..., min_length=1)
    calibration: CalibrationSpec | None = None
    run: RunSpec = RunSpec()

    @model_validator(mode="after")
    def _check(self):
        for s in self.stages:
            if s.batch_bytes < self.data.seq_len:
                raise ValueError(f"stage '{s.name}': batch_bytes {s.batch_bytes} is smaller than one sequence (data.seq_len {self.data.seq_len})")
            if s.batch_bytes % (self.data.seq_len * s.grad_accum):
                raise ValueError(f"stage '{s.name}': batch_bytes {s.batch_bytes} must be a multiple of data.seq_len x grad_accum "
                                 f"({self.data.seq_len} x {s.grad_accum})")
        if self.calibration is not None and self.stages[-1].train != ["entropy_model"]:
            raise ValueError(f"calibration: runs after the last stage, which must train only the entropy model "
                             f"(stage '{self.stages[-1].name}' trains {self.stages[-1].train})")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def stage_patching(self, stage: StageSpec) -> PatchingSpec | None:
        """The stage's patching, else the recipe's; None: the model's default."""
        return stage.patching or self.patching

    def patching_for(self, stage: StageSpec, config, metadata: dict) -> PatchingSpec:
        """The patching ``stage`` runs under on a model with this ``config`` and byteify.json
        ``metadata``: :meth:`stage_patching`, else the model's default."""
        return self.stage_patching(stage) or default_patching(config, metadata)

    def check_start(self, config, metadata: dict, model: str) -> None:
        """What the stages ask of the starting ``model``, refused before anything runs or is written
        (``train`` and ``train --dry-run`` alike): ``keep_warm_start`` on a model without free
        coordinates, and byte stages on entropy patches nobody calibrated."""
        check_stages(self.stages, metadata)
        for stage in self.stages:
            if stage.train != ["entropy_model"]:
                require_calibrated(self.patching_for(stage, config, metadata), metadata, model, stage.name)


def recipe_dir():
    """The shipped recipes (a directory in the installed package)."""
    return files("byteify") / "recipes"


def shipped_recipes() -> dict[str, Path]:
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in sorted(recipe_dir().iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ByteifyError(f"{p}: recipe file not found")
        return p
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    import difflib

    close = difflib.get_close_matches(name_or_path, list(shipped), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; shipped: {', '.join(shipped)}"
    raise ByteifyError(f"recipe '{name_or_path}': not a file and not a shipped recipe{hint}")


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """Validated recipe plus the resolved raw dict (saved in the run directory)."""
    path = recipe_path(name_or_path)
    data = apply_overrides(copy.deepcopy(load_yaml_mapping(path)), overrides or [], str(path))
    recipe = validate(Recipe, data, str(path))
    return recipe, recipe.model_dump(mode="json")


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    src = recipe_path(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise ByteifyError(f"{dest}: exists; pass --force to overwrite")
    shutil.copyfile(src, dest)
    return dest


def recipe_summary(path: Path) -> str:
    """First comment line after the header comment block's title, for ``recipes ls``."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# ").strip():
            text = line.strip("# ").strip()
            return text.split(": ", 1)[1] if text.startswith(path.stem + ":") else text
    return ""


def parts_for(stage: StageSpec) -> dict[str, float]:
    """Per-part learning-rate multipliers of the parts this stage trains (1.0 unless set); in a
    LoRA stage, ``global`` is the adapter's."""
    trained = set(stage.train) | ({"global"} if stage.lora else set())
    return {p: stage.lr_multipliers.get(p, 1.0) for p in PARTS if p in trained}

