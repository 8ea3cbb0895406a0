"""Which windows and which masks every micro-batch gets, as a pure function of (seed, step).

The global batch of optimizer step s is ``batch_size`` consecutive windows of epoch e's
permutation (a generator seeded with (seed, e)); it is cut into ``processes x accumulation``
micro-batches, micro-batch j going to process j // accumulation. The masks of the window at
position p of the global batch are drawn from a generator seeded with (seed, s, p), each window
on its own. Nothing depends on history or on the split, so a resumed run, or a run on K
processes with any --grad-accumulation, sees exactly the batches and masks of an uninterrupted
one-process run with the same global batch. The step arithmetic (StepBatches, derived_seed)
lives in fastmini.training.batching, shared with the fine-tuner.
"""

from __future__ import annotations

import torch

from fastmini.data.masking import apply_masking, check_masking, masking_draws
from fastmini.distill.distiller import Batch
from fastmini.training.batching import derived_seed

__all__ = ["MaskedWindows", "evaluation_batches"]


class MaskedWindows:
    """Pads and masks windows (``input_ids`` + ``special_tokens_mask`` rows of a datasets.Dataset)."""

    def __init__(
        self, windows, tokenizer, vocab_size: int, mask_probability: float, mask_fraction: float, random_fraction: float
    ):
        check_masking(mask_probability, mask_fraction, random_fraction)
        self.windows = windows
        self.pad_token_id = tokenizer.pad_token_id
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = vocab_size
        self.mask_probability = mask_probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices: list[int], seeds: list[int]) -> Batch:
        """Windows ``indices`` padded to the longest; window i masked with a generator seeded by ``seeds[i]``
        (over its own tokens: its masks do not depend on which batch or padding it comes with)."""
        rows = self.windows[indices]
        longest = max(len(ids) for ids in rows["input_ids"])
        size = len(indices)
        input_ids = torch.full((size, longest), self.pad_token_id, dtype=torch.long)
        special = torch.ones((size, longest), dtype=torch.bool)  # padding is never masked
        attention_mask = torch.zeros((size, longest), dtype=torch.long)
        for row, (ids, specials) in enumerate(zip(rows["input_ids"], rows["special_tokens_mask"], strict=True)):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            special[row, : len(ids)] = torch.tensor(specials, dtype=torch.bool)
            attention_mask[row, : len(ids)] = 1
        # Each window draws from its own generator over its own tokens; the thresholds then run once for the
        # whole batch (padding is special: never selected, whatever its draws).
        uniforms = torch.ones((3, size, longest))
        random_ids = torch.zeros((size, longest), dtype=torch.long)
        for row, (ids, seed) in enumerate(zip(rows["input_ids"], seeds, strict=True)):
            length = len(ids)
            uniforms[:, row, :length], random_ids[row, :length] = masking_draws(
                (length,), self.vocab_size, torch.Generator().manual_seed(seed)
            )
        corrupted, labels = apply_masking(
            input_ids,
            special,
            self.mask_token_id,
            uniforms,
            random_ids,
            self.mask_probability,
            self.mask_fraction,
            self.random_fraction,
        )
        return Batch(corrupted, attention_mask, torch.zeros_like(input_ids), labels)


def evaluation_batches(windows: MaskedWindows, count: int, batch_size: int, seed: int) -> list[Batch]:
    """The first ``count`` held-out windows, masked once with fixed seeds (same masks before and after)."""
    count = min(count, len(windows))
    batches = []
    for start in range(0, count, batch_size):
        indices = list(range(start, min(start + batch_size, count)))
        batches.append(windows.batch(indices, [derived_seed(seed, "eval", index) for index in indices]))
    return batches
