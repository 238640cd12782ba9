"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and sharding of work lists.

Launched without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs as one process
and no process group is created, so the same command works alone and under ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment ``torchrun`` sets; (0, 1, 0) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group when launched by ``torchrun``; pick the device for this process.

    ``device``: ``"cpu"``, ``"cuda"`` or None for CUDA when available. The backend follows the
    device: NCCL for CUDA, gloo for CPU. Calling it again returns the existing set-up.
    """
    rank, world, local = env_world()
    use_cuda = (device is None and torch.cuda.is_available()) or (device or "").startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            from weakclip.errors import WeakclipError

            raise WeakclipError("--device cuda asked for, but no CUDA device is visible to PyTorch")
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev)


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This process's share of a work list: every ``world_size``-th item from ``rank`` on."""
    return list(items[rank::world_size])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
