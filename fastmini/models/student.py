"""Building a student: copying another model's embeddings into it (SPEC.md, Model 7).

The original recipe initialised the student's factorised embeddings from a small BERT
(TinyBERT-4L-312D, hence E=312). Any BERT/ALBERT-style model (fastmini included) whose base
model has an ``embeddings`` module with word/position/token-type tables and a LayerNorm works,
on either side.
"""

from __future__ import annotations

import torch
from torch import nn

EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")
NORM_NAMES = ("LayerNorm", "norm")


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The five embedding tensors of a BERT-style model, by BERT's names."""
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    norm = next((getattr(embeddings, n) for n in NORM_NAMES if hasattr(embeddings, n)), None)
    if embeddings is None or norm is None or not all(hasattr(embeddings, n) for n in EMBEDDING_TABLES):
        raise ValueError(
            f"copy_embeddings: {type(model).__name__} has no BERT-style embeddings module "
            f"(expected .embeddings with {', '.join(EMBEDDING_TABLES)} and a LayerNorm)"
        )
    tensors = {name: getattr(embeddings, name).weight for name in EMBEDDING_TABLES}
    return {**tensors, "LayerNorm.weight": norm.weight, "LayerNorm.bias": norm.bias}


def copy_embeddings(student: nn.Module, source: nn.Module) -> None:
    """Copy word/position/token-type embeddings and their LayerNorm from ``source`` into ``student``."""
    source_tensors, target_tensors = embedding_tensors(source), embedding_tensors(student)
    for name, target in target_tensors.items():
        if source_tensors[name].shape != target.shape:
            raise ValueError(
                f"copy_embeddings: {name} of {type(source).__name__} has shape {tuple(source_tensors[name].shape)}, "
                f"the student expects {tuple(target.shape)} (embedding_size, vocab_size, "
                "max_position_embeddings and type_vocab_size must match the source)"
            )
    with torch.no_grad():
        for name, target in target_tensors.items():
            target.copy_(source_tensors[name])
