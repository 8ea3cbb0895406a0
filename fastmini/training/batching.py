"""Which examples every micro-batch of every optimizer step reads, as a pure function of (seed, step).

The global batch of optimizer step s is ``batch_size`` consecutive items of epoch e's
permutation (a generator seeded with (seed, e)); it is cut into ``processes x accumulation``
micro-batches, micro-batch j going to process j // accumulation. Whatever an item draws (the
distiller's masks) is seeded by (seed, s, the item's position in the global batch), not by its
micro-batch. Nothing depends on history or on the split, so a resumed run, or a run on K
processes with any --grad-accumulation, sees exactly the batches and masks of an uninterrupted
one-process run with the same global batch. (The trainers also normalise token-mean losses by
the step's global count: fastmini.training.normalization.) Shared by the distiller and the
fine-tuner.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from fastmini.training.errors import UsageError

# Options that only choose how the global batch is split (the process count is another): a resumed
# run may change them, with check_resumed_split's warning.
SPLIT_OPTIONS = frozenset({"grad_accumulation"})


def check_global_batch(batch_size: int, world_size: int, grad_accumulation: int) -> None:
    """The global batch must split evenly into processes x accumulation micro-batches."""
    micro_total = world_size * grad_accumulation
    if batch_size % micro_total:
        raise UsageError(
            f"--batch-size {batch_size} (the global batch) must be divisible by processes x "
            f"--grad-accumulation = {world_size} x {grad_accumulation}"
        )


def without_split(options: dict) -> dict:
    """``options`` without SPLIT_OPTIONS: what --resume compares."""
    return {name: value for name, value in options.items() if name not in SPLIT_OPTIONS}


def check_resumed_split(
    saved: tuple[int, int | None], current: tuple[int, int], batch_size: int, log: logging.Logger
) -> None:
    """Warn when a run resumes with another (processes, accumulation) split of the same global batch.

    Batches, masks and loss normalisation depend on the global batch only; the dropout streams are
    per process (one RNG state each, taken round robin from the checkpoint), so they differ."""
    processes, accumulation = saved
    if processes == current[0] and accumulation in (None, current[1]):
        return
    shown = f"{processes} x {accumulation}" if accumulation is not None else f"{processes} process(es)"
    log.warning(
        "--resume: the checkpoint was written by %s (processes x --grad-accumulation), this run uses %d x %d; "
        "the global batch (--batch-size %d) is the same, so the result is the same up to dropout draws",
        shown,
        current[0],
        current[1],
        batch_size,
    )


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class StepBatches:
    """The micro-batches of every optimizer step for one process.

    ``windows``: anything with ``len()`` and ``batch(indices, seeds) -> batch`` (the distiller's
    masked windows, the fine-tuner's encoded examples); ``seeds`` holds one seed per index, derived
    from (seed, step, position in the global batch), for whatever the item draws (masks). The last
    partial batch of an epoch is dropped, so every step has the same global batch on any number of
    processes.
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
            first = (self.rank * self.accumulation + local) * self.micro_size  # offset in the global batch
            indices = order[start + first : start + first + self.micro_size].tolist()
            seeds = [derived_seed(self.seed, "mask", step, first + offset) for offset in range(self.micro_size)]
            batches.append(self.windows.batch(indices, seeds))
        return batches
