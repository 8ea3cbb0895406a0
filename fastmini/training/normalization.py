"""Token-mean losses over the global batch, however it is split into processes and micro-batches.

A loss that averages over tokens (the distiller's four terms, the fine-tuner's NER cross-entropy)
must divide by the number of tokens in the whole optimizer step, not in one micro-batch: with
micro-batches of unequal token counts, the mean of micro-batch means is another loss, and K
processes would train differently from one. So, as transformers' Trainer does with
``num_items_in_batch``, each process counts its micro-batches' items before the first backward,
the counts are reduced over processes once per step (``step_totals``), and every micro-batch
contributes sum / global count. The gradient is then that of one process on the full batch.

DDP averages gradients over processes; the global mean needs their sum, which is why
``backward_share`` multiplies by the number of processes. This file knows nothing about models.
"""

from __future__ import annotations

import torch

from fastmini.training.distributed import DistributedContext, sums_and_maxima_over_processes


def step_totals(
    counts: dict[str, int], context: DistributedContext, maxima: dict[str, int] | None = None
) -> dict[str, int]:
    """This step's ``counts`` summed over processes and ``maxima`` (e.g. a padded length) maximised,
    in one collective; every process must call it with the same names."""
    maxima = maxima or {}
    sums, largest = sums_and_maxima_over_processes(list(counts.values()), list(maxima.values()), context)
    return {**dict(zip(counts, sums, strict=True)), **dict(zip(maxima, largest, strict=True))}


def share_of_mean(mean: torch.Tensor, count: int, total: int) -> torch.Tensor | None:
    """A micro-batch's share of the step's global mean, from its own mean over ``count`` of the step's
    ``total`` items: mean x count / total. None when it has no items (its own mean is NaN or
    meaningless): the caller then contributes a zero that still reaches every parameter."""
    if count == 0:
        return None
    return mean * count / total


def backward_share(share: torch.Tensor, context: DistributedContext) -> None:
    """Backward of this process's share of the global mean (DDP divides the summed gradients by the
    number of processes: multiplying by it first leaves the gradient of the global mean)."""
    (share * context.world_size if context.is_distributed else share).backward()
