"""DDP through ``torchrun`` and ``torch.distributed``: setup, and the collectives the method needs.

Launch with ``torchrun --nproc_per_node N -m sensprune train ...``; torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and :func:`setup` joins the group (NCCL on
CUDA, gloo on CPU). Each rank takes an equal slice of every global batch; the loss and the
sensitivity are weighted by the slice sizes so that the result equals one process on the
global batch (also for a last, uneven batch).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # NCCL carries CUDA tensors only; the small CPU tensors of the collectives below
        # (thresholds, sample counts, flags) travel through gloo in the same group
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(n: int, info: DistInfo) -> slice:
    """This rank's contiguous slice of a global batch of ``n`` samples (sizes differ by <= 1)."""
    base, extra = divmod(n, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return slice(start, start + base + (1 if info.rank < extra else 0))


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In-place sum over ranks of a list of tensors, as one flat collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (pruning decisions must be identical everywhere)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_masks(masks: dict[str, torch.Tensor]) -> None:
    if active():
        for m in masks.values():
            dist.broadcast(m, src=0)


def all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank. A rank that fails alone (a directory it cannot
    claim) must not leave the others waiting in their next collective until its timeout:
    every rank asks, and all stop together."""
    if not active():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def finite_everywhere(value: torch.Tensor, local: float) -> bool:
    """True when the scalar ``value`` (``local`` is its float on this rank) is finite on every
    rank: the sum over ranks is non-finite as soon as one rank's value is. One all-reduce of
    one number on the tensor's own device, read in the same sync as ``local``."""
    if not active():
        return math.isfinite(local)
    total = value.detach().clone()
    dist.all_reduce(total)
    return bool(torch.isfinite(total))


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # DDP's reducer sits in reference cycles, so without a collection it outlives this
        # call and holds the gloo group until the interpreter's finalization, where freeing it
        # aborted rank 1 about once in ten runs on a loaded CPU ("terminate called without an
        # active exception"): free it now, while the interpreter is fully alive
        gc.collect()
        dist.destroy_process_group()
