"""Which examples every micro-batch of every optimizer step reads, as a pure function of (seed, step).

The global batch of optimizer step s is ``batch_size`` consecutive items of epoch e's
permutation (a generator seeded with (seed, e)); it is cut into ``processes x accumulation``
micro-batches, micro-batch j going to process j // accumulation. Nothing depends on history,
so a resumed run, or a run on K processes, sees exactly the batches of an uninterrupted
one-process run with the same global batch. Shared by the distiller and the fine-tuner.
"""

from __future__ import annotations

import hashlib

import torch

from fastmini.training.errors import UsageError


def check_global_batch(batch_size: int, world_size: int, grad_accumulation: int) -> None:
    """The global batch must split evenly into processes x accumulation micro-batches."""
    micro_total = world_size * grad_accumulation
    if batch_size % micro_total:
        raise UsageError(
            f"--batch-size {batch_size} (the global batch) must be divisible by processes x "
            f"--grad-accumulation = {world_size} x {grad_accumulation}"
        )


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class StepBatches:
    """The micro-batches of every optimizer step for one process.

    ``windows``: anything with ``len()`` and ``batch(indices, seed) -> batch`` (the distiller's
    masked windows, the fine-tuner's encoded examples); the seed is derived from (seed, step,
    micro-batch) for whatever the batch draws (masks). The last partial batch of an epoch is
    dropped, so every step has the same global batch on any number of processes.
    """

    def __init__(self, windows, batch_size: int, processes: int, accumulation: int, rank: int, seed: int):
        self.windows = windows
        self.batch_size = batch_size
        self.micro_size = batch_size // (processes * accumulation)
        self.accumulation = accumulation
        self.rank = rank
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.windows) // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "order", epoch))
            self._order = (epoch, torch.randperm(len(self.windows), generator=generator))
        return self._order[1]

    def position(self, step: int) -> dict[str, int]:
        """Where step ``step`` reads in the data: epoch, step within it, windows consumed before it."""
        return {
            "epoch": step // self.steps_per_epoch,
            "step_in_epoch": step % self.steps_per_epoch,
            "windows_seen": step * self.batch_size,
        }

    def micro_batches(self, step: int) -> list:
        """This process's micro-batches of optimizer step ``step`` (``accumulation`` of them)."""
        position = self.position(step)
        order = self.order(position["epoch"])
        start = position["step_in_epoch"] * self.batch_size
        batches = []
        for local in range(self.accumulation):
            micro = self.rank * self.accumulation + local
            first = start + micro * self.micro_size
            indices = order[first : first + self.micro_size].tolist()
            batches.append(self.windows.batch(indices, derived_seed(self.seed, "mask", step, micro)))
        return batches
