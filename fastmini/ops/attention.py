"""Multi-head self-attention core: ``softmax(q k^T / sqrt(d) + mask) v`` per head.

The probabilities (B, A, S, S) are materialised only when ``need_weights`` is set (the
distiller and ``output_attentions=True`` need them); otherwise torch's
``scaled_dot_product_attention`` picks a fused kernel and never writes them out.

Packed (unpadded) tokens attend through the padded layout, or one sequence at a time where that
does less work: on the CPU when the padded layout would spend more than half its attention FLOPs
on padding (measured here: 40% padding, 32 x 85: 20.6 -> 8.9 ms; at 3-9% padding the loop is
~30% slower than one batched call). On CUDA, backend "cuda" runs torch's variable-length flash
attention on the packed tokens directly (``torch.nn.attention.varlen``, fp16/bf16, no dropout, no
probabilities: other calls keep the padded path). It has not run on a GPU yet, so it is chosen
only when asked for by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.dispatch import BackendUnavailableError
from fastmini.ops.packing import Packing

PACKED_ATTENTION_BACKENDS = ("torch", "cuda")
# Set to ("cuda",) once tests/test_varlen_attention.py's GPU tests pass: then CUDA picks it by itself.
_VERIFIED_ON_GPU: tuple[str, ...] = ()
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


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


def per_sequence_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Packed (T, A, D) heads -> (T, A, D) context, one sequence at a time: no padding anywhere.

    The CPU path for mostly padded batches, and the varlen kernel's contract (its oracle)."""
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (A, L, D)
        outputs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).transpose(0, 1))
    return torch.cat(outputs)


def _mostly_padding(packing: Packing) -> bool:
    """Would the padded layout spend more than half of attention's work (sum of L^2 against
    B * S^2) on padding? Host integers only: meant for CPU tensors, where reading them is free."""
    lengths = packing.cu_seqlens.diff().tolist()
    return 2 * sum(length * length for length in lengths) < packing.batch_size * packing.seq_len**2


def _varlen_attention(query, key, value, cu_seqlens, max_seqlen):
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9; CUDA only

    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _packed_backend(x: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        return "cuda" if x.is_cuda and "cuda" in _VERIFIED_ON_GPU else "torch"
    if backend not in PACKED_ATTENTION_BACKENDS:
        raise ValueError(f"packed attention: unknown backend '{backend}'; expected one of {PACKED_ATTENTION_BACKENDS}")
    if backend == "cuda":
        if not x.is_cuda:
            raise BackendUnavailableError(
                f"packed attention: backend 'cuda' needs a CUDA tensor, got one on {x.device}"
            )
        try:
            import torch.nn.attention.varlen  # noqa: F401
        except ImportError as error:
            raise BackendUnavailableError(
                f"packed attention: backend 'cuda' needs torch.nn.attention.varlen (torch >= 2.9); this is "
                f"torch {torch.__version__}"
            ) from error
    return backend


def packed_self_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    packing: Packing,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over packed (T, H) tokens: each token attends to the real tokens of its sequence.

    Only attention sees the padded layout again (its cost per token is 4*S*H against the layer's
    ~8H^2 + 4HI), so every GEMM, adapter and LayerNorm of the layer runs on real tokens only.
    Returns the packed (T, H) context and, when asked, (B, A, S, S) probabilities.
    ``backend="cuda"``: the varlen flash kernel where it can serve the call (see the module doc).
    """
    chosen = _packed_backend(query, backend)
    tokens, hidden = query.shape
    heads = (t.reshape(tokens, num_heads, hidden // num_heads) for t in (query, key, value))
    if chosen == "cuda" and not need_weights and dropout_p == 0.0 and query.dtype in _VARLEN_DTYPES:
        context = _varlen_attention(*heads, packing.cu_seqlens, packing.seq_len)
        return context.reshape(tokens, hidden), None
    if not query.is_cuda and not need_weights and _mostly_padding(packing):
        return per_sequence_attention(*heads, packing.cu_seqlens, dropout_p).reshape(tokens, hidden), None
    padded = (packing.unpack(t) for t in (query, key, value))
    context, probabilities = self_attention(
        *padded, num_heads, packing.key_padding_mask, dropout_p=dropout_p, need_weights=need_weights
    )
    return packing.pack(context), probabilities
