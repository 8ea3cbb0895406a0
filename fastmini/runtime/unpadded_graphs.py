"""UnpaddedGraphedEncoder: CUDA graphs over the real tokens of ragged batches.

GraphedEncoder replays the padded layout: a batch with half its positions padding spends half of every
GEMM on them. Here each graph runs the model's unpadded path on a fixed number of packed tokens, so a
ragged batch costs what its real tokens cost, rounded up to a token bucket, without launch overhead.

A graph is recorded per (batch bucket, sequence bucket, token bucket) (``buckets.token_bucket``: with the
default 16 buckets per doubling of the token count, from 16 real tokens on at most 1/16 of a graph's tokens
are filler; ``token_steps_per_doubling`` chooses 1, 2, 4, 8 or 16). Before each replay
the host copies the mask once (one sync: the shapes depend on it; nothing else is read back), builds
the packing's indices from that copy, and fills the bucket's static buffers:

- ``input_ids`` / ``attention_mask``, (batch bucket + filler rows, sequence bucket): the batch in the
  top-left corner, zeros elsewhere;
- filler tokens, as many as the token bucket holds beyond the real ones, as "real" tokens of the
  extra filler rows below the batch (full rows, then one partial): sequences of their own, so no real
  token attends to them, and every sequence stays within the sequence bucket (what varlen attention
  takes as its maximum length);
- ``indices``, the flat positions of real and filler tokens, which the graph packs and unpacks with.

Inputs on the host (a tokenizer's tensors, on the CPU while the graphs are on a GPU) need no sync at all: the
three buffers are views of one int64 device buffer, written on the host into pinned memory and copied with one
non-blocking transfer, so the host prepares the next batch while the GPU still replays this one. The output is
on the GPU either way.

The recorded function then builds a ``Packing`` from these buffers (its offsets computed on the GPU,
inside the graph), runs ``fn(input_ids, attention_mask, packing)`` and copies the result into one
static output per (batch, sequence) bucket, which all of that bucket's token graphs share, as they share
one staged input buffer (each graph's inputs a prefix of it) and the strategy's memory pool: buffers
and activations take what the padded GraphedEncoder's take, whatever the number of token buckets used;
each token graph adds its executable. Rows of the batch bucket beyond the batch have no tokens at all
(empty sequences). Everything else is GraphedEncoder's: inference only, ``reset()`` after replacing
parameters or changing the model's mode or settings, calls from several threads taking turns, one stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fastmini.ops.packing import Packing
from fastmini.runtime.buckets import TOKEN_STEPS_PER_DOUBLING, check_steps_per_doubling, most_filler, token_bucket
from fastmini.runtime.capture import EncoderFn, check_output
from fastmini.runtime.cuda_graphs import GraphedEncoder, _Bucket, static_zeros

# fn(input_ids, attention_mask, packing) -> (B, S, H) with zeros at padded positions; packing None: the
# callable packs by itself (the eager fallback for shapes beyond the largest bucket).
UnpaddedEncoderFn = Callable[[torch.Tensor, torch.Tensor, Packing | None], torch.Tensor]
_OWNER_AND_WRAPPING = ("UnpaddedGraphedEncoder", "`model.graphed_encoder(unpadded=True)` does (modeling.py)")


@dataclass
class _UnpaddedBucket(_Bucket):
    indices: torch.Tensor  # (token bucket,) flat positions of the real and filler tokens
    batch_rows: int  # the batch bucket; filler rows follow it
    staged: torch.Tensor  # int64, a prefix of the (batch, sequence) bucket's shared buffer: input_ids,
    # attention_mask and indices are views of it (_staged_views)


class UnpaddedGraphedEncoder(GraphedEncoder):
    """``fn(input_ids, attention_mask, packing) -> (B, S, H)`` (an ``UnpaddedEncoderFn``) replayed through one
    CUDA graph per (batch, sequence, token) bucket on the real tokens only. Options as GraphedEncoder's (its
    ``eager_fn(input_ids, attention_mask)`` runs what no bucket holds; by default ``fn`` without a packing), and
    ``token_steps_per_doubling``: token buckets between two powers of two (fewer: fewer graphs, more filler).
    ``prepare()`` takes (batch, sequence) shapes, all tokens real, or (batch, sequence, real tokens)."""

    def __init__(self, fn: UnpaddedEncoderFn, *, token_steps_per_doubling: int = TOKEN_STEPS_PER_DOUBLING, **options):
        check_steps_per_doubling(token_steps_per_doubling)
        if options.get("eager_fn") is None and callable(fn):
            options["eager_fn"] = lambda input_ids, attention_mask: fn(input_ids, attention_mask, None)
        super().__init__(fn, **options)
        self.token_steps_per_doubling = token_steps_per_doubling
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # one per (batch, sequence) bucket
        self._staged: dict[tuple[int, int], torch.Tensor] = {}  # likewise: every token graph's inputs a prefix
        self._host_real: torch.Tensor | None = None  # this call's mask as bool on the host (set by _bucket_for)
        self._caller_stream: torch.cuda.Stream | None = None  # the stream of the call that captures

    def _end_call(self) -> None:
        self._host_real = None  # the caller's mask is not kept past its call

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self._outputs.clear()
            self._staged.clear()

    def _device_for(self, input_ids: torch.Tensor) -> torch.device:
        """Inputs on the host run on the device this encoder serves (its graphs', else the constructor's): filled
        by one copy without a host sync. Others on their own device."""
        served = self._device or self.default_device
        if input_ids.device.type == "cpu" and served is not None and served.type != "cpu":
            return served
        return input_ids.device

    def _capture(self, bucket: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Bucket:
        device = self._device_for(input_ids)
        self._caller_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        return super()._capture(bucket, input_ids, attention_mask)

    def prepare(self, shapes: Iterable[tuple[int, ...]], device: torch.device | str | None = None) -> None:
        """Capture the buckets of these shapes now, on dummy inputs with the first ``real tokens`` positions
        (row by row) real, or the whole (batch, sequence) block; shapes beyond the largest bucket are skipped."""
        shapes = list(shapes)
        for shape in shapes:
            if len(shape) == 3 and not 0 < shape[2] <= shape[0] * shape[1]:
                raise ValueError(f"UnpaddedGraphedEncoder.prepare: real tokens of {shape} must be in 1..batch*sequence")
        super().prepare(shapes, device)

    def _dummy_mask(self, shape: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(ids)
        if len(shape) == 3:
            mask.view(-1)[: shape[2]] = 1
        else:
            mask[: shape[0], : shape[1]] = 1
        return mask

    def _bucket_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, ...] | None:
        grid_bucket = self.grid.choose(*input_ids.shape)
        if grid_bucket is None:
            return None
        # The call's one host sync; _fill, which always follows in the same call, builds the indices from it.
        self._host_real = attention_mask.detach().to("cpu").bool()
        real_tokens = int(self._host_real.sum())
        if real_tokens == 0:
            return None  # nothing to pack: the callable's own path (zeros) serves it
        batch_rows, sequence = grid_bucket
        tokens, _ = token_bucket(real_tokens, batch_rows * sequence, self.token_steps_per_doubling)
        return (batch_rows, sequence, tokens)

    def _run_eagerly(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self._device_for(input_ids)
        return self.eager_fn(input_ids.to(device), attention_mask.to(device))

    def _allocate(
        self, bucket: tuple[int, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> _UnpaddedBucket:
        batch_rows, sequence, tokens = bucket
        _, filler = token_bucket(tokens, batch_rows * sequence, self.token_steps_per_doubling)
        shape = (batch_rows + _rows_for(filler, sequence), sequence)
        # The token graphs of a (batch, sequence) bucket replay one at a time and each fills its inputs before
        # its replay: their staged inputs are prefixes of one buffer, sized for the most filler rows and tokens
        # (one buffer per graph was 2 * rows * sequence + tokens int64s each: 113 MB over the 105 graphs of the
        # (128, 512) bucket with 8 token steps a doubling; 193 graphs with today's 16).
        shared = self._staged.get((batch_rows, sequence))
        if shared is None:
            capacity = batch_rows * sequence
            most_rows = batch_rows + _rows_for(most_filler(capacity, self.token_steps_per_doubling), sequence)
            like = torch.empty(0, dtype=torch.long, device=self._device_for(input_ids))
            shared = self._staged[(batch_rows, sequence)] = static_zeros((2 * most_rows * sequence + capacity,), like)
        staged = shared[: 2 * shape[0] * shape[1] + tokens]
        ids, mask, indices = _staged_views(staged, shape, tokens)
        return _UnpaddedBucket(
            input_ids=ids,
            attention_mask=mask,
            captured=None,  # type: ignore[arg-type]
            indices=indices,
            batch_rows=batch_rows,
            staged=staged,
        )

    def _fill(self, entry: _UnpaddedBucket, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.device == entry.staged.device:
            self._write(entry, entry.staged, input_ids, attention_mask)
            return
        # Host inputs: everything written on the host, then one copy that does not wait for the GPU (pinned
        # memory, which the caching host allocator keeps until the copy has run).
        staged = torch.empty(entry.staged.shape, dtype=torch.long, pin_memory=entry.staged.is_cuda)
        self._write(entry, staged, input_ids, attention_mask)
        entry.staged.copy_(staged, non_blocking=True)

    def _write(
        self, entry: _UnpaddedBucket, staged: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """The bucket's three static inputs, written into ``staged`` (its own buffer, or a host copy of it)."""
        ids, mask, indices = _staged_views(staged, tuple(entry.input_ids.shape), entry.indices.shape[0])
        batch_size, sequence_length = input_ids.shape
        sequence = ids.shape[1]
        staged[: ids.numel() + mask.numel()].zero_()  # ids and mask are adjacent blocks of it: one fill
        ids[:batch_size, :sequence_length].copy_(input_ids)
        mask[:batch_size, :sequence_length].copy_(attention_mask.bool())
        # Indices from the host copy (row-major, as the mask's nonzero would give them): no further sync.
        real = self._host_real.nonzero()
        filler = indices.shape[0] - real.shape[0]
        first_filler = entry.batch_rows * sequence
        positions = torch.cat([real[:, 0] * sequence + real[:, 1], torch.arange(first_filler, first_filler + filler)])
        mask[entry.batch_rows :].view(-1)[:filler] = 1
        indices.copy_(positions, non_blocking=True)

    def _recorded_fn(self, entry: _UnpaddedBucket) -> EncoderFn:
        indices, rows, sequence = entry.indices, *entry.input_ids.shape
        grid_bucket = (entry.batch_rows, sequence)

        def run_packed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # A new Packing every run: its offsets (cu_seqlens) are computed from the mask inside the graph.
            packing = Packing(
                indices=indices, key_padding_mask=attention_mask.bool(), batch_size=rows, seq_len=sequence
            )
            padded = check_output(self.fn(input_ids, attention_mask, packing), input_ids, *_OWNER_AND_WRAPPING)
            return self._shared_output(grid_bucket, padded)[:rows]

        return run_packed

    def _shared_output(self, grid_bucket: tuple[int, int], padded: torch.Tensor) -> torch.Tensor:
        """The (batch, sequence) bucket's static output with ``padded`` copied into its first rows. Created by the
        first warm-up run of the bucket's first graph, outside any capture."""
        output = self._outputs.get(grid_bucket)
        if output is None:
            batch_rows, sequence = grid_bucket
            rows = batch_rows + _rows_for(most_filler(batch_rows * sequence, self.token_steps_per_doubling), sequence)
            # On the caller's stream, which replays and reads it, not the capture's warm-up stream: the caching
            # allocator hands a freed block (after reset()) back to the stream it was allocated on.
            on_caller = self._caller_stream is not None
            with torch.cuda.stream(self._caller_stream) if on_caller else contextlib.nullcontext():
                output = self._outputs[grid_bucket] = static_zeros((rows, *padded.shape[1:]), padded)
        output[: padded.shape[0]].copy_(padded)
        return output


def _rows_for(tokens: int, sequence: int) -> int:
    """Rows of ``sequence`` positions that hold ``tokens`` filler tokens."""
    return -(-tokens // sequence)


def _staged_views(staged: torch.Tensor, shape: tuple[int, int], tokens: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, indices) as views of one int64 buffer: two (rows, sequence) blocks, then the
    bucket's token positions."""
    size = shape[0] * shape[1]
    return staged[:size].view(shape), staged[size : 2 * size].view(shape), staged[2 * size : 2 * size + tokens]
