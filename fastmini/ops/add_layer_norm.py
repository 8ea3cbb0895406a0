"""Residual add (with dropout on the branch in training) followed by LayerNorm.

``add_layer_norm(x, residual) = LayerNorm(residual + Dropout(x))``: the closing step of both
halves of the shared layer (attention output + adapter output, FFN output + its input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.dispatch import choose


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    return F.layer_norm(residual + x, (x.shape[-1],), weight, bias, eps)


_BACKENDS = {"torch": add_layer_norm_ref}


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(residual + Dropout_p(x))``; pass ``dropout_p=0`` outside training."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"add_layer_norm: dropout_p must be in [0, 1), got {dropout_p}")
    implementation = choose("add_layer_norm", x, backend, _BACKENDS)
    return implementation(x, residual, weight, bias, eps, dropout_p)
