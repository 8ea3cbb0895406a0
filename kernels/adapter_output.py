"""The last steps of the bottleneck adapter's forward, shared by its two kernels (adapter_bottleneck.py's
tensor-core ``_forward_kernel`` and adapter_bottleneck_rows.py's ``_forward_rows_kernel``): the LayerNorm applied
to a chunk of z and stored, and the values saved for the backward. One copy, so that both kernels round and
store alike and the backward can take either kernel's saved values."""

import triton
import triton.language as tl
from fastmini.kernels.interpreter import cast_output


@triton.jit
def store_normalised_chunk(
    y_block,  # (ROWS, H) rows of y from the program's first row on
    z,  # (ROWS, BLOCK_K) ACC_DTYPE: x + Up(GELU(Down(x))) on these columns
    mean,  # (ROWS,) ACC_DTYPE
    rstd,  # (ROWS,) ACC_DTYPE
    norm_weight_ptr,  # (H,)
    norm_bias_ptr,  # (H,)
    row_offsets,  # (ROWS,) int32: local row * H
    row_mask,  # (ROWS,)
    columns,  # (BLOCK_K,)
    column_mask,  # (BLOCK_K,)
    ACC_DTYPE: tl.constexpr,
):
    """y = (z - mean) rstd w + b on these columns, rounded to y's dtype and stored."""
    norm_weight = tl.load(norm_weight_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    norm_bias = tl.load(norm_bias_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    y = (z - mean[:, None]) * rstd[:, None] * norm_weight[None, :] + norm_bias[None, :]
    tl.store(
        y_block + row_offsets[:, None] + columns[None, :],
        cast_output(y, y_block.dtype.element_ty),
        mask=row_mask[:, None] & column_mask[None, :],
    )


@triton.jit
def store_saved_values(
    mean_ptr,  # (M,) ACC_DTYPE
    rstd_ptr,  # (M,) ACC_DTYPE
    h_ptr,  # (M, R) ACC_DTYPE
    first_row,  # the program's first row
    rows,  # (ROWS,) local row indices
    row_mask,  # (ROWS,)
    mean,  # (ROWS,)
    rstd,  # (ROWS,)
    h,  # (ROWS, BLOCK_R): Down(x) + b_d, zero in the padded bottleneck columns
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """What the backward reads instead of recomputing: the LayerNorm's mean and rstd and the bottleneck's h."""
    bottleneck = tl.arange(0, BLOCK_R)
    tl.store(mean_ptr + first_row + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + first_row + rows, rstd, mask=row_mask)
    tl.store(
        h_ptr + first_row.to(tl.int64) * R + rows[:, None] * R + bottleneck[None, :],
        h,
        mask=row_mask[:, None] & (bottleneck[None, :] < R),
    )
