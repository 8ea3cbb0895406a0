"""UnpaddedGraphedEncoder: CUDA graphs over the real tokens of ragged batches.

GraphedEncoder replays the padded layout: a batch with half its positions padding spends half of every
GEMM on them. Here each graph runs the model's unpadded path on a fixed number of packed tokens, so a
ragged batch costs what its real tokens cost, rounded up to a token bucket, without launch overhead.

A graph is recorded per (batch bucket, sequence bucket, token bucket) (``buckets.token_bucket``: at
most ~25% filler). Before each replay the host reads the mask (one sync: nothing else is possible
without knowing the shapes) and fills the bucket's static buffers:

- ``input_ids`` / ``attention_mask``, (batch bucket + filler rows, sequence bucket): the batch in the
  top-left corner, zeros elsewhere;
- filler tokens, as many as the token bucket holds beyond the real ones, as "real" tokens of the
  extra filler rows below the batch (full rows, then one partial): sequences of their own, so no real
  token attends to them, and every sequence stays within the sequence bucket (what varlen attention
  takes as its maximum length);
- ``indices``, the flat positions of real and filler tokens, which the graph packs and unpacks with.

The recorded function then builds a ``Packing`` from these buffers (its offsets computed on the GPU,
inside the graph) and runs ``fn(input_ids, attention_mask, packing)``. Rows of the batch bucket beyond
the batch have no tokens at all (empty sequences). Everything else is GraphedEncoder's: inference only,
``reset()`` after replacing parameters, one thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fastmini.ops.packing import Packing
from fastmini.runtime.buckets import token_bucket
from fastmini.runtime.capture import EncoderFn
from fastmini.runtime.cuda_graphs import GraphedEncoder, _Bucket, static_zeros

# fn(input_ids, attention_mask, packing) -> (B, S, H) with zeros at padded positions; packing None: the
# callable packs by itself (the eager fallback for shapes beyond the largest bucket).
UnpaddedEncoderFn = Callable[[torch.Tensor, torch.Tensor, Packing | None], torch.Tensor]


@dataclass
class _UnpaddedBucket(_Bucket):
    indices: torch.Tensor  # (token bucket,) flat positions of the real and filler tokens
    batch_rows: int  # the batch bucket; filler rows follow it


class UnpaddedGraphedEncoder(GraphedEncoder):
    """``fn(input_ids, attention_mask, packing) -> (B, S, H)`` (an ``UnpaddedEncoderFn``) replayed through one
    CUDA graph per (batch, sequence, token) bucket on the real tokens only. Options as GraphedEncoder's.
    ``prepare()`` takes (batch, sequence) shapes, all tokens real, or (batch, sequence, real tokens)."""

    def prepare(self, shapes: Iterable[tuple[int, ...]], device: torch.device | str | None = None) -> None:
        """Capture the buckets of these shapes now, on dummy inputs whose first ``real tokens`` positions
        (row by row) are real; shapes beyond the largest bucket are skipped."""
        shapes = list(shapes)
        for shape in shapes:
            if len(shape) == 3 and not 0 < shape[2] <= shape[0] * shape[1]:
                raise ValueError(f"UnpaddedGraphedEncoder.prepare: real tokens of {shape} must be in 1..batch*sequence")
        super().prepare(shapes, device)

    def _dummy_mask(self, shape: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(ids)
        mask.view(-1)[: shape[2] if len(shape) == 3 else ids.numel()] = 1
        return mask

    def _bucket_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, ...] | None:
        grid_bucket = self.grid.choose(*input_ids.shape)
        if grid_bucket is None:
            return None
        real_tokens = int(attention_mask.bool().sum())  # the one host sync: the shapes depend on it
        if real_tokens == 0:
            return None  # nothing to pack: the callable's own path (zeros) serves it
        batch_rows, sequence = grid_bucket
        tokens, _ = token_bucket(real_tokens, batch_rows * sequence)
        return (batch_rows, sequence, tokens)

    def _run_eagerly(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fn(input_ids, attention_mask, None)

    def _allocate(
        self, bucket: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> _UnpaddedBucket:
        batch_rows, sequence, tokens = bucket
        _, most_filler = token_bucket(tokens, batch_rows * sequence)
        filler_rows = -(-most_filler // sequence)  # ceil
        shape = (batch_rows + filler_rows, sequence)
        return _UnpaddedBucket(
            input_ids=static_zeros(shape, input_ids),
            attention_mask=static_zeros(shape, attention_mask),
            captured=None,  # type: ignore[arg-type]
            indices=static_zeros((tokens,), torch.empty(0, dtype=torch.long, device=input_ids.device)),
            batch_rows=batch_rows,
        )

    def _fill(self, entry: _UnpaddedBucket, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        batch_size, sequence_length = input_ids.shape
        real = attention_mask.bool()
        entry.input_ids.zero_()
        entry.input_ids[:batch_size, :sequence_length].copy_(input_ids)
        entry.attention_mask.zero_()
        entry.attention_mask[:batch_size, :sequence_length].copy_(real)
        filler = entry.indices.shape[0] - int(real.sum())
        entry.attention_mask[entry.batch_rows :].view(-1)[:filler] = 1
        entry.indices.copy_(entry.attention_mask.flatten().nonzero().squeeze(1))

    def _recorded_fn(self, entry: _UnpaddedBucket) -> EncoderFn:
        indices, rows, sequence = entry.indices, *entry.input_ids.shape

        def run_packed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # A new Packing every run: its offsets (cu_seqlens) are computed from the mask inside the graph.
            packing = Packing(
                indices=indices, key_padding_mask=attention_mask.bool(), batch_size=rows, seq_len=sequence
            )
            return self.fn(input_ids, attention_mask, packing)

        return run_packed
