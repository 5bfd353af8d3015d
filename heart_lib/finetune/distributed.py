"""Processes and devices: PyTorch's own `torchrun` environment, DDP, and a resumable sampler.

`torchrun --nproc_per_node N [--nnodes M ...] -m heart_lib.finetune ...` sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; `init()` reads them and starts the process group (NCCL on
CUDA, gloo on CPU). A plain `python -m heart_lib.finetune` is a world of one and starts no group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class Context:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (checkpoints, tables)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """`None`/"auto": this process's GPU when CUDA is available, else the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device = {str(device)!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init(device: str | torch.device | None = None) -> Context:
    """The context of this process, starting the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, dev)


def current(device: torch.device) -> Context:
    """The context of an already-initialised process group (or a world of one)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return Context(dist.get_rank(), dist.get_world_size(), local, device)
    return Context(device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum a small float64 tensor over processes (identity in a world of one)."""
    if ctx.distributed:
        values = values.to(ctx.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def gather_objects(obj, ctx: Context) -> list:
    """Every process's `obj`, in rank order (a list of one in a world of one)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """PyTorch's DistributedSampler (seeded per-epoch shuffle, one shard per rank) that can start
    part-way through an epoch, so a resumed run sees exactly the batches it had not yet seen.

    `drop_last=True` always: every rank gets the same number of samples, and the union of the
    ranks' batches at step s is exactly the single-process batch at step s (same global batch),
    whatever the world size.
    """

    def __init__(self, dataset: Dataset, ctx: Context, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from this rank's `start`-th sample on."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
