"""The shared layer's residual + LayerNorm folded into the adapter forward that follows it (ops.add_layer_norm_adapter):
the adapter kernels read ``LayerNorm(residual + x)`` chunk by chunk instead of a tensor an add_layer_norm kernel
wrote, so the normalised activation never goes to memory and one launch goes.

Rounded at the points where add_layer_norm's kernel rounds: the sum to the activation dtype before its
statistics, and the normalised value to it before the adapter reads it. The statistics come from a sweep of
their own, merged chunk by chunk (add_layer_norm's kernel sums whole rows), so they may differ in the last fp32
bits and the adapter's input, now and then, by one step of the activation dtype. Every later sweep of the adapter
recomputes its chunk of the normalised input from x and the residual.
"""

import triton
import triton.language as tl
from fastmini.kernels.chunked_statistics import merge_chunk_statistics
from fastmini.kernels.interpreter import cast_output


@triton.jit
def _rounded_sum(x, residual_block, offsets, tile_mask, ACC_DTYPE: tl.constexpr):
    """residual + x, rounded to the activation dtype (x's) as add_layer_norm rounds it, in ACC_DTYPE."""
    residual = tl.load(residual_block + offsets, mask=tile_mask, other=0.0)
    return cast_output(residual.to(ACC_DTYPE) + x.to(ACC_DTYPE), residual_block.dtype.element_ty).to(ACC_DTYPE)


@triton.jit
def pre_norm_rows(
    x_block,  # (ROWS, H) rows of x from the program's first row on
    residual_ptr,  # (M, H), or None without PRE_NORM
    first_row,  # the program's first row
    row_offsets,  # (ROWS,) int32: local row * H
    row_mask,  # (ROWS,)
    eps,
    H: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRE_NORM: tl.constexpr,
):
    """What adapter_input_chunk needs beyond x: with PRE_NORM, (the program's rows of the residual, and the mean and
    rstd of residual + x, (ROWS,) in ACC_DTYPE, from a sweep of their own); without, placeholders."""
    if PRE_NORM:
        residual_block = residual_ptr + first_row.to(tl.int64) * H
        mean = tl.zeros((ROWS,), dtype=ACC_DTYPE)
        centred_squares = tl.zeros((ROWS,), dtype=ACC_DTYPE)
        for start in range(0, H, BLOCK_K):
            columns = start + tl.arange(0, BLOCK_K)
            column_mask = columns < H
            tile_mask = row_mask[:, None] & column_mask[None, :]
            offsets = row_offsets[:, None] + columns[None, :]
            x = tl.load(x_block + offsets, mask=tile_mask, other=0.0)
            total = _rounded_sum(x, residual_block, offsets, tile_mask, ACC_DTYPE)
            mean, centred_squares = merge_chunk_statistics(
                mean, centred_squares, total, column_mask, start, H, BLOCK_K, ACC_DTYPE
            )
        return residual_block, mean, 1.0 / tl.sqrt(centred_squares / H + eps)
    else:
        # Placeholders that adapter_input_chunk never reads: triton 3.6's compiler (the GPU machine's) refuses a
        # @triton.jit helper that returns None, where the interpreter and triton 3.9 take it.
        unused = tl.zeros((ROWS,), dtype=ACC_DTYPE)
        return x_block, unused, unused


@triton.jit
def adapter_input_chunk(
    x_block,  # (ROWS, H) rows of x from the program's first row on
    row_offsets,  # (ROWS,) int32: local row * H
    columns,  # (BLOCK_K,)
    column_mask,  # (BLOCK_K,)
    tile_mask,  # (ROWS, BLOCK_K)
    residual_block=None,  # with PRE_NORM: (ROWS, H) rows of the residual
    pre_weight_ptr=None,  # with PRE_NORM: (H,) the LayerNorm's weight
    pre_bias_ptr=None,  # with PRE_NORM: (H,) its bias
    pre_mean=None,  # with PRE_NORM: (ROWS,) pre_norm_rows'
    pre_rstd=None,  # with PRE_NORM: (ROWS,) likewise
    ACC_DTYPE: tl.constexpr = tl.float32,
    PRE_NORM: tl.constexpr = False,
):
    """The adapter's input on these columns, in the activation dtype, zero outside the matrix: x itself, or with
    PRE_NORM the LayerNorm of residual + x."""
    offsets = row_offsets[:, None] + columns[None, :]
    x = tl.load(x_block + offsets, mask=tile_mask, other=0.0)
    if PRE_NORM:
        total = _rounded_sum(x, residual_block, offsets, tile_mask, ACC_DTYPE)
        weight = tl.load(pre_weight_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
        bias = tl.load(pre_bias_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
        normalised = (total - pre_mean[:, None]) * pre_rstd[:, None] * weight[None, :] + bias[None, :]
        x = tl.where(tile_mask, cast_output(normalised, x_block.dtype.element_ty), 0.0)
    return x
