"""The process group for ``torchrun --nproc_per_node=K`` (NCCL on GPUs, gloo on CPU).

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op, so the
trainers call the same functions in one process and in K.

Collectives wait at most FASTMINI_DISTRIBUTED_TIMEOUT seconds (default 7200) for the slowest
rank: rank 0 alone evaluates and publishes (held-out sets, predictions on a large dev or test
split) while the others wait at a barrier, which can outlast torch's default (10 minutes for
NCCL, 30 for gloo). A rank that really hangs is then found after that long.

What rank 0 does alone goes through ``on_main``: should it fail (a full disk under a checkpoint, another job's lock
found by its probe), the others learn it from rank 0 and stop with it, quietly, instead of failing in their next
collective with a "connection closed" traceback of their own around rank 0's message.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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

    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        device = torch.device("cuda" if requested == "auto" else requested)  # auto: this process's GPU, checked below
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
        raise UsageError(  # under torchrun, a machine's device count is its ranks' own
            f"{option} {requested}: there is no CUDA device {device.index} (this machine has "
            f"{torch.cuda.device_count()})",
            rank_specific=True,
        )
    return device


TIMEOUT_ENV_VAR = "FASTMINI_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 7200


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the slowest rank (see the module docstring)."""
    from fastmini.training.errors import UsageError

    value = os.environ.get(TIMEOUT_ENV_VAR, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV_VAR}={value}: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


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
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=collective_timeout())
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def sum_over_processes(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The sum of ``values`` (any shape) over all processes; the tensor itself in one process."""
    if not context.is_distributed:
        return values
    reduced = values.to(context.device, copy=True)  # NCCL reduces device tensors only
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def sums_and_maxima_over_processes(
    sums: list[int], maxima: list[int], context: DistributedContext
) -> tuple[list[int], list[int]]:
    """``sums`` summed and ``maxima`` maximised over all processes, in one collective (an all-gather)."""
    if not context.is_distributed:
        return list(sums), list(maxima)
    local = torch.tensor([*sums, *maxima], dtype=torch.int64, device=context.device)
    gathered = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()
    return table[:, : len(sums)].sum(0).tolist(), table[:, len(sums) :].max(0).values.tolist()


def broadcast_from_main(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` on every process (any picklable object)."""
    if not context.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


_Result = TypeVar("_Result")


def on_main(context: DistributedContext, work: Callable[[], _Result], share_result: bool = False) -> _Result | None:
    """``work()`` on rank 0 alone while the other ranks wait for it; its result on rank 0 (on every rank with
    ``share_result``, which must then be picklable), None elsewhere. In one process, simply ``work()``.

    Should ``work`` raise, rank 0 raises that error and every other rank one of its kind: a UsageError with its
    message for a UsageError, else a TrainingError naming rank 0's error; neither marked rank-specific, so the
    command line prints rank 0's message alone (fastmini.training.cli) and every rank exits with its code. Not an
    interrupt: Ctrl-C reaches every rank of a torchrun job by itself, and a broadcast then would meet ranks that
    have already gone (a gloo traceback instead of the one "interrupted" line)."""
    if not context.is_distributed:
        return work()
    result, failure = None, None
    if context.is_main:
        try:
            result = work()
            if share_result:
                pickle.dumps(result)  # fails here, where the others can still be told, not in the broadcast
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001  (re-raised below, once the others know)
            failure = error
    message = (None if failure is None else _describe(failure), result if share_result and failure is None else None)
    try:
        outcome = broadcast_from_main(message, context)
    except Exception as error:
        if failure is not None:
            outcome = None  # the others are gone: rank 0's own error is the one to report, raised below with its chain
        elif context.is_main:
            raise
        else:
            from fastmini.training.errors import TrainingError

            # Rank 0 went without a word (SIGTERM or a crash of its own): one line here, not a gloo traceback.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TrainingError(
                f"rank 0 stopped while this rank waited for it ({reason})", rank_specific=True
            ) from error
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise _as_seen_off_main(*outcome[0])
    return result if context.is_main else outcome[1]


def _describe(failure: BaseException) -> tuple[str, str]:
    from fastmini.training.errors import UsageError

    if isinstance(failure, UsageError):
        return "usage", str(failure)
    return "other", f"{type(failure).__name__}: {failure}"


def _as_seen_off_main(kind: str, message: str) -> Exception:
    from fastmini.training.errors import TrainingError, UsageError

    if kind == "usage":
        return UsageError(message)
    return TrainingError(f"rank 0 failed ({message})")


def main_first(context: DistributedContext, work: Callable[[], _Result]) -> _Result:
    """``work()`` on rank 0, then, once it has succeeded there, on the other ranks; each rank's own result. For
    what rank 0 should do before the others (write a cache they then read, probe a lock); a failure on rank 0
    stops the others as ``on_main``'s does, before they start."""
    result = on_main(context, work)
    return result if context.is_main else work()
