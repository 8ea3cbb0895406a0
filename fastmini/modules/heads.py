"""Task heads: the masked-LM head in its two variants (see FastMiniConfig.head_variant)."""

from __future__ import annotations

import torch
from torch import nn

from fastmini.ops import linear_gelu
from fastmini.ops.plain_layers import all_plain
from fastmini.ops.prepacked_linear import PrepackedWeightsMixin


class MaskedLMHead(PrepackedWeightsMixin, nn.Module):
    """``Decoder(LayerNorm(GELU(Transform(h))))``.

    minialbert: Transform H -> H, exact GELU, LayerNorm(H, 1e-12), Decoder H -> V (own weights).
    albert:     Transform H -> E, hidden_act, LayerNorm(E, layer_norm_eps), Decoder E -> V tied
                to the word embeddings.
    """

    def __init__(self, config, fixed_eps: float):
        super().__init__()
        if config.head_variant == "albert":
            width, eps, self.gelu_approximation = (
                config.embedding_size,
                config.layer_norm_eps,
                config.gelu_approximation,
            )
        else:
            width, eps, self.gelu_approximation = config.hidden_size, fixed_eps, "none"
        self.transform = nn.Linear(config.hidden_size, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        transform = self.transform
        prepacked = self.prepacked_for(hidden_states, transform)
        if prepacked is None and all_plain(transform):  # see ops.plain_layers
            transformed = linear_gelu(
                hidden_states, transform.weight, transform.bias, self.gelu_approximation, check_inputs=False
            )
        else:  # prepacked (the decoder is the larger GEMM: H x V against ~7 H^2 a recursion), or called as it is
            transformed = self.linear_through(prepacked, "transform", hidden_states, gelu=self.gelu_approximation)
        return self.linear_through(prepacked, "decoder", self.norm(transformed))
