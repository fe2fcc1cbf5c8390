"""Peak memory per process while saving a sharded checkpoint of a ~1B-shaped BLT.

Usage: .venv/bin/python benchmarks/checkpoint_memory.py [--nproc 2] [--no-optimizer] [--work DIR]

Launches itself under ``torchrun --nproc-per-node N`` (gloo, CPU).  Every process builds the
Llama-3.2-1B-shaped BLT of the ``llama-3.2-1b`` recipe (global: 16 layers x 2048, GQA 32/8, ffn
8192; local sizes and hash tables from the header's `--preset auto` alternative) on the meta device, shards
it with FSDP2, allocates its shard with random values and AdamW moments, then saves with
byteify's checkpoint code (``torch.distributed.checkpoint``, each process its own shards) while a
thread samples the process's resident memory every 5 ms.  For contrast, the model's full state
dict gathered to rank 0 (what byteify did before) is measured the same way.  Prints a markdown
table: per process, its shard (parameters + moments), RSS before the save, the peak during it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


class Peak:
    """The largest RSS seen while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak, self.done = rss(), False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss())


def child(args) -> None:
    import torch
    from transformers import LlamaConfig

    from byteify.convert.presets import load_spec
    from byteify.convert.sources import SourceCheckpoint
    from byteify.convert.transplant import build_blt_config
    from byteify.train import checkpoints as ckpt
    from byteify.train.distributed import setup_distributed
    from byteify.train.model import build_module
    from byteify.train.optim import build_optimizer
    from byteify.train.recipe import load_recipe

    from benchmarks.gpu_plan import WITHOUT_WARM_START, header_sets

    sets = header_sets("llama-3.2-1b")  # the header's --preset auto alternative (the measured 1.35B)
    source = SourceCheckpoint(path=ROOT, format="hf", architecture="LlamaForCausalLM", files=[], config=LlamaConfig(
        hidden_size=2048, num_hidden_layers=args.global_layers, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
        vocab_size=128256, max_position_embeddings=131072))
    config, _ = build_blt_config(source, load_spec("auto", sets))
    recipe, _ = load_recipe("llama-3.2-1b", ["model=.", "run.device=cpu", "run.activation_checkpointing=false",
                                            "run.fsdp.param_dtype=fp32", *WITHOUT_WARM_START])
    stage = recipe.stages[1]  # end to end: everything but the entropy model trains
    dist = setup_distributed("cpu")
    module = build_module(config, stage, dist, recipe.run)
    log = lambda what: print(f"[rank {dist.rank}] {what}: RSS {rss() / 2**30:.2f} GiB", file=sys.stderr, flush=True)  # noqa: E731
    log("module built")
    with torch.no_grad():
        for p in module.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).normal_(0, 0.02)
    optimizer = build_optimizer(module, stage) if not args.no_optimizer else None
    log("optimizer built")
    shard = sum(p.to_local().numel() * 4 for p in module.parameters())
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        get_state_dict(module, optimizer)  # allocates the AdamW moments (torch's own lazy init)
        log("moments allocated")
        shard += sum(t.to_local().numel() * 4 for st in optimizer.state.values() for k, t in st.items() if k != "step")
    out = Path(args.work) / "ckpt"
    dist.barrier()
    before = rss()
    with Peak() as sharded:
        if optimizer is not None:
            ckpt.save_sharded(out, module, optimizer)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save({"model": get_model_state_dict(module)}, checkpoint_id=str(out))
    dist.barrier()
    before_full = rss()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with Peak() as gathered:
        if not args.no_gather:
            full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            del full
    rows = dist.gather({"rank": dist.rank, "shard": shard, "before": before, "peak": sharded.peak,
                        "before_full": before_full, "peak_full": gathered.peak,
                        "params": sum(p.numel() for p in module.parameters())})
    if dist.main:
        print("RESULT" + json.dumps(rows))
    dist.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--no-optimizer", action="store_true", help="save the model only")
    ap.add_argument("--global-layers", type=int, default=16, help="Llama-3.2-1B has 16; fewer to fit a small machine")
    ap.add_argument("--no-gather", action="store_true", help="skip the full-gather contrast (it needs the whole model on rank 0)")
    ap.add_argument("--work", default="/tmp/byteify-ckpt-bench")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    Path(args.work).mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), __file__, "--child",
           "--work", args.work, "--global-layers", str(args.global_layers)] + (["--no-optimizer"] if args.no_optimizer else []) \
        + (["--no-gather"] if args.no_gather else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0 or "RESULT" not in proc.stdout:
        sys.exit(proc.stderr[-3000:])
    rows = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    gib = lambda x: f"{x / 2**30:.2f}"  # noqa: E731
    what = "model" if args.no_optimizer else "model + AdamW moments"
    print(f"Saving a Llama-3.2-1B-shaped BLT with {args.global_layers} global layers ({rows[0]['params'] / 1e9:.2f}B "
          f"parameters, fp32; {what}) "
          f"with {args.nproc} CPU processes (gloo):\n")
    print("| process | its shard (GiB) | RSS before (GiB) | peak during the sharded save (GiB) | above before | "
          "peak gathering the full model to rank 0 (GiB) | above before |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        full = "not run | -" if args.no_gather else f"{gib(r['peak_full'])} | {gib(r['peak_full'] - r['before_full'])}"
        print(f"| {r['rank']} | {gib(r['shard'])} | {gib(r['before'])} | {gib(r['peak'])} | {gib(r['peak'] - r['before'])} "
              f"| {full} |")


if __name__ == "__main__":
    main()
