"""Unpadding: the real tokens of a padded (B, S, ...) batch packed into (T, ...), and back.

The model packs once after the embeddings, runs every recursion on the T real tokens (no
FLOPs on padding in any GEMM, adapter or LayerNorm) and re-pads only the outputs asked for.
Works for any padding pattern (right, left or holes): ``indices`` are the flat (B*S)
positions of the real tokens in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    indices: torch.Tensor  # (T,) int64 flat positions of the real tokens in the (B*S) layout
    key_padding_mask: torch.Tensor  # (B, S) bool, True for real tokens
    batch_size: int
    seq_len: int

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> Packing:
        # Only what pack/unpack and attention use: cumulative lengths for a varlen kernel would
        # cost a host-device sync on every forward, so they wait for that kernel.
        mask = attention_mask.bool()
        return cls(
            indices=mask.flatten().nonzero().squeeze(1),
            key_padding_mask=mask,
            batch_size=mask.shape[0],
            seq_len=mask.shape[1],
        )

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...)."""
        return padded.flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...) with zeros at the padded positions."""
        flat = packed.new_zeros((self.batch_size * self.seq_len, *packed.shape[1:]))
        flat = flat.index_copy(0, self.indices, packed)
        return flat.view(self.batch_size, self.seq_len, *packed.shape[1:])
