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


def _quiet_transformers():
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
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
    preset: Annotated[str, typer.Option(help="sizes of the fresh parts: auto (scaled to the source), tiny, blt-1b, or a YAML file")] = "auto",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a preset key, e.g. --set encoder.hidden_size=256 (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="seed for the fresh parts")] = 0,
    dtype: Annotated[str, typer.Option(help="output dtype: auto (the source's), fp32, fp16, bf16")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors shard, e.g. 500MB, 5GB")] = "5GB",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="prove the transplant numerically (default on)")] = True,
    tolerance: Annotated[float, typer.Option(help="max relative difference of hidden states for --verify")] = 1e-4,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty OUT")] = False,
):
    """Transplant SRC's decoder layers into a BLT global transformer; write a HF-loadable model to OUT."""
    from byteify.conversion import convert as run_convert
    from byteify.inspection import format_inspection, inspect_model
    from byteify.presets import load_spec
    from byteify.sources import open_source

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
    from byteify.recipes import recipe_summary, shipped_recipes

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
    from byteify.recipes import copy_recipe

    typer.echo(f"wrote {copy_recipe(name, dest, force)}")


@app.command(context_settings={"allow_extra_args": False})
@_user_errors
def train(
    recipe: Annotated[str, typer.Argument(help="recipe YAML path or shipped recipe name")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. stages.0.steps=50 model=runs/blt")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the plan, then exit")] = False,
    resume: Annotated[Optional[str], typer.Option(help="'auto' (newest checkpoint of output_dir) or a checkpoint path")] = None,
):
    """Run a recipe: stages of byte-ifying training with checkpoints and resume.  Works under torchrun (FSDP2)."""
    from byteify.recipes import load_recipe

    rec, raw = load_recipe(recipe, overrides or [])
    if dry_run:
        from byteify.training import plan

        typer.echo(plan(rec))
        return
    from byteify.training import Interrupted, Trainer

    if not rec.run.progress or not sys.stderr.isatty():
        rec.run.progress = rec.run.progress and sys.stderr.isatty()
    try:
        summary = Trainer(rec, raw, resume=resume).run()
    except Interrupted as exc:
        typer.echo(f"interrupted: checkpoint saved at {exc.checkpoint}; continue with --resume auto", err=True)
        raise typer.Exit(130)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary))


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
