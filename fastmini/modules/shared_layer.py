"""The one transformer layer that every recursion reuses (SPEC.md, Model 3).

Split in two halves because the per-recursion adapters sit between them:
``attention_block`` (q/k/v, attention, output projection, residual + LayerNorm) and
``ffn_block`` (H -> I with GELU, I -> H, residual + LayerNorm).
"""

from __future__ import annotations

import torch
from torch import nn

from fastmini.ops import Packing, add_layer_norm, linear_gelu, packed_self_attention, self_attention


class SharedLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.gelu_approximation = config.gelu_approximation
        self.attention_dropout_p = config.attention_probs_dropout_prob
        self.hidden_dropout_p = config.hidden_dropout_prob
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_intermediate = nn.Linear(hidden, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def _dropout(self, p: float) -> float:
        return p if self.training else 0.0

    def attention_block(
        self,
        x: torch.Tensor,
        packing: Packing | None,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``LayerNorm(x + Dropout(Dense(Attention(x))))`` and the probabilities when asked for.

        ``x`` is packed (T, H) when ``packing`` is given, else a full (B, S, H) batch without
        padding. The residual is this block's own input, i.e. the attention adapter's output.
        """
        projections = (self.query(x), self.key(x), self.value(x))
        dropout_p = self._dropout(self.attention_dropout_p)
        if packing is not None:
            context, probabilities = packed_self_attention(
                *projections, self.num_heads, packing, dropout_p=dropout_p, need_weights=need_weights
            )
        else:
            context, probabilities = self_attention(
                *projections, self.num_heads, None, dropout_p=dropout_p, need_weights=need_weights
            )
        norm = self.attention_norm
        out = add_layer_norm(
            self.attention_output(context),
            x,
            norm.weight,
            norm.bias,
            norm.eps,
            self._dropout(self.hidden_dropout_p),
        )
        return out, probabilities

    def ffn_block(self, x: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(x + Dropout(FfnOut(GELU(Ffn(x)))))``."""
        intermediate = linear_gelu(x, self.ffn_intermediate.weight, self.ffn_intermediate.bias, self.gelu_approximation)
        norm = self.ffn_norm
        return add_layer_norm(
            self.ffn_output(intermediate),
            x,
            norm.weight,
            norm.bias,
            norm.eps,
            self._dropout(self.hidden_dropout_p),
        )
