"""Dynamic masked-LM corruption (BERT's 80/10/10), drawn afresh for every batch.

Each token that is not special (CLS, SEP, UNK, padding: ``special_tokens_mask`` is 1) is selected
with probability ``mask_probability``; a selected token becomes the mask token with probability
``mask_fraction``, a random vocabulary id with probability ``random_fraction``, and stays as
it is otherwise. ``labels`` hold the original id at selected positions and -100 elsewhere.
This is transformers' DataCollatorForLanguageModeling, drawn from an explicit generator so
that the masks depend only on its seed (the distiller seeds each window by its position in the
global batch: resumed and multi-process runs draw the same). The drawing and the thresholds are
two functions because the distiller draws per window and thresholds per batch: its
``MaskedWindows.batch`` (fastmini.distill.batches) is the one caller, and the one that tests exercise.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # CrossEntropyLoss's ignore_index: no loss, no gradient (MLM and NER labels)
# BERT's masking (SPEC.md): this share of the non-special tokens is selected; of those, MASK_FRACTION become
# the mask token, RANDOM_FRACTION a random token, and the rest stay as they are.
MASK_PROBABILITY = 0.15
MASK_FRACTION = 0.8
RANDOM_FRACTION = 0.1


def check_masking(mask_probability: float, mask_fraction: float, random_fraction: float) -> None:
    """A ValueError naming the first rate that makes no sense, by these parameters' names (the distiller's options
    share them: its config puts its flags in their place)."""
    rates = {"mask_probability": mask_probability, "mask_fraction": mask_fraction, "random_fraction": random_fraction}
    for name, value in rates.items():
        # "not 0 <= value <= 1" rather than two comparisons: NaN compares false either way and must be refused.
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if mask_fraction + random_fraction > 1.0:
        raise ValueError(f"mask_fraction ({mask_fraction}) + random_fraction ({random_fraction}) must be <= 1")


def masking_draws(
    shape: tuple[int, ...], vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything the masking of ``shape`` tokens draws from ``generator``: (3, *shape) uniforms (select,
    mask, randomise) and the random replacement ids. Two calls, so drawing per window stays cheap."""
    uniforms = torch.rand((3, *shape), generator=generator)
    return uniforms, torch.randint(vocab_size, shape, generator=generator)


def apply_masking(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    uniforms: torch.Tensor,
    random_ids: torch.Tensor,
    mask_probability: float,
    mask_fraction: float,
    random_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input ids, labels) from ``masking_draws``' values (any batch of them at once)."""
    selected = (uniforms[0] < mask_probability) & ~special_tokens_mask.bool()
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    to_mask = selected & (uniforms[1] < mask_fraction)
    # Of the selected tokens not masked, this share gets a random id (0.1 / 0.2 = 0.5 for 80/10/10).
    remaining = 1.0 - mask_fraction
    random_share = random_fraction / remaining if remaining > 0 else 0.0
    to_randomise = selected & ~to_mask & (uniforms[2] < random_share)
    corrupted = torch.where(to_randomise, random_ids.to(input_ids.dtype), input_ids.masked_fill(to_mask, mask_token_id))
    return corrupted, labels
