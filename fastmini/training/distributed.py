"""The process group for ``torchrun --nproc_per_node=K`` (NCCL on GPUs, gloo on CPU).

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op, so the
trainers call the same functions in one process and in K.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(requested: str, local_rank: int = 0, option: str = "--device") -> torch.device:
    """ "auto": this process's GPU when there is one, else the CPU; "cpu" / "cuda" / "cuda:N" as given.

    Anything else, or a GPU this machine does not have, is a UsageError naming ``option``: found
    here, before a trainer touches its output directory, instead of an assertion deep in torch."""
    from fastmini.training.errors import UsageError

    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError) as error:
        raise UsageError(f"{option} {requested}: expected {DEVICE_CHOICES}") from error
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UsageError(f"{option} {requested}: expected {DEVICE_CHOICES}")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"{option} {requested}: no CUDA device is available here (use cpu or auto)")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    if device.index >= torch.cuda.device_count():
        raise UsageError(
            f"{option} {requested}: there is no CUDA device {device.index} (this machine has "
            f"{torch.cuda.device_count()})"
        )
    return device


def setup(requested_device: str = "auto") -> DistributedContext:
    """Join torchrun's process group when launched by it; otherwise a one-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def mean_over_processes(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of ``values`` (any shape) over all processes; the tensor itself in one process."""
    if not context.is_distributed:
        return values
    reduced = values.to(context.device, copy=True)  # NCCL reduces device tensors only
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return (reduced / context.world_size).to(values.device)


def broadcast_from_main(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` on every process (any picklable object)."""
    if not context.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
