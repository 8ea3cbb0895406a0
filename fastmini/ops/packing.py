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
    cu_seqlens: torch.Tensor  # (B+1,) int32 start of each sequence in the packed layout
    max_seqlen: int  # longest sequence (real tokens)
    key_padding_mask: torch.Tensor  # (B, S) bool, True for real tokens
    batch_size: int
    seq_len: int

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> Packing:
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(
            indices=mask.flatten().nonzero().squeeze(1),
            cu_seqlens=cu_seqlens,
            max_seqlen=int(lengths.max()) if lengths.numel() else 0,
            key_padding_mask=mask,
            batch_size=mask.shape[0],
            seq_len=mask.shape[1],
        )

    @property
    def num_tokens(self) -> int:
        return self.indices.numel()

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...)."""
        return padded.flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...) with zeros at the padded positions."""
        flat = packed.new_zeros((self.batch_size * self.seq_len, *packed.shape[1:]))
        flat = flat.index_copy(0, self.indices, packed)
        return flat.view(self.batch_size, self.seq_len, *packed.shape[1:])
