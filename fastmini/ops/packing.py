"""Unpadding: the real tokens of a padded (B, S, ...) batch packed into (T, ...), and back.

The model packs once after the embeddings, runs every recursion on the T real tokens (no
FLOPs on padding in any GEMM, adapter or LayerNorm) and re-pads only the outputs asked for.
Works for any padding pattern (right, left or holes): ``indices`` are the flat (B*S)
positions of the real tokens in row-major order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    indices: torch.Tensor  # (T,) int64 flat positions of the real tokens in the (B*S) layout
    key_padding_mask: torch.Tensor  # (B, S) bool, True for real tokens
    batch_size: int
    seq_len: int
    # Each real token's batch row and position in it (indices split by S), for layouts whose B and S dimensions
    # are not adjacent (unpack_heads); None: worked out where needed. Kept when the packing is built on the host
    # (a distillation batch's, moved with it), where they cost no kernel launch: on a GPU a model that attends
    # through the varlen kernel never needs them.
    rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> Packing:
        """``attention_mask``: (B, S), nonzero (True) for real tokens.

        Only what pack/unpack and attention use, and ``cu_seqlens`` for a varlen kernel."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
            raise ValueError(
                f"Packing.from_attention_mask: attention_mask must be a (batch, sequence) tensor, got "
                f"{type(attention_mask).__name__ if shape is None else f'shape {shape}'}"
            )
        mask = attention_mask.bool()
        indices = mask.flatten().nonzero().squeeze(1)
        seq_len = mask.shape[1]
        derived = _rows_and_positions(indices, seq_len) if mask.device.type == "cpu" else {}
        return cls(indices=indices, key_padding_mask=mask, batch_size=mask.shape[0], seq_len=seq_len, **derived)

    def apply(self, fn) -> Packing:
        """The same packing with ``fn`` applied to its tensors, e.g. ``lambda t: t.to(device)``."""
        rows, positions = (None if t is None else fn(t) for t in (self.rows, self.positions))
        return Packing(fn(self.indices), fn(self.key_padding_mask), self.batch_size, self.seq_len, rows, positions)

    def __post_init__(self) -> None:
        # cu_seqlens: (B + 1,) int32 offsets of each sequence's tokens in the packed order, for varlen kernels.
        # Computed with the packing, on the mask's device (no host sync): three small kernels a forward, where a
        # cached_property, read in every recursion, took a lock that torch.compile breaks its graph on. A row's
        # real tokens are always adjacent in the packed order because ``indices`` are row-major, whatever the
        # padding pattern; ``seq_len`` bounds every length, so kernels can take it as the maximum.
        lengths = self.key_padding_mask.sum(dim=1, dtype=torch.int32)
        object.__setattr__(self, "cu_seqlens", torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)))

    def unpack_heads(self, packed: Sequence[torch.Tensor], num_heads: int) -> list[torch.Tensor]:
        """Each (T, H) tensor -> contiguous (B, A, S, H/A), zeros at padded positions: ``unpack`` and the split
        into heads in one scatter, into the layout batched matmuls read without a copy (separately: a zero
        fill, a copy of it, a scatter and the heads' copy; 2.7 -> 0.2-0.4 ms a tensor at 8 x 128 x 768 fp32 on
        2 CPU threads). Its backward is ``pack_heads``."""
        rows, positions = self.rows, self.positions
        if rows is None or positions is None:
            # Worked out again in each recursion: caching them on the packing (a cached_property) would take a lock
            # that torch.compile breaks its graph on, once a recursion.
            rows, positions = _rows_and_positions(self.indices, self.seq_len).values()
        shape = (self.batch_size, self.seq_len)
        return [_UnpackHeads.apply(t, num_heads, rows, positions, self.indices, *shape) for t in packed]

    def pack_heads(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, A, S, D) -> (T, A*D): the merge of heads, then ``pack``. (One gather of the transposed heads
        would do it, but torch's CPU index kernel takes 3x as long as the copy and the row gather.)"""
        return _pack_heads(heads, self.indices)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...)."""
        if padded.shape[:2] != (self.batch_size, self.seq_len):
            raise ValueError(
                f"Packing.pack: padded must be (B, S, ...) with (B, S) = {(self.batch_size, self.seq_len)}, "
                f"got shape {tuple(padded.shape)}"
            )
        return padded.flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, S, ...) with zeros at the padded positions."""
        if packed.dim() == 0 or packed.shape[0] != self.indices.shape[0]:
            raise ValueError(
                f"Packing.unpack: packed must be (T, ...) with T = {self.indices.shape[0]} real tokens, "
                f"got shape {tuple(packed.shape)}"
            )
        flat = packed.new_zeros((self.batch_size * self.seq_len, *packed.shape[1:]))
        flat.index_copy_(0, self.indices, packed)  # in place: the out-of-place op copies the zeros once more
        return flat.view(self.batch_size, self.seq_len, *packed.shape[1:])


def _rows_and_positions(indices: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    return {"rows": indices.div(seq_len, rounding_mode="floor"), "positions": indices.remainder(seq_len)}


def _pack_heads(heads: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    batch, num_heads, seq, head_dim = heads.shape
    return heads.transpose(1, 2).reshape(batch * seq, num_heads * head_dim).index_select(0, indices)


class _UnpackHeads(torch.autograd.Function):
    """``Packing.unpack_heads`` of one tensor, with ``pack_heads`` as its backward: autograd's own backward of
    the scatter would be the slow gather ``pack_heads`` avoids. Tensors and ints only, for torch.compile."""

    @staticmethod
    def forward(ctx, packed, num_heads: int, rows, positions, indices, batch_size: int, seq_len: int):
        ctx.save_for_backward(indices)
        tokens, hidden = packed.shape
        heads = packed.new_zeros(batch_size, num_heads, seq_len, hidden // num_heads)
        # The head size spelt out: -1 cannot be inferred from a batch with no real token (T = 0)
        heads.transpose(1, 2).index_put_((rows, positions), packed.reshape(tokens, num_heads, hidden // num_heads))
        return heads

    @staticmethod
    def backward(ctx, grad_heads: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return _pack_heads(grad_heads, indices), None, None, None, None, None, None
