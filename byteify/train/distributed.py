"""Processes: the distributed context of a run under ``torchrun`` (NCCL on CUDA, gloo on CPU),
reductions the loop needs (sums, a stop flag every rank agrees on) and FSDP2 sharding of the
training module (one unit per transformer layer, the hash embeddings and the entropy model in
units of their own, a mixed-precision policy on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import ByteifyError


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

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def all_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a stop signal seen by one rank)."""
        return self.all_sum(float(flag))[0] > 0

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (a small picklable object), on every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process group down (gloo aborts a process that exits with it alive)."""
        if self.mesh is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def device_for(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise ByteifyError(f"run.device '{pref}': expected auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ByteifyError(f"run.device '{pref}': CUDA is not available")
    return dev


def setup_distributed(device_pref: str, always: bool = False) -> Dist:
    """The process group and device mesh when ``WORLD_SIZE`` > 1 (torchrun) or ``always`` (FSDP2
    in one process, e.g. to check the sharded path on one GPU), else one plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not always:
        return Dist(device=device_for(device_pref))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:  # a one-process group outside torchrun
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    cuda = device_for(device_pref).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank=rank, world=world, local_rank=local, device=dev, mesh=init_device_mesh(dev.type, (world,)))


def mixed_precision(run, device: torch.device):
    """FSDP2's policy from ``run.fsdp``: parameters all-gathered and computed in bf16 on CUDA by
    default (fp32 on CPU), gradients reduce-scattered in fp32 unless set otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    param = run.fsdp.param_dtype
    if param == "auto":
        param = "bf16" if device.type == "cuda" else "fp32"
    return MixedPrecisionPolicy(param_dtype=dtypes[param], reduce_dtype=dtypes[run.fsdp.reduce_dtype])


def shard_units(blt) -> list:
    """The modules FSDP2 shards as units of their own, innermost first: every transformer layer
    of every stack, the hash n-gram embeddings (the largest single tensor of a BLT) and the
    entropy model; the rest (encoder/decoder projections, norms, LM head) is the root unit."""
    m = blt.model
    units = list(m.global_transformer.layers) + list(m.local_encoder.layers) + list(m.local_decoder.layers)
    units.append(m.encoder_hash_tok_embedding)
    if m.patcher is not None:
        units += list(m.patcher.layers) + [m.patcher]
    return units


def shard(module, dist: Dist, run):
    """FSDP2 ``fully_shard`` of the training module (see :func:`shard_units`), with the
    mixed-precision policy of :func:`mixed_precision`."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": dist.mesh, "mp_policy": mixed_precision(run, dist.device),
          "reshard_after_forward": run.fsdp.reshard_after_forward}
    for unit in shard_units(module.blt):
        fully_shard(unit, **kw)
    fully_shard(module, **kw)
    return module


def set_gradient_sync(module, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients only on the last micro-step of an accumulated step (the
    others accumulate unsharded gradients locally); a no-op in one process."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(enabled)
