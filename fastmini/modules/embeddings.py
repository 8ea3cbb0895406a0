"""Factorised ALBERT-style embeddings: word + absolute position + token type, LayerNorm, dropout."""

from __future__ import annotations

import torch
from torch import nn

from fastmini.ops.plain_layers import all_plain


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        # Only the default ids run out of the table; explicit ones may describe longer sequences (as in ALBERT).
        if position_ids is None and seq_length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq_length} exceeds max_position_embeddings "
                f"({self.position_embeddings.num_embeddings})"
            )
        # The default ids read the tables directly (no gather), where that equals calling them (ops.plain_layers).
        device = inputs_embeds.device
        if position_ids is None and all_plain(self.position_embeddings):
            position_embeddings = self.position_embeddings.weight[:seq_length].unsqueeze(0)
        else:
            if position_ids is None:
                position_ids = torch.arange(seq_length, device=device).unsqueeze(0)
            position_embeddings = self.position_embeddings(position_ids)
        if token_type_ids is None and all_plain(self.token_type_embeddings):
            token_type_embeddings = self.token_type_embeddings.weight[0]
        else:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=device)
            token_type_embeddings = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + token_type_embeddings + position_embeddings
        return self.dropout(self.norm(embeddings))
