"""The training engine behind ``byteify train``, to be read top to bottom:

1. **setup**: processes, run directory, the resume point, the data, the model;
2. **stages** in order, each from the previous stage's weights: the stage's model (freezing,
   LoRA, FSDP2), optimizer, schedule and runner (:mod:`byteify.train.stages`), restored when
   resuming inside it; then **the loop**: step, clip, optimizer, schedule, NaN check, validation,
   logging, checkpoints, stop on a signal or ``run.stop_after``;
3. **finish**: the entropy threshold's calibration (entropy-model recipes) and the summary.

Checkpoints and their format live in :mod:`byteify.train.checkpoints`, processes and sharding
in :mod:`byteify.train.distributed`, the model a stage trains in :mod:`byteify.train.model`.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import time
from pathlib import Path

import torch

from ..data.streams import merge_states
from ..errors import ByteifyError
from ..modelfiles import read_json, write_json
from ..parts import PARTS
from ..patching.patchers import build_patcher
from ..resolve import Location, locate
from . import checkpoints as ckpt
from .distributed import Dist, setup_distributed
from .model import build_module, carried_weights, load_weights, param_counts
from .optim import build_optimizer, build_scheduler, lr_lambda
from .recipe import Recipe, StageSpec
from .stages import LN2, ByteStage, StageContext, StepResult
from .written import keep_written

TRAINING_META = "training"  # byteify.json key of a checkpoint's model directory


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved; the CLI exits with 130."""

    def __init__(self, checkpoint: Path | None, by_signal: bool = True):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.checkpoint, self.by_signal = checkpoint, by_signal


class Trainer:
    def __init__(self, recipe: Recipe, raw: dict, resume: str | None = None, log=print):
        self.recipe, self.raw, self.log = recipe, raw, log
        self.run_dir = Path(recipe.output_dir)
        self.resume_from = ckpt.resolve_resume(resume, self.run_dir)
        self.stop_signal = None
        self.shared: dict = {}  # what stages share (a teacher, ...)
        self.written = None  # the warm start's fixed entries in a keep_warm_start stage

    # ---- 1. setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.recipe
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        self.dist: Dist = setup_distributed(r.run.device, always=r.run.fsdp.shard == "always")
        self.state = {"global_step": 0, "stage_index": 0, "stage_step": 0, "bytes_seen": 0, "stage_name": r.stages[0].name}
        start = r.model
        if self.resume_from is not None:
            ckpt.check_resumable(self.resume_from)
            self.state = ckpt.read_trainer_state(self.resume_from)
            start = self.state.get("base_model_dir", r.model)
            if self.dist.main:
                self.log(f"resuming from {self.resume_from} (stage '{self.state['stage_name']}', "
                         f"step {self.state['global_step']}, written by {self.state.get('world_size', 1)} process(es))")
        self.location: Location = locate(start)  # a model dir, checkpoint or run: the weights the run started from
        self.state["base_model_dir"] = str(self.location.config_dir)
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(str(self.location.config_dir))
        r.check_start(self.config, self.location.metadata, start)  # before anything is written
        self.carried = None  # the weights the next stage starts from (None: the starting model's)
        torch.manual_seed(r.seed)
        self.val_rows, self.holdout = self._validation()  # also checks every source: bad data fails before any write
        if self.dist.main:
            import yaml

            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(self.raw, sort_keys=False))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.writer = self._tensorboard()
        self.t_start = time.perf_counter()
        self.first_step = self.state["global_step"]  # steps before this process (a resumed run's)
        self.last_checkpoint = self.resume_from

    def _validation(self):
        """Held-out rows (enough for every stage's validation and the calibration) and the
        holdout the training streams skip; read from the start of the sources, never a full pass."""
        from ..data.streams import validation_rows

        r = self.recipe
        rows = max(r.run.eval_batches * self._micro_batch(s) for s in r.stages)
        if r.calibration is not None:
            rows = max(rows, -(-r.calibration.max_bytes // r.data.seq_len))
        split_seed = r.seed if r.data.split_seed is None else r.data.split_seed
        return validation_rows(r.data.sources, r.data.seq_len, r.data.val_fraction, split_seed, max_rows=rows)

    def run(self) -> dict:
        self.setup()
        try:
            stopped_early = False
            try:
                with self._signals():
                    for index in range(self.state["stage_index"], len(self.recipe.stages)):
                        self.run_stage(index)
            except Interrupted as exc:
                if exc.by_signal:
                    raise
                stopped_early, self.last_checkpoint = True, exc.checkpoint
            return self.finish(stopped_early)
        finally:
            if self.writer is not None:
                self.writer.close()
            self.dist.close()

    # ---- 2. a stage -------------------------------------------------------------------------
    def run_stage(self, index: int) -> None:
        r, stage = self.recipe, self.recipe.stages[index]
        resuming = self.resume_from is not None and index == self.state["stage_index"]
        module = build_module(self.config, stage, self.dist, r.run)
        if r.run.compile:
            for layer in module.blt.model.global_transformer.layers:
                layer.compile()
        optimizer = build_optimizer(module, stage)
        scheduler = build_scheduler(optimizer, stage)
        if resuming:  # weights and optimizer moments from the shards, in this run's number of processes
            ckpt.load_sharded(self.resume_from / ckpt.SHARDED_DIR, module, optimizer)
            scheduler.load_state_dict(torch.load(self.resume_from / "scheduler.pt", weights_only=False))
        else:
            load_weights(module, self.carried if self.carried is not None else self.location.weights(), r.seed + index)
            self.state.update(stage_index=index, stage_step=0, stage_name=stage.name)
        self.carried = None
        self.written = keep_written(module, stage, self.location.metadata)
        ctx = self.stage_context(index, module)
        runner = self.runner(ctx)
        if resuming:
            runner.stream.load_state_dict(read_json(self.resume_from / "data.json"))
            ckpt.set_rng_state(ckpt.read_rng(self.resume_from, self.dist.rank), self.dist.device)
            self.resume_from = None
        self._log_stage(ctx)
        self.loop(ctx, runner, optimizer, scheduler)
        self.carried = carried_weights(module)  # LoRA merged, shard by shard

    def stage_context(self, index: int, module) -> StageContext:
        r, stage = self.recipe, self.recipe.stages[index]
        patcher = None if stage.train == ["entropy_model"] else build_patcher(self.stage_patching(stage), module.blt,
                                                                              model_dir=self.location)
        return StageContext(recipe=r, stage=stage, index=index, module=module, dist=self.dist, location=self.location,
                            sources=r.data.sources, holdout=self.holdout, val_rows=self.val_rows, patcher=patcher,
                            micro_batch=self._micro_batch(stage), shared=self.shared, autocast=self._autocast)

    def stage_patching(self, stage: StageSpec):
        """The stage's patching spec: its own, the recipe's, else the model's default."""
        return self.recipe.patching_for(stage, self.config, self.location.metadata)

    def runner(self, ctx: StageContext):
        if ctx.stage.distill is not None:
            from .distill import DistillStage

            return DistillStage(ctx)
        return ByteStage(ctx)

    def _micro_batch(self, stage: StageSpec) -> int:
        """Sequences per micro-step over all processes."""
        per = stage.batch_bytes // self.recipe.data.seq_len // stage.grad_accum
        if per % self.dist.world:
            raise ByteifyError(f"stage '{stage.name}': {per} sequences per micro-step do not split over "
                               f"{self.dist.world} processes")
        return per

    def loop(self, ctx: StageContext, runner, optimizer, scheduler) -> None:
        """Steps until the stage ends, a signal arrives or ``run.stop_after`` is reached."""
        r, stage, state = self.recipe, ctx.stage, self.state
        bar = self._progress_bar(stage)
        window = [time.perf_counter(), 0]  # start time and bytes of the current logging window
        ctx.module.train()
        while state["stage_step"] < stage.steps:
            result = runner.step()
            self._optimizer_step(ctx, optimizer, result)
            lr = stage.lr * lr_lambda(stage)(scheduler.last_epoch)  # the base (multiplier 1) learning rate
            scheduler.step()
            state["global_step"] += 1
            state["stage_step"] += 1
            state["bytes_seen"] += result.bytes
            window[1] += result.bytes
            bpb = result.bpb if result.bpb is not None else result.loss / LN2
            rec = {"step": state["global_step"], "stage": stage.name, "loss": result.loss, "bpb": bpb,
                   "lr": lr, "bytes_seen": state["bytes_seen"], **result.extras}
            if state["stage_step"] % r.run.eval_every == 0 or state["stage_step"] == stage.steps:
                rec.update(runner.validate())
                state["last_val_bpb"] = rec.get("val_bpb")
            self._log(rec, stage, window, bar)
            done = state["stage_step"] == stage.steps
            stop = self.dist.any(self.stop_signal is not None)  # every rank stops at the same step
            limit = r.run.stop_after is not None and state["global_step"] >= r.run.stop_after
            if done or stop or limit or state["stage_step"] % r.run.save_every == 0:
                self.last_checkpoint = self.save(ctx, optimizer, scheduler, runner)
            if stop or (limit and not done):
                if bar is not None:
                    bar.close()
                raise Interrupted(self.last_checkpoint, by_signal=stop)
        if bar is not None:
            bar.close()

    def _optimizer_step(self, ctx: StageContext, optimizer, result: StepResult) -> None:
        if not math.isfinite(result.loss):
            raise ByteifyError(f"non-finite loss ({result.loss}) at step {self.state['global_step'] + 1} of stage "
                               f"'{ctx.stage.name}'; last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'}")
        if self.written is not None:
            self.written.mask_grads()
        if ctx.stage.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in ctx.module.parameters() if p.requires_grad], ctx.stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.written is not None:
            self.written.restore()

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, ctx: StageContext, optimizer, scheduler, runner) -> Path:
        """A checkpoint every process writes its shards of (see :mod:`byteify.train.checkpoints`)."""
        state, dist = dict(self.state, world_size=self.dist.world), self.dist
        tmp = ckpt.staging_dir(self.run_dir, state["global_step"], dist)
        ckpt.save_sharded(tmp / ckpt.SHARDED_DIR, ctx.module, optimizer)
        data = merge_states(dist.gather(runner.stream.state_dict()))  # every rank's lanes
        rngs = dist.gather(ckpt.rng_state(dist.device))
        consolidate = self.recipe.run.consolidate == "always" or state["stage_step"] == ctx.stage.steps
        if consolidate:
            if dist.main:
                (tmp / "model").mkdir()
            dist.barrier()
            ckpt.write_consolidated(tmp / "model", ctx.module, dist)
        final = self.run_dir / ckpt.CHECKPOINTS_DIR / f"step-{state['global_step']:08d}"
        if dist.main:
            training = {"recipe": self.raw, "global_step": state["global_step"], "bytes_seen": state["bytes_seen"],
                        "stage": state["stage_name"], "last_val_bpb": state.get("last_val_bpb")}
            for d in [tmp / ckpt.SHARDED_DIR] + ([tmp / "model"] if consolidate else []):
                ckpt.write_side_files(d, ctx.module.blt.config, self.location.config_dir, {TRAINING_META: training})
            if hasattr(ctx.module.model, "peft_config"):
                ctx.module.model.peft_config["default"].save_pretrained(str(tmp / ckpt.SHARDED_DIR))
            write_json(tmp / "data.json", data)
            torch.save(rngs, tmp / "rng.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            ckpt.finish(tmp, self.run_dir, state["global_step"], self.recipe.run.keep_last)
        dist.barrier()
        return final

    # ---- 3. finish ----------------------------------------------------------------------------
    def finish(self, stopped_early: bool) -> dict:
        calibration = None
        if self.recipe.calibration is not None and self.last_checkpoint is not None and not stopped_early:
            calibration = self._calibrate(Path(self.last_checkpoint) / "model")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.dist.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.dist.device) / 2**20
        summary = {"bytes_seen": self.state["bytes_seen"], "wall_seconds": round(time.perf_counter() - self.t_start, 2),
                   "peak_memory_mb": round(peak, 1), "steps": self.state["global_step"],
                   "steps_run": self.state["global_step"] - self.first_step,  # by this process, in wall_seconds
                   "final_val_bpb": self.state.get("last_val_bpb"),
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                   "stopped_early": stopped_early}
        if calibration is not None:
            summary["calibration"] = calibration
        self._append_metrics({"summary": summary})
        return summary

    def _calibrate(self, model_dir: Path) -> dict | None:
        """After an entropy-model run: calibrate the threshold on the held-out split (main process;
        the entropy model is read back from the final checkpoint) and write it into its config."""
        from ..patching.calibration import calibrate_model_dir, limit_windows

        cal = None
        if self.dist.main:
            spec = self.recipe.calibration
            ids = limit_windows(torch.from_numpy(self.val_rows[:, :-1].astype("int64")), spec.max_bytes)
            result = calibrate_model_dir(model_dir, ids, target=spec.target_bytes_per_patch, monotonic=spec.monotonic,
                                         max_patch_length=spec.max_patch_length, device=self.dist.device)
            cal = result.to_dict()
            self.log(f"{result.summary()}; written to {model_dir}/config.json")
            self._append_metrics({"calibration": cal})
        self.dist.barrier()
        return cal

    # ---- logging, signals, precision ----------------------------------------------------------
    def _log_stage(self, ctx: StageContext) -> None:
        if self.dist.main:
            counts = param_counts(ctx.module)
            trainable = sum(c["trainable"] for c in counts.values())
            self.log(f"stage '{ctx.stage.name}': {ctx.stage.steps} steps, {ctx.stage.batch_bytes} bytes/step, "
                     f"{trainable:,} trainable parameters ({', '.join(p for p in PARTS if counts[p]['trainable'])})")
            warm = self.location.metadata.get("vocab_warm_start")
            if "local_encoder" in ctx.stage.train and "hash_embeddings" not in ctx.stage.train and not warm:
                self.log(f"note: stage '{ctx.stage.name}' keeps the hash tables frozen, but this model has no "
                         "vocabulary warm start (convert --preset warm): they stay at their random init; add "
                         "hash_embeddings to the stage's train list to learn them")

    def _log(self, rec: dict, stage: StageSpec, window: list, bar) -> None:
        step = self.state["stage_step"]
        if step % self.recipe.run.log_every == 0 or "val_bpb" in rec or step == stage.steps:
            now = time.perf_counter()
            rec["bytes_per_s"] = window[1] / max(now - window[0], 1e-9)
            rec["elapsed_s"] = now - self.t_start
            window[:] = [now, 0]
            self._append_metrics(rec)
            if self.writer is not None:
                for k, v in rec.items():
                    if isinstance(v, float):
                        self.writer.add_scalar(f"{stage.name}/{k}", v, self.state["global_step"])
        if bar is not None:
            post = {"loss": f"{rec['loss']:.3f}", "bpb": f"{rec['bpb']:.3f}", "lr": f"{rec['lr']:.2e}"}
            post.update({k: f"{rec[k]:.0f}" if k == "bytes_per_s" else f"{rec[k]:.3f}"
                         for k in ("bytes_per_s", "val_bpb") if k in rec})
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    def _append_metrics(self, rec: dict) -> None:
        if self.dist.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _progress_bar(self, stage: StageSpec):
        if not (self.dist.main and self.recipe.run.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=stage.steps, initial=self.state["stage_step"], desc=stage.name, unit="step", dynamic_ncols=True)

    def _tensorboard(self):
        if not (self.recipe.run.tensorboard and self.dist.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ByteifyError("run.tensorboard is true but the 'tensorboard' package is not installed") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    @contextlib.contextmanager
    def _signals(self):
        def handler(signum, frame):
            self.stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _autocast(self):
        run = self.recipe.run
        if run.dtype == "bf16" or (run.dtype == "auto" and self.dist.device.type == "cuda"):
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
