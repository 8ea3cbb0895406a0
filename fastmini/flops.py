"""Counting useful work (DESIGN.md, "Counting work"): FLOPs on real tokens, padding excluded.

Per token per recursion: 2(4H^2 + 2HI) for the dense layers, 2*2*2*H*(H/r) for the two
adapters, 4*S_eff*H for attention (S_eff = real keys of the token's sequence). Embedding
projection 2EH per token; MLM head 2H^2 + 2HV per predicted token.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastmini.models.configuration import FastMiniConfig


def encoder_flops(config: FastMiniConfig, lengths: Iterable[int]) -> int:
    """FLOPs of one encoder forward over sequences with these real lengths."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    per_token_dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    if config.use_adapter:
        per_token_dense += 2 * 2 * 2 * hidden * config.adapter_size
    projection = 2 * config.embedding_size * hidden if config.use_embedding_projection else 0
    total = 0
    for length in lengths:
        per_recursion = length * per_token_dense + 4 * length * length * hidden
        total += config.num_hidden_layers * per_recursion + length * projection
    return total


def masked_lm_head_flops(config: FastMiniConfig, predicted_tokens: int) -> int:
    return predicted_tokens * (2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size * config.vocab_size)
