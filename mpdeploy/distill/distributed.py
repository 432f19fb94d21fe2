"""Where a run executes: its device, and the process group torchrun describes (DistributedDataParallel)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False  # we initialized the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (only if WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    return Dist(rank, world, local_rank, created)


def pick_device(name: str | None) -> torch.device:
    """The device named (default: CUDA if visible, else CPU); under torchrun, `cuda` means this rank's GPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MpdeployError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MpdeployError("--device cuda but no CUDA GPU is visible; drop --device or pass --device cpu")
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap_for_ranks(student: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """The module the loop calls: the student itself, or under torchrun its DistributedDataParallel."""
    if dist.world <= 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)


def share_epoch(totals: torch.Tensor, student: nn.Module, dist: Dist) -> None:
    """Sum the epoch's (loss sum, images) over ranks in place and give every rank rank 0's buffers."""
    if dist.world > 1:
        torch.distributed.all_reduce(totals)
        # BatchNorm statistics are per process; rank 0's become everyone's.
        for buf in student.buffers():
            torch.distributed.broadcast(buf, 0)
