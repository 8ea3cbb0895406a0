"""Dynamic masked-LM corruption (BERT's 80/10/10), drawn afresh for every batch.

Each token that is not special (CLS, SEP, padding: ``special_tokens_mask`` is 1) is selected
with probability ``probability``; a selected token becomes the mask token with probability
``mask_fraction``, a random vocabulary id with probability ``random_fraction``, and stays as
it is otherwise. ``labels`` hold the original id at selected positions and -100 elsewhere.
This is transformers' DataCollatorForLanguageModeling, drawn from an explicit generator so
that the masks depend only on its seed (the distiller seeds each window by its position in the
global batch: resumed and multi-process runs draw the same).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input ids, labels), both shaped like ``input_ids``; the input is not modified."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask probability must be in [0, 1], got {probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
        raise ValueError(
            f"mask_fraction ({mask_fraction}) and random_fraction ({random_fraction}) must be >= 0 and sum to <= 1"
        )
    special = special_tokens_mask.bool()
    chances = torch.full(input_ids.shape, probability).masked_fill_(special, 0.0)
    selected = torch.bernoulli(chances, generator=generator).bool()
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)

    corrupted = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, mask_fraction), generator=generator).bool() & selected
    corrupted[to_mask] = mask_token_id
    # Of the selected tokens not masked, this share gets a random id (0.1 / 0.2 = 0.5 for 80/10/10).
    remaining = 1.0 - mask_fraction
    random_share = random_fraction / remaining if remaining > 0 else 0.0
    to_randomise = (
        torch.bernoulli(torch.full(input_ids.shape, random_share), generator=generator).bool() & selected & ~to_mask
    )
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    corrupted[to_randomise] = random_ids[to_randomise]
    return corrupted, labels
