"""Multi-head self-attention core: ``softmax(q k^T / sqrt(d) + mask) v`` per head.

The probabilities (B, A, S, S) are materialised only when ``need_weights`` is set (the
distiller and ``output_attentions=True`` need them); otherwise torch's
``scaled_dot_product_attention`` picks a fused kernel and never writes them out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.packing import Packing


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H) -> (B, A, S, H/A)."""
    batch, seq, hidden = x.shape
    return x.view(batch, seq, num_heads, hidden // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, A, S, D) -> (B, S, A*D)."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def self_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention over (B, A, S, D) heads; returns (context, probabilities)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / (query.shape[-1] ** 0.5)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probabilities = scores.softmax(dim=-1)
    dropped = F.dropout(probabilities, p=dropout_p, training=True) if dropout_p > 0.0 else probabilities
    return torch.matmul(dropped, value), probabilities


def self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over projected (B, S, H) query/key/value; returns ((B, S, H) context, probs or None).

    ``key_padding_mask`` is (B, S) bool, True for real tokens; padded keys get no weight.
    """
    q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
    if need_weights:
        context, probabilities = self_attention_ref(q, k, v, key_padding_mask, dropout_p)
        return merge_heads(context), probabilities
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return merge_heads(context), None


def packed_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    packing: Packing,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over packed (T, H) tokens: each token attends to the real tokens of its sequence.

    Only attention sees the padded layout again (its cost per token is 4*S*H against the layer's
    ~8H^2 + 4HI), so every GEMM, adapter and LayerNorm of the layer runs on real tokens only.
    Returns the packed (T, H) context and, when asked, (B, A, S, S) probabilities.
    """
    padded = (packing.unpack(t) for t in (query, key, value))
    context, probabilities = self_attention(
        *padded, num_heads, packing.key_padding_mask, dropout_p=dropout_p, need_weights=need_weights
    )
    return packing.pack(context), probabilities
