"""byteify's command line: a thin typer app over the ``byteify`` package."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a pretrained Llama-family checkpoint into a Byte Latent Transformer (BLT).")


def _version(value: bool):
    if value:
        from byteify import __version__

        typer.echo(f"byteify {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False):
    """Turn a pretrained Llama-family checkpoint into a Byte Latent Transformer (BLT)."""


def _quiet_transformers():
    """transformers' own switches for its info/warning logs and progress bars (a command prints
    what it does itself); Python warnings are left alone."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _user_errors(fn):
    """Bad input: one line on stderr, exit code 2.  Ctrl-C: exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from byteify.errors import ByteifyError

        _quiet_transformers()
        try:
            return fn(*args, **kwargs)
        except ByteifyError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


@app.command()
@_user_errors
def convert(
    src: Annotated[str, typer.Argument(help="HF checkpoint directory (config.json + safetensors, sharded or not), a .gguf file, or a hub id")],
    out: Annotated[Path, typer.Argument(help="output directory (must not exist or be empty; not inside SRC)")],
    preset: Annotated[str, typer.Option(help="sizes of the fresh parts: auto (scaled to the source), warm (auto with the vocabulary warm start and the hash sizes it needs), warm-16k (warm with 16,384 buckets per n-gram size), warm-kept (warm-16k with 128 coordinates free, for recipes with keep_warm_start), warm-kept-64k (warm-kept with 65,536 buckets), warm-spell-64k (warm-kept-64k with the spelling warm start: the decoder predicts bytes at step 0), tiny, blt-1b, or a YAML file")] = "auto",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a preset key, e.g. --set encoder.hidden_size=256 (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="seed for the fresh parts")] = 0,
    dtype: Annotated[str, typer.Option(help="output dtype: auto (the source's), fp32, fp16, bf16")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors shard, e.g. 500MB, 5GB")] = "5GB",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="prove the transplant numerically (default on)")] = True,
    tolerance: Annotated[float, typer.Option(help="max relative difference of hidden states for --verify")] = 1e-4,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty OUT")] = False,
):
    """Transplant SRC's decoder layers into a BLT global transformer; write a HF-loadable model to OUT."""
    from byteify.convert.memory import return_large_frees_to_os
    from byteify.convert.presets import load_spec
    from byteify.convert.sources import open_source
    from byteify.convert.transplant import convert as run_convert
    from byteify.inspection import format_inspection, inspect_model

    return_large_frees_to_os()  # this process is one streaming conversion: keep its peak at one tensor
    spec = load_spec(preset, set_ or [])
    source = open_source(src)
    typer.echo(f"source: {source.path} ({source.format}, {source.architecture}, {source.config.num_hidden_layers} layers, "
               f"hidden {source.config.hidden_size}, {'tied' if source.tied_embeddings else 'untied'} embeddings)")
    report = run_convert(source, out, spec, seed=seed, dtype=dtype, max_shard_size=max_shard_size, force=force,
                         verify=verify, tolerance=tolerance, progress=sys.stderr.isatty(), log=lambda m: None)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"wrote {out} ({len(report.shards)} shard(s)) in {report.seconds:.1f}s")
    if report.source_bytes_per_token:
        typer.echo(f"source tokenizer: {report.source_bytes_per_token:.3f} bytes/token on the probe text")
    if report.warm_start:
        from byteify.convert.warmstart import format_stats

        typer.echo(format_stats(report.warm_start))
    typer.echo(format_inspection(inspect_model(out)))
    if report.verification is not None:
        typer.echo(report.verification.summary())


@app.command()
@_user_errors
def inspect(
    model_dir: Annotated[Path, typer.Argument(help="a BLT model directory")],
    patch_size: Annotated[Optional[float], typer.Option(help="mean bytes per patch for FLOPs (default: source bytes/token)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
):
    """Parameters per part, dtypes, config summary, training memory and FLOPs per byte."""
    from byteify.inspection import format_inspection, inspect_model

    ins = inspect_model(model_dir, patch_size)
    typer.echo(json.dumps(ins.to_dict(), indent=2) if as_json else format_inspection(ins))


recipes_app = typer.Typer(no_args_is_help=True, help="List and copy the shipped training recipes.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("ls")
@_user_errors
def recipes_ls():
    """List the shipped recipes."""
    from byteify.train.recipe import recipe_summary, shipped_recipes

    for name, path in shipped_recipes().items():
        typer.echo(f"{name:<16} {recipe_summary(path)}")


@recipes_app.command("cp")
@_user_errors
def recipes_cp(
    name: Annotated[str, typer.Argument(help="a shipped recipe name (see 'byteify recipes ls')")],
    dest: Annotated[Path, typer.Argument(help="file or directory to copy it to")],
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
):
    """Copy a shipped recipe to edit it."""
    from byteify.train.recipe import copy_recipe

    typer.echo(f"wrote {copy_recipe(name, dest, force)}")


@app.command(context_settings={"allow_extra_args": False})
@_user_errors
def train(
    recipe: Annotated[str, typer.Argument(help="recipe YAML path or shipped recipe name")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. stages.0.steps=50 model=runs/blt")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the plan, then exit")] = False,
    resume: Annotated[Optional[str], typer.Option(help="'auto' (newest checkpoint of output_dir) or a checkpoint path")] = None,
    world_size: Annotated[Optional[int], typer.Option(help="--dry-run: the number of GPUs to estimate for (default: WORLD_SIZE or 1)")] = None,
    gpu_memory: Annotated[float, typer.Option(help="--dry-run: GB of memory per GPU to warn against")] = 80.0,
):
    """Run a recipe: stages of byte-ifying training with checkpoints and resume.  Works under torchrun (FSDP2)."""
    from byteify.train.recipe import load_recipe

    rec, raw = load_recipe(recipe, overrides or [])
    if dry_run:
        from byteify.train.plan import plan

        typer.echo(plan(rec, world_size, gpu_memory))
        return
    from byteify.train.trainer import Interrupted, Trainer

    if not rec.run.progress or not sys.stderr.isatty():
        rec.run.progress = rec.run.progress and sys.stderr.isatty()
    try:
        summary = Trainer(rec, raw, resume=resume).run()
    except Interrupted as exc:
        typer.echo(f"interrupted: checkpoint saved at {exc.checkpoint}; continue with --resume auto", err=True)
        raise typer.Exit(130)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary))


@app.command()
@_user_errors
def generate(
    model: Annotated[Path, typer.Argument(help="model directory, training checkpoint or run directory")],
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    max_bytes: Annotated[int, typer.Option(help="bytes to generate at most")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="sample from the k most likely bytes")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop after this string (repeatable)")] = None,
):
    """Generate bytes with KV caches in every BLT stack; streams UTF-8 text to stdout."""
    from byteify.generate import Utf8Stream, generate_ids
    from byteify.patching.spec import default_patching
    from byteify.resolve import load_blt

    if max_bytes < 1 or temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        from byteify.errors import ByteifyError

        raise ByteifyError("--max-bytes must be >= 1, --temperature >= 0, --top-k >= 1 and --top-p in (0, 1]")
    loc, blt = load_blt(model)  # a checkpoint inside a LoRA stage: its adapter merged
    stops = [s.encode("utf-8") for s in stop or []]
    produced = bytearray()

    def on_byte(b: int):
        produced.append(b)
        stream(b)
        sys.stdout.flush()

    def should_stop(_ids) -> bool:
        return any(produced.endswith(s) for s in stops)

    stream = Utf8Stream(sys.stdout.write)
    generate_ids(blt, prompt.encode("utf-8"), max_bytes, temperature=temperature, top_k=top_k, top_p=top_p,
                 seed=seed, on_byte=on_byte, stop=should_stop if stops else None,
                 patching=default_patching(blt.config, loc.metadata))
    stream.close()
    sys.stdout.write("\n")


@app.command()
@_user_errors
def export(
    src: Annotated[Path, typer.Argument(help="a training run (its newest checkpoint), a checkpoint directory or a BLT model directory")],
    out: Annotated[Path, typer.Argument(help="output directory (must not exist or be empty; not inside SRC)")],
    merge_lora: Annotated[bool, typer.Option("--merge-lora/--no-merge-lora", help="merge a LoRA adapter into the weights (off: copy it to OUT/adapter)")] = True,
    dtype: Annotated[str, typer.Option(help="output dtype: auto (the input's), bf16, fp16, fp32")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors shard, e.g. 500MB, 5GB")] = "5GB",
    base_model: Annotated[Optional[str], typer.Option(help="model card base_model (default: the source's hub id or path)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty OUT")] = False,
):
    """Write a directory plain transformers loads (AutoModelForCausalLM, AutoTokenizer, generate) with a model card."""
    from byteify.export import export as run_export

    report = run_export(src, out, merge_lora=merge_lora, dtype=dtype, max_shard_size=max_shard_size, force=force,
                        base_model=base_model)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    inp = report.input
    typer.echo(f"input: {inp.kind} {inp.given}" + (f" (checkpoint {inp.checkpoint_dir.name})" if inp.kind == "run" else ""))
    lora = {"none": "no LoRA adapter", "merged": f"LoRA merged into {report.merged_modules} weights",
            "copied": "LoRA adapter copied to adapter/"}[report.lora]
    typer.echo(f"wrote {out} ({len(report.shards)} shard(s), {str(report.dtype).removeprefix('torch.')}, {lora}) "
               f"in {report.seconds:.1f}s")


@app.command("eval")
@_user_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="a BLT model directory (or a checkpoint / training run)")],
    data: Annotated[list[str], typer.Option("--data", help=".txt / .jsonl file, directory or glob, 'default' (the embedded corpus) or 'default:val' (its held-out documents) (repeatable)")],
    patching: Annotated[Optional[str], typer.Option(help="static, entropy, space, byte or source_tokens (default: the config's entropy patching if 'byteify calibrate' ran, else static)")] = None,
    patch_size: Annotated[int, typer.Option(help="bytes per patch for static patching")] = 4,
    threshold: Annotated[Optional[float], typer.Option(help="entropy threshold in nats (default: the config's)")] = None,
    seq_len: Annotated[int, typer.Option(help="window size in bytes")] = 1024,
    max_bytes: Annotated[Optional[int], typer.Option(help="evaluate at most this many bytes of text")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 8,
    source: Annotated[Optional[str], typer.Option(help="also evaluate this source checkpoint (HF directory or .gguf; default: the one in byteify.json)")] = None,
    no_source: Annotated[bool, typer.Option("--no-source", help="do not evaluate the recorded source")] = False,
    source_seq_len: Annotated[Optional[int], typer.Option(help="source window in tokens (default: about --seq-len bytes)")] = None,
    dtype: Annotated[str, typer.Option(help="compute dtype: fp32, bf16, fp16")] = "fp32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    teacher_forced_bound: Annotated[bool, typer.Option("--teacher-forced-bound", help="the step-0 gate: also the source model fed this BLT's patch vectors on source-token patches of the same text (token bits per byte), next to its own embeddings; target <= 1.6x")] = False,
):
    """Bits per byte, bytes per patch and global steps per KB on text; side by side with the source model."""
    from byteify.evaluate import evaluate, format_report

    report = evaluate(model, data, patching=patching, patch_size=patch_size, threshold=threshold, seq_len=seq_len,
                      max_bytes=max_bytes, batch_size=batch_size, source=source, use_recorded_source=not no_source,
                      source_seq_len=source_seq_len, dtype=dtype, device=device, progress=sys.stderr.isatty(),
                      teacher_forced=teacher_forced_bound)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))


@app.command()
@_user_errors
def calibrate(
    model_dir: Annotated[Path, typer.Argument(help="a BLT model directory with an entropy model")],
    data: Annotated[Optional[list[str]], typer.Option(help="held-out text: 'default' (the embedded corpus; the default), a .txt/.jsonl file, a directory or a glob (repeatable)")] = None,
    target_bytes_per_patch: Annotated[Optional[float], typer.Option(help="mean bytes per patch to reach (default: the source tokenizer's bytes/token on the data)")] = None,
    patching: Annotated[str, typer.Option(help="entropy (calibrate its threshold), or static, space, source_tokens, byte (only report their bytes/patch)")] = "entropy",
    monotonic: Annotated[bool, typer.Option("--monotonic", help="BLT's relative rule (byteify only: stock transformers patches with the global rule)")] = False,
    max_patch_length: Annotated[Optional[int], typer.Option(help="split longer patches (written to the config)")] = None,
    patch_size: Annotated[int, typer.Option(help="static patching: bytes per patch")] = 4,
    seq_len: Annotated[int, typer.Option(help="bytes per window (as data.seq_len in training)")] = 512,
    val_fraction: Annotated[Optional[float], typer.Option(help="0: all of --data is held out; else its validation split, as a recipe with this val_fraction and --seed (default: 0 with --data, 0.05 without: the recipes' held-out part of the embedded corpus)")] = None,
    seed: Annotated[int, typer.Option(help="split seed for --val-fraction")] = 0,
    max_bytes: Annotated[int, typer.Option(help="calibrate on at most this many bytes")] = 262144,
    out: Annotated[Optional[Path], typer.Option(help="write a calibrated copy here (default: update MODEL_DIR in place, atomically)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report only; write nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
):
    """Calibrate the entropy threshold so the mean bytes per patch on held-out text equals a target."""
    from byteify.patching.calibration import held_out_windows

    if val_fraction is None:
        val_fraction = 0.0 if data else 0.05
    if seq_len < 8 or max_bytes < 64 or not 0 <= val_fraction < 1:
        from byteify.errors import ByteifyError

        raise ByteifyError("--seq-len must be >= 8, --max-bytes >= 64 and --val-fraction in [0, 1)")
    ids = held_out_windows(data or ["default"], seq_len, val_fraction, seed, max_bytes)
    if patching == "entropy":
        from byteify.patching.calibration import calibrate_model_dir

        cal = calibrate_model_dir(model_dir, ids, target=target_bytes_per_patch, monotonic=monotonic,
                                  max_patch_length=max_patch_length, out=out, force=force, write=not dry_run)
        if as_json:
            typer.echo(json.dumps(cal.to_dict(), indent=2))
        else:
            typer.echo(cal.summary())
            if not dry_run:
                typer.echo(f"wrote {(out or model_dir) / 'config.json'}")
        return
    from byteify.patching.calibration import measure_patcher

    report = measure_patcher(model_dir, ids, patching, max_patch_length=max_patch_length, patch_size=patch_size)
    typer.echo(json.dumps(report, indent=2) if as_json else
               f"{patching} patching: {report['mean_bytes_per_patch']:.3f} bytes/patch (std {report['std_bytes_per_patch']:.3f} "
               f"over {report['windows']} windows, {report['bytes']:,} bytes)"
               + (f"; source tokenizer: {report['source_bytes_per_token']:.3f} bytes/token" if report["source_bytes_per_token"] else "")
               + (f"; starts vs source-token starts: precision {report['boundaries']['precision']:.3f}, recall "
                  f"{report['boundaries']['recall']:.3f}" if report["boundaries"] else ""))


@app.command()
@_user_errors
def patch(
    model_dir: Annotated[Path, typer.Argument(help="a BLT model directory")],
    text: Annotated[Optional[str], typer.Argument(help="the text to patch (or --file)")] = None,
    file: Annotated[Optional[Path], typer.Option(help="read the text from this file (bytes as they are)")] = None,
    png: Annotated[Optional[Path], typer.Option(help="also plot per-byte entropy, threshold and boundaries to this PNG (needs the 'plot' extra)")] = None,
    patching: Annotated[Optional[str], typer.Option(help="entropy, static, space, source_tokens or byte (default: the model config's)")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="entropy threshold (default: the model config's)")] = None,
    monotonic: Annotated[bool, typer.Option("--monotonic", help="entropy: BLT's relative rule")] = False,
    max_patch_length: Annotated[Optional[int], typer.Option(help="split longer patches (default: the model config's)")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="static patching: bytes per patch (default: the model config's)")] = None,
):
    """Show the patch boundaries a patcher puts in a text, and the mean bytes per patch."""
    from byteify.errors import ByteifyError
    from byteify.patching.viewer import compute_view, plot_png, render

    if (text is None) == (file is None):
        raise ByteifyError("give the text as an argument or with --file (exactly one)")
    if file is not None:
        if not file.is_file():
            raise ByteifyError(f"{file}: no such file")
        data = file.read_bytes()
    else:
        data = text.encode("utf-8")
    if png is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ByteifyError("--png needs matplotlib: pip install 'byteify[plot]'")
    view = compute_view(model_dir, data, patching, threshold, monotonic, max_patch_length, patch_size,
                        with_entropies=png is not None)
    typer.echo(render(view, color=sys.stdout.isatty()))
    typer.echo(view.summary())
    if png is not None:
        typer.echo(f"wrote {plot_png(view, png)}")


def main():  # pragma: no cover
    app()
