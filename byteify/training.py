"""The training engine behind ``byteify train``: stages run in order, each from the previous
stage's weights, with per-part freezing and learning rates, optional LoRA on the global
transformer (peft), bf16 autocast on GPU, FSDP2 under ``torchrun``, checkpoints and exact resume,
progress/metrics logging, and a clean stop on NaN, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoints as ckpt
from .errors import ByteifyError
from .inspection import PARTS, part_of
from .patching import build_patcher
from .recipes import Recipe, StageSpec, parts_for

LN2 = math.log(2.0)
IGNORE = -100


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved; the CLI exits with 130."""

    def __init__(self, checkpoint: Path | None, by_signal: bool = True):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.checkpoint, self.by_signal = checkpoint, by_signal


# ------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def setup_distributed(device_pref: str) -> Dist:
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        dev = torch.device(device_pref if device_pref not in ("auto",) else ("cuda" if want_cuda else "cpu"))
        return Dist(device=dev)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev, backend, mesh_type = torch.device("cuda", local), "nccl", "cuda"
    else:
        dev, backend, mesh_type = torch.device("cpu"), "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    mesh = init_device_mesh(mesh_type, (world,))
    return Dist(rank=rank, world=world, local_rank=local, device=dev, mesh=mesh)


# ------------------------------------------------------------------------------------------
class TrainModule(nn.Module):
    """Wraps the BLT so one root forward computes everything (what FSDP2 needs): patch lengths
    from the frozen patcher, the BLT byte loss and, when it trains, the entropy model's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def blt(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids, labels, patcher=None, blt_loss=True, entropy_loss=False):
        total = input_ids.new_zeros((), dtype=torch.float32)
        ent = input_ids.new_zeros((), dtype=torch.float32)
        if blt_loss:
            with torch.no_grad():
                lengths = patcher(input_ids)
            logits = self.model(input_ids=input_ids, patch_lengths=lengths, use_cache=False).logits
            total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        if entropy_loss:
            _, _, logits = self.blt.model.patcher(input_ids)
            ent = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return total, ent


def load_model(model_dir: str | Path, device):
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise ByteifyError(f"{path}: not a model directory (no config.json); run 'byteify convert' first")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if model.config.model_type != "blt":
        raise ByteifyError(f"{path}/config.json: model_type '{model.config.model_type}', expected 'blt'")
    return model.to(device)


def apply_stage(model, stage: StageSpec, adapter_dir: Path | None = None):
    """Freeze everything the stage does not train; inject LoRA into the global transformer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in base.named_parameters():
        p.requires_grad_(part_of(name) in stage.train)
    if stage.lora is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    mods = "|".join(stage.lora.target_modules)
    cfg = LoraConfig(r=stage.lora.rank, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                     target_modules=rf".*global_transformer\.layers\.\d+\..*\.({mods})", bias="none")
    peft_model = get_peft_model(base, cfg)
    # peft freezes everything but the adapters: re-enable the stage's fully trained parts.
    for name, p in peft_model.named_parameters():
        if "lora_" not in name and part_of(name) in stage.train:
            p.requires_grad_(True)
    return peft_model


def end_stage(model):
    """Merge a LoRA stage into the weights so the next stage starts from base + delta."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def build_optimizer(model, stage: StageSpec):
    """AdamW with one group per (part, decay) of the trainable parameters only."""
    mults = parts_for(stage)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        decay = p.ndim >= 2 and "norm" not in name
        groups.setdefault((part, decay), []).append(p)
    param_groups = []
    for (part, decay), params in sorted(groups.items()):
        m = mults.get(part, 1.0)
        param_groups.append({"params": params, "lr": stage.lr * m, "initial_lr": stage.lr * m,
                             "weight_decay": stage.weight_decay if decay else 0.0, "part": part})
    if not param_groups:
        raise ByteifyError(f"stage '{stage.name}': no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=stage.lr, betas=stage.betas, eps=1e-8, foreach=True)


def lr_lambda(stage: StageSpec):
    def f(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.schedule == "constant":
            return 1.0
        span = max(1, stage.steps - stage.warmup_steps)
        frac = min(1.0, (step - stage.warmup_steps) / span)
        lo = stage.min_lr_ratio
        if stage.schedule == "linear":
            return lo + (1 - lo) * (1 - frac)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def param_counts(model) -> dict[str, dict[str, int]]:
    out = {p: {"trainable": 0, "frozen": 0} for p in PARTS}
    for name, p in model.named_parameters():
        key = "trainable" if p.requires_grad else "frozen"
        out[part_of(name)][key] += p.numel()
    return out


# ------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, recipe: Recipe, raw: dict, resume: str | None = None, log=print):
        self.recipe, self.raw, self.log = recipe, raw, log
        self.run_dir = Path(recipe.output_dir)
        self.resume_from = ckpt.resolve_resume(resume, self.run_dir)
        self._stop_signal = None

    # ---- setup ----------------------------------------------------------------------------
    def _data(self):
        from .data import build_datasets

        spec = self.recipe.data
        return build_datasets(spec.sources, spec.seq_len, spec.val_fraction, self.recipe.seed)

    def _micro_batch(self, stage: StageSpec) -> int:
        seqs = stage.batch_bytes // self.recipe.data.seq_len
        per = seqs // stage.grad_accum
        if per % self.dist.world:
            raise ByteifyError(
                f"stage '{stage.name}': {per} sequences per micro-step do not split over {self.dist.world} processes")
        return per

    def _shard(self, module: TrainModule):
        from torch.distributed.fsdp import fully_shard

        blt = module.blt
        layers = list(blt.model.global_transformer.layers) + list(blt.model.local_encoder.layers)
        layers += list(blt.model.local_decoder.layers)
        if blt.model.patcher is not None:
            layers.append(blt.model.patcher)
        for layer in layers:
            fully_shard(layer, mesh=self.dist.mesh)
        fully_shard(module, mesh=self.dist.mesh)
        return module

    def _full_state(self, module) -> dict[str, torch.Tensor]:
        if self.dist.world == 1:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _optim_state(self, module, optimizer):
        if self.dist.world == 1:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optim_state(self, module, optimizer, sd):
        if self.dist.world == 1:
            optimizer.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, sd, options=StateDictOptions(full_state_dict=True))

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, module, optimizer, scheduler, batches, state: dict) -> Path:
        full = self._full_state(module)
        optim_sd = self._optim_state(module, optimizer)
        path = None
        if self.dist.main:
            with ckpt.atomic_checkpoint(self.run_dir, state["global_step"]) as tmp:
                blt = module.blt
                ckpt.write_model_dir(tmp / "model", blt.config, ckpt.clean_model_state(full), self.base_model_dir,
                                     {"training": {"recipe": self.raw, "global_step": state["global_step"],
                                                   "bytes_seen": state["bytes_seen"], "stage": state["stage_name"],
                                                   "last_val_bpb": state.get("last_val_bpb")}})
                if hasattr(module.model, "peft_config"):
                    peft_sd = {k.removeprefix("model."): v for k, v in full.items()}
                    module.model.save_pretrained(str(tmp / "adapter"), state_dict=peft_sd)
                torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "data": batches.state_dict(),
                            "rng": ckpt.rng_state()}, tmp / "state.pt")
                (tmp / "trainer.json").write_text(json.dumps(state, indent=2) + "\n")
            ckpt.prune(self.run_dir, self.recipe.run.keep_last)
            path = ckpt.latest_checkpoint(self.run_dir)
        if self.dist.world > 1:
            torch.distributed.barrier()
        return path

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, module, patcher, stage: StageSpec, val) -> float:
        """Bits per byte on the held-out split (the entropy model's when only it trains)."""
        module.eval()
        ent_only = stage.train == ["entropy_model"]
        nats = count = 0.0
        batches = val.val_batches(self._micro_batch(stage), self.recipe.run.eval_batches,
                                  rank=self.dist.rank, world_size=self.dist.world)
        for batch in batches:
            ids, labels = batch["input_ids"].to(self.dist.device), batch["labels"].to(self.dist.device)
            with self._autocast():
                blt_nats, ent_nats = module(ids, labels, patcher, blt_loss=not ent_only, entropy_loss=ent_only)
            nats += float(ent_nats if ent_only else blt_nats)
            count += float((labels != IGNORE).sum())
        module.train()
        nats, count = self.dist.all_sum(nats, count)
        return nats / max(count, 1) / LN2

    def _autocast(self):
        bf16 = self.recipe.run.dtype == "bf16" or (self.recipe.run.dtype == "auto" and self.dist.device.type == "cuda")
        if bf16:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    # ---- main loop ------------------------------------------------------------------------
    def _install_signals(self):
        def handler(signum, frame):
            self._stop_signal = signum

        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signals(self):
        for s, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(s, h)

    def run(self) -> dict:
        r = self.recipe
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        self.dist = setup_distributed(r.run.device)
        self.base_model_dir = ckpt.resolve_model_dir(r.model)  # a model dir, checkpoint or run dir
        state = {"global_step": 0, "stage_index": 0, "stage_step": 0, "bytes_seen": 0, "stage_name": r.stages[0].name}
        resume_state = None
        if self.resume_from is not None:
            state = json.loads((self.resume_from / "trainer.json").read_text())
            resume_state = torch.load(self.resume_from / "state.pt", weights_only=False)
            self.base_model_dir = Path(state.get("base_model_dir", r.model))
            if self.dist.main:
                self.log(f"resuming from {self.resume_from} (stage '{state['stage_name']}', step {state['global_step']})")
        state["base_model_dir"] = str(self.base_model_dir)
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(self.raw, sort_keys=False))
        torch.manual_seed(r.seed)
        train, val = self._data()
        load_from = self.resume_from / "model" if self.resume_from is not None else self.base_model_dir
        model = load_model(load_from, self.dist.device)
        metrics_path = self.run_dir / "metrics.jsonl"
        writer = self._tensorboard()
        t_start = time.perf_counter()
        last_ckpt = self.resume_from
        self._install_signals()
        stopped_early = False
        try:
            for si in range(state["stage_index"], len(r.stages)):
                stage = r.stages[si]
                resuming_stage = resume_state is not None and si == state["stage_index"]
                adapter = self.resume_from / "adapter" if resuming_stage and (self.resume_from / "adapter").exists() else None
                model = apply_stage(model, stage, adapter)
                if r.run.activation_checkpointing:
                    (model.get_base_model() if hasattr(model, "get_base_model") else model).gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
                module = TrainModule(model)
                if self.dist.world > 1:
                    module = self._shard(module)
                if r.run.compile:
                    for layer in module.blt.model.global_transformer.layers:
                        layer.compile()
                optimizer = build_optimizer(module, stage)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
                patcher = build_patcher(r.stage_patching(stage), module.blt)
                from .data import ByteBatches

                micro = self._micro_batch(stage)
                batches = ByteBatches(train, micro, seed=r.seed + si, rank=self.dist.rank,
                                      world_size=self.dist.world)
                if resuming_stage:
                    self._load_optim_state(module, optimizer, resume_state["optimizer"])
                    scheduler.load_state_dict(resume_state["scheduler"])
                    batches.load_state_dict(resume_state["data"])
                    ckpt.set_rng_state(resume_state["rng"])
                else:
                    state.update(stage_index=si, stage_step=0, stage_name=stage.name)
                if self.dist.main:
                    counts = param_counts(module)
                    tr = sum(c["trainable"] for c in counts.values())
                    self.log(f"stage '{stage.name}': {stage.steps} steps, {stage.batch_bytes} bytes/step, "
                             f"{tr:,} trainable parameters ({', '.join(p for p in PARTS if counts[p]['trainable'])})")
                if stage.distill is not None:
                    from .distillation import DistillStage

                    runner = DistillStage(self, module, stage, si, val, patcher)
                    batches, step_fn, val_fn = runner.batches, runner.step, runner.validate
                    if resuming_stage:
                        batches.load_state_dict(resume_state["data"])
                else:
                    step_fn = self._byte_step_fn(module, patcher, batches, stage)
                    val_fn = lambda: {"val_bpb": self.validate(module, patcher, stage, val)}  # noqa: E731
                last_ckpt = self._run_stage(module, optimizer, scheduler, batches, stage, state, metrics_path, writer,
                                            t_start, step_fn, val_fn) or last_ckpt
                model = end_stage(module.model)
                resume_state = None
        except Interrupted as exc:
            if exc.by_signal:
                raise
            stopped_early, last_ckpt = True, exc.checkpoint
        finally:
            self._restore_signals()
            if writer is not None:
                writer.close()
        calibration = None
        if r.calibration is not None and last_ckpt is not None and not stopped_early:
            calibration = self._calibrate(Path(last_ckpt) / "model", val, metrics_path)
        wall = time.perf_counter() - t_start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available() and self.dist.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        summary = {"bytes_seen": state["bytes_seen"], "wall_seconds": round(wall, 2), "peak_memory_mb": round(peak, 1),
                   "steps": state["global_step"], "final_val_bpb": state.get("last_val_bpb"),
                   "checkpoint": str(last_ckpt) if last_ckpt else None, "stopped_early": stopped_early}
        if calibration is not None:
            summary["calibration"] = calibration
        if self.dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"summary": summary}) + "\n")
        return summary

    def _calibrate(self, model_dir: Path, val, metrics_path: Path) -> dict | None:
        """After an entropy-model run: calibrate the threshold on the held-out split (main process;
        the entropy model is read back from the final checkpoint) and write it into its config."""
        from .calibration import calibrate_model_dir, limit_windows

        cal = None
        if self.dist.main:
            spec = self.recipe.calibration
            ids = limit_windows(torch.from_numpy(val.rows()[:, :-1].astype("int64")), spec.max_bytes)
            result = calibrate_model_dir(model_dir, ids, target=spec.target_bytes_per_patch, monotonic=spec.monotonic,
                                         max_patch_length=spec.max_patch_length, device=self.dist.device)
            cal = result.to_dict()
            self.log(f"{result.summary()}; written to {model_dir}/config.json")
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"calibration": cal}) + "\n")
        if self.dist.world > 1:
            torch.distributed.barrier()
        return cal

    def _tensorboard(self):
        if not (self.recipe.run.tensorboard and self.dist.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ByteifyError("run.tensorboard is true but the 'tensorboard' package is not installed") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _byte_step_fn(self, module, patcher, batches, stage):
        """One optimizer step's forward/backward for an ordinary stage (BLT and/or entropy loss)."""
        ent_only = stage.train == ["entropy_model"]
        train_entropy = "entropy_model" in stage.train
        it = iter(batches)

        def step():
            micro_batches = [next(it) for _ in range(stage.grad_accum)]
            local_count = sum(int((b["labels"] != IGNORE).sum()) for b in micro_batches)
            (global_count,) = self.dist.all_sum(local_count)
            scale = self.dist.world / max(global_count, 1)
            step_nats = step_ent = 0.0
            for b in micro_batches:
                ids, labels = b["input_ids"].to(self.dist.device), b["labels"].to(self.dist.device)
                with self._autocast():
                    nats, ent = module(ids, labels, patcher, blt_loss=not ent_only, entropy_loss=train_entropy)
                ((nats + ent) * scale).backward()
                step_nats += float(nats.detach())
                step_ent += float(ent.detach())
            step_nats, step_ent = self.dist.all_sum(step_nats, step_ent)
            extras = {}
            if train_entropy and not ent_only:
                extras["entropy_bpb"] = step_ent / max(global_count, 1) / LN2
            return (step_ent if ent_only else step_nats) / max(global_count, 1), extras, stage.batch_bytes

        return step

    def _run_stage(self, module, optimizer, scheduler, batches, stage, state, metrics_path, writer, t0, step_fn, val_fn):
        """The loop shared by every stage kind: step, clip, optimizer, schedule, NaN check,
        validation, logging, progress bar, checkpoints, stop on signal or ``run.stop_after``."""
        r = self.recipe
        bar = None
        if self.dist.main and r.run.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stage.steps, initial=state["stage_step"], desc=stage.name, unit="step", dynamic_ncols=True)
        last_ckpt = None
        window_t, window_bytes = time.perf_counter(), 0
        module.train()
        while state["stage_step"] < stage.steps:
            loss, extras, step_bytes = step_fn()
            if not math.isfinite(loss):
                raise ByteifyError(f"non-finite loss ({loss}) at step {state['global_step'] + 1} of stage '{stage.name}'; "
                                   f"last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'}")
            if stage.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], stage.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = stage.lr * lr_lambda(stage)(scheduler.last_epoch)  # the base (multiplier 1) learning rate
            scheduler.step()
            state["global_step"] += 1
            state["stage_step"] += 1
            state["bytes_seen"] += step_bytes
            window_bytes += step_bytes
            rec = {"step": state["global_step"], "stage": stage.name, "loss": loss, "bpb": loss / LN2, "lr": lr,
                   "bytes_seen": state["bytes_seen"], **extras}
            if state["stage_step"] % r.run.eval_every == 0 or state["stage_step"] == stage.steps:
                rec.update(val_fn())
                state["last_val_bpb"] = rec.get("val_bpb")
            log_now = state["stage_step"] % r.run.log_every == 0 or "val_bpb" in rec or state["stage_step"] == stage.steps
            if log_now:
                now = time.perf_counter()
                rec["bytes_per_s"] = window_bytes / max(now - window_t, 1e-9)
                rec["elapsed_s"] = now - t0
                window_t, window_bytes = now, 0
                if self.dist.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if writer is not None:
                        for k, v in rec.items():
                            if isinstance(v, float):
                                writer.add_scalar(f"{stage.name}/{k}", v, state["global_step"])
            if bar is not None:
                post = {"loss": f"{loss:.3f}", "bpb": f"{loss / LN2:.3f}", "lr": f"{lr:.2e}"}
                if "bytes_per_s" in rec:
                    post["B/s"] = f"{rec['bytes_per_s']:.0f}"
                if "val_bpb" in rec:
                    post["val_bpb"] = f"{rec['val_bpb']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            done = state["stage_step"] == stage.steps
            stop = self._stop_signal is not None
            limit = r.run.stop_after is not None and state["global_step"] >= r.run.stop_after
            if done or stop or limit or state["stage_step"] % r.run.save_every == 0:
                last_ckpt = self.save(module, optimizer, scheduler, batches, dict(state))
            if stop or (limit and not done):
                if bar is not None:
                    bar.close()
                raise Interrupted(last_ckpt, by_signal=stop)
        if bar is not None:
            bar.close()
        return last_ckpt


# ------------------------------------------------------------------------------------------
def plan(recipe: Recipe) -> str:
    """``--dry-run``: the model built on the meta device, stage by stage, without touching data."""
    from transformers import AutoConfig, BltForCausalLM

    cfg_path = Path(recipe.model) / "config.json"
    try:
        model_dir = ckpt.resolve_model_dir(recipe.model)
    except ByteifyError:
        raise ByteifyError(f"{cfg_path}: not found; 'model' must be a directory from 'byteify convert' "
                           "(or a training run / checkpoint)") from None
    config = AutoConfig.from_pretrained(str(model_dir))
    lines = [f"model: {recipe.model}", f"output_dir: {recipe.output_dir}",
             f"data: {', '.join(s.path for s in recipe.data.sources)}; seq_len {recipe.data.seq_len} bytes"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for stage in recipe.stages:
        with torch.device("meta"):
            model = apply_stage(BltForCausalLM(config), stage)
        counts = param_counts(model)
        trainable = sum(c["trainable"] for c in counts.values())
        total = sum(c["trainable"] + c["frozen"] for c in counts.values())
        seqs = stage.batch_bytes // recipe.data.seq_len
        if (seqs // stage.grad_accum) % world:
            raise ByteifyError(f"stage '{stage.name}': {seqs // stage.grad_accum} sequences per micro-step do not split over {world} processes")
        mem = 4 * total + 12 * trainable
        p = recipe.stage_patching(stage)
        lines.append(f"\nstage '{stage.name}': {stage.steps} steps x {stage.batch_bytes:,} bytes/step "
                     f"= {stage.steps * stage.batch_bytes:,} bytes; micro-batch {seqs // stage.grad_accum} seq x {stage.grad_accum} accum; "
                     f"lr {stage.lr:g} ({stage.schedule}, warmup {stage.warmup_steps}); patching {p.mode}"
                     + (f"; LoRA r={stage.lora.rank}" if stage.lora else ""))
        lines.append(f"  {'part':<16}{'trainable':>14}{'frozen':>14}{'lr':>11}")
        mults = parts_for(stage)
        for part in PARTS:
            c = counts[part]
            lr = f"{stage.lr * mults[part]:.2e}" if part in mults or (part == 'global' and stage.lora) else "-"
            lines.append(f"  {part:<16}{c['trainable']:>14,}{c['frozen']:>14,}{lr:>11}")
        lines.append(f"  memory estimate: {mem / 2**30:.2f} GiB (fp32 weights + grads + AdamW states of trainable "
                     f"parameters{', over ' + str(world) + ' processes' if world > 1 else ''}) + activations")
    if recipe.calibration is not None:
        c = recipe.calibration
        lines.append(f"\nthen: calibrate the {'monotonic' if c.monotonic else 'global'} entropy threshold on up to "
                     f"{c.max_bytes:,} held-out bytes to {c.target_bytes_per_patch or 'the source tokenizer'}"
                     f"{'' if c.target_bytes_per_patch else chr(39) + 's'} bytes per "
                     f"{'patch' if c.target_bytes_per_patch else 'token'}; written to the last checkpoint's model/config.json")
    return "\n".join(lines)
