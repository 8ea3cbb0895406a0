"""The bottleneck adapter's forward a few rows a program on the CUDA cores: for inputs too small to keep many SMs
busy with tl.dot's 16-row tiles. Same math, roundings and outputs as ``_forward_kernel`` in adapter_bottleneck.py
(y, and mean, rstd and h for the backward when asked; up to the order of fp32 sums), which documents the formulas.

Why a second forward: at 128 rows (the (1, 128) latency target) ``_forward_kernel`` runs 8 programs of 16 rows on
an H200's 132 SMs, and took ~10 us a call at every tiling tried (session 15): the graphed (1, 128) forward's 12
adapter calls were 0.115 ms of its 0.349 ms of kernel time. The adapter's arithmetic is small (4HR = 147 KFLOP a
row at H=768, R=48), so this kernel leaves the tensor cores out and spreads the rows instead: ROWS rows a program
(2 by default: 64 programs at 128 rows), every product in fp32 on the CUDA cores, of operands rounded as the
tensor-core kernel rounds its dot operands (bf16 weights and GELU(h) for a bf16 x).

Shape of the work, per program (three sweeps over the row in BLOCK_K-column chunks, as ``_forward_kernel``):
(1) h = x W_d^T: the products are summed elementwise into a (ROWS, BLOCK_R, BLOCK_K) tile across the sweep and
reduced over the chunk width once at the end, not once a chunk (a cross-thread reduction each time); (2) z = x +
GELU(h) W_u^T + b_u chunk by chunk, reduced over R within the chunk, its statistics merged (chunked_statistics.py);
(3) z again, normalised and written. Each program reads W_d once and W_u twice from L2 (216 KB in bf16): 14 MB
at 128 rows, against 1.7 MB for the 8 programs of the tensor-core kernel, the price of 8x the programs.

Unverified on a GPU: the op takes it only up to ``ROWS_KERNEL_UP_TO`` rows (adapter_bottleneck.py), 0 until a
GPU sweep (FORWARD_TILE_CANDIDATES' "rows kernel" entries) shows where it pays off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmini.kernels.adapter_output import store_normalised_chunk, store_saved_values
from fastmini.kernels.adapter_pre_norm import adapter_input_chunk, pre_norm_rows
from fastmini.kernels.chunked_statistics import merge_chunk_statistics
from fastmini.kernels.gelu import gelu
from fastmini.kernels.interpreter import dot_operand
from fastmini.kernels.launching import on_device

# By the widest element of the activation and the weights. Compiled for sm_90 (make kernel-resources) the bf16
# default keeps its (2, 64, 128) product tile in 64 fp32 registers a thread on 8 warps.
ROWS_TILES = {
    2: {"ROWS": 2, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2},
    4: {"ROWS": 2, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
}


@triton.jit
def _product_operand(tile, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``tile`` rounded as the tensor-core kernel rounds its dot operands (to DOT_DTYPE: bf16 g and weights for a
    bf16 x), then in ACC_DTYPE for the CUDA cores' products: both kernels then compute the same h, z and
    statistics up to the order of fp32 sums, and the backward (which rounds alike) sees the z they normalised."""
    return dot_operand(tile, DOT_DTYPE).to(ACC_DTYPE)


@triton.jit
def _residual_rows_chunk(
    x_block,  # (ROWS, H) rows of x from the program's first row on
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    row_offsets,  # (ROWS,) int32: local row * H
    row_mask,  # (ROWS,)
    g,  # (ROWS, BLOCK_R) GELU(h) rounded by _product_operand, zero in the padding
    start,  # first column of the chunk
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    residual_block,  # with PRE_NORM: x is LayerNorm(residual + x) (kernels/adapter_pre_norm.py)
    pre_weight_ptr,
    pre_bias_ptr,
    pre_mean,
    pre_rstd,
    PRE_NORM: tl.constexpr,
):
    """z = x + g W_u^T + b_u on columns [start, start + BLOCK_K), zero outside the (M, H) matrix."""
    columns = start + tl.arange(0, BLOCK_K)
    column_mask = columns < H
    bottleneck = tl.arange(0, BLOCK_R)
    tile_mask = row_mask[:, None] & column_mask[None, :]
    x = adapter_input_chunk(
        x_block, row_offsets, columns, column_mask, tile_mask, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean,
        pre_rstd, ACC_DTYPE, PRE_NORM,
    ).to(ACC_DTYPE)  # fmt: skip
    up_weight = tl.load(  # (BLOCK_K, BLOCK_R) = W_u[columns, :], R contiguous
        up_weight_ptr + columns[:, None] * R + bottleneck[None, :],
        mask=column_mask[:, None] & (bottleneck[None, :] < R),
        other=0.0,
    )
    up_weight = _product_operand(up_weight, DOT_DTYPE, ACC_DTYPE)
    up_bias = tl.load(up_bias_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    up = tl.sum(g[:, None, :] * up_weight[None, :, :], axis=2)
    return tl.where(tile_mask, x + up + up_bias[None, :], 0.0), columns, column_mask


@triton.jit
def _forward_rows_kernel(
    x_ptr,  # (M, H) activation dtype
    down_weight_ptr,  # (R, H)
    down_bias_ptr,  # (R,)
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    norm_weight_ptr,  # (H,)
    norm_bias_ptr,  # (H,)
    y_ptr,  # (M, H) activation dtype
    mean_ptr,  # (M,) ACC_DTYPE, written when SAVE_FOR_BACKWARD
    rstd_ptr,  # (M,) ACC_DTYPE, written when SAVE_FOR_BACKWARD
    h_ptr,  # (M, R) ACC_DTYPE, written when SAVE_FOR_BACKWARD
    M,
    eps,
    H: tl.constexpr,
    R: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
    residual_ptr=None,  # with PRE_NORM: (M, H); the adapter's input is LayerNorm(residual + x), never written
    pre_weight_ptr=None,  # with PRE_NORM: (H,) that LayerNorm's weight
    pre_bias_ptr=None,  # with PRE_NORM: (H,) its bias
    pre_eps=0.0,  # with PRE_NORM: its eps
    PRE_NORM: tl.constexpr = False,  # inference only (the host refuses SAVE_FOR_BACKWARD with it)
):
    first_row = tl.program_id(0) * ROWS
    rows = tl.arange(0, ROWS)
    row_mask = rows < M - first_row
    row_offsets = rows * H
    x_block = x_ptr + first_row.to(tl.int64) * H
    y_block = y_ptr + first_row.to(tl.int64) * H
    bottleneck = tl.arange(0, BLOCK_R)
    bottleneck_mask = bottleneck < R
    residual_block, pre_mean, pre_rstd = pre_norm_rows(
        x_block, residual_ptr, first_row, row_offsets, row_mask, pre_eps, H, ROWS, BLOCK_K, ACC_DTYPE, PRE_NORM
    )

    products = tl.zeros((ROWS, BLOCK_R, BLOCK_K), dtype=ACC_DTYPE)
    for start in range(0, H, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        column_mask = columns < H
        x = adapter_input_chunk(
            x_block, row_offsets, columns, column_mask, row_mask[:, None] & column_mask[None, :], residual_block,
            pre_weight_ptr, pre_bias_ptr, pre_mean, pre_rstd, ACC_DTYPE, PRE_NORM,
        ).to(ACC_DTYPE)  # fmt: skip
        down_weight = tl.load(  # (BLOCK_R, BLOCK_K) = W_d[:, columns], H contiguous
            down_weight_ptr + bottleneck[:, None] * H + columns[None, :],
            mask=bottleneck_mask[:, None] & column_mask[None, :],
            other=0.0,
        )
        down_weight = _product_operand(down_weight, DOT_DTYPE, ACC_DTYPE)
        products += x[:, None, :] * down_weight[None, :, :]
    down_bias = tl.load(down_bias_ptr + bottleneck, mask=bottleneck_mask, other=0.0).to(ACC_DTYPE)
    h = tl.sum(products, axis=2) + down_bias[None, :]  # zero in the padded bottleneck columns, and so is g
    g = _product_operand(gelu(h, False), DOT_DTYPE, ACC_DTYPE)

    mean = tl.zeros((ROWS,), dtype=ACC_DTYPE)
    centred_squares = tl.zeros((ROWS,), dtype=ACC_DTYPE)
    for start in range(0, H, BLOCK_K):
        z, columns, column_mask = _residual_rows_chunk(
            x_block, up_weight_ptr, up_bias_ptr, row_offsets, row_mask, g, start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE,
            ACC_DTYPE, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean, pre_rstd, PRE_NORM,
        )  # fmt: skip
        mean, centred_squares = merge_chunk_statistics(
            mean, centred_squares, z, column_mask, start, H, BLOCK_K, ACC_DTYPE
        )
    rstd = 1.0 / tl.sqrt(centred_squares / H + eps)

    for start in range(0, H, BLOCK_K):
        z, columns, column_mask = _residual_rows_chunk(
            x_block, up_weight_ptr, up_bias_ptr, row_offsets, row_mask, g, start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE,
            ACC_DTYPE, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean, pre_rstd, PRE_NORM,
        )  # fmt: skip
        store_normalised_chunk(
            y_block, z, mean, rstd, norm_weight_ptr, norm_bias_ptr, row_offsets, row_mask, columns, column_mask,
            ACC_DTYPE,
        )  # fmt: skip

    if SAVE_FOR_BACKWARD:
        store_saved_values(mean_ptr, rstd_ptr, h_ptr, first_row, rows, row_mask, mean, rstd, h, R, BLOCK_R)


def launch_forward_rows(
    x_rows: torch.Tensor,
    parameters: tuple[torch.Tensor, ...],
    outputs: tuple[torch.Tensor, ...],
    eps: float,
    save_for_backward: bool,
    dot_dtype: tl.dtype,
    acc_dtype: tl.dtype,
    tiles: dict | None = None,
    pre_norm: dict | None = None,
) -> None:
    """Runs the kernel over ``x_rows`` (M, H), contiguous: ``parameters`` are (down_weight, down_bias, up_weight,
    up_bias, norm_weight, norm_bias), contiguous; ``outputs`` (y, mean, rstd, h) as adapter_bottleneck_forward
    makes them; ``dot_dtype`` and ``acc_dtype`` the tensor-core kernel's DOT_DTYPE and ACC_DTYPE. ``tiles`` override
    ROWS_TILES[widest element size]. ``pre_norm``: the kernel's PRE_NORM arguments (residual_ptr, pre_weight_ptr,
    pre_bias_ptr, pre_eps, PRE_NORM=True), or None."""
    rows, hidden = x_rows.shape
    bottleneck = parameters[0].shape[0]
    size = min(max(tensor.element_size() for tensor in (x_rows, *parameters)), 4)
    launch = {**ROWS_TILES[size], **(tiles or {})}
    launch["BLOCK_K"] = min(launch["BLOCK_K"], triton.next_power_of_2(hidden))
    with on_device(x_rows):
        _forward_rows_kernel[(triton.cdiv(rows, launch["ROWS"]),)](
            x_rows, *parameters, *outputs, rows, eps, H=hidden, R=bottleneck,
            BLOCK_R=triton.next_power_of_2(bottleneck), DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
            SAVE_FOR_BACKWARD=save_for_backward, **launch, **(pre_norm or {}),
        )  # fmt: skip
