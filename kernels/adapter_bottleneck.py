"""Triton kernels of the bottleneck adapter, ``y = LayerNorm(x + Up(GELU(Down(x))))`` over the last dimension.

Shapes: x (M, H), rows M = all leading dimensions flattened; Down: W_d (R, H), b_d (R,); Up: W_u (H, R),
b_u (H,); LayerNorm weight w (H,), bias b (H,); R = H / reduction is small (9, 19, 48, 78 in the configs).

Forward, per row:
    h    = x W_d^T + b_d                                   (R values)
    g    = GELU(h) = h (1 + erf(h / sqrt 2)) / 2
    z    = x + g W_u^T + b_u
    mean = sum_H(z) / H,   rstd = 1 / sqrt(sum_H((z - mean)^2) / H + eps)
    xhat = (z - mean) rstd
    y    = xhat w + b

Backward, given dy (sums over rows are the parameter gradients, means over H are per row):
    dw   = sum_rows(dy xhat)                  db   = sum_rows(dy)
    wdy  = dy w
    dz   = rstd (wdy - xhat mean_H(wdy xhat) - mean_H(wdy))           (LayerNorm backward)
    db_u = sum_rows(dz)                       dW_u = dz^T g           (H, R)
    dg   = dz W_u                                                     (R values per row)
    dh   = dg GELU'(h),    GELU'(h) = (1 + erf(h / sqrt 2)) / 2 + h exp(-h^2 / 2) / sqrt(2 pi)
    db_d = sum_rows(dh)                       dW_d = dh^T x           (R, H)
    dx   = dz + dh W_d

Design (why it is shaped this way):
- Forward: one kernel, one program per BLOCK_M rows. The row is walked in BLOCK_K-column chunks three
  times: (1) h accumulated with tl.dot, (2) z recomputed for the LayerNorm statistics, merged chunk by
  chunk with Chan's parallel formula (two-pass accuracy without holding z), (3) z recomputed once more,
  normalised and written. Only the first sweep reads x from DRAM; the tile (BLOCK_M x H, ~100 KB in bf16)
  is still in L2 for the other two. z is recomputed rather than held because a (BLOCK_M, H) fp32 tile
  next to the (H, R) weight tiles does not fit in registers at H=768, and Triton cannot index a register
  tile by chunk; the extra g W_u^T is 2R FLOPs per element, nothing next to the memory traffic.
  h and g (BLOCK_M x R) stay in registers: the bottleneck never goes to memory, except the copy below.
- Few rows: kernels/adapter_bottleneck_rows.py is a second forward, a few rows a program on the CUDA cores, for
  inputs that give this one only a handful of programs (ROWS_KERNEL_UP_TO; the same outputs and saved values up
  to the order of fp32 sums).
- Saved for backward (only when autograd needs it): mean and rstd (M,) and h (M, R), in fp32. h costs
  R/(2H) of the forward's traffic in bf16 (3% at r=16) and spares the backward the down projection;
  the column kernel below never sees whole rows, so it could not recompute h at all.
- Backward: two kernels. The row kernel needs whole rows (the two LayerNorm means, dg = dz W_u is a
  reduction over H): it reads x and dy (two sweeps, the second from L2) and writes the per-row values
  dh and g = GELU(h) (M, R) and the two means (M,). The column kernel runs on a grid (column tiles of
  BLOCK_N, SPLITS row groups): each program holds its slice of W_u and W_d and its fp32 partial dW_u,
  dW_d, db_u, dw, db on chip across many row blocks, recomputes z, xhat and dz from x, dy and the per-row
  values, writes dx, and at the end stores its partials. The host sums the SPLITS partials in fp32 and
  casts each gradient to its parameter's dtype. DRAM traffic in units of one (M, H) activation: forward
  2 (x in, y out); backward 2 (row kernel: x, dy) + 3 (column kernel: x, dy in, dx out); the per-row
  values add R/H-sized traffic. The minimum a backward can do is 3; the row kernel's second read of x
  and dy is the price of the row reductions (a single kernel would need the (H, R) weight-gradient
  partials of every program, as large as x itself at 16K rows).
- A second backward design ("gemm", BACKWARD_PATHS): one row kernel does the row kernel's work, writes dz
  and dx (a third sweep, from L2) and per-block column sums, and the two weight gradients are GEMMs over
  the materialised dz and dh: 4 passes in the kernel + 2 in the GEMMs, against the column kernel's
  register pressure (see BACKWARD_PATHS). On an H200 it was the slower (see BACKWARD_PATH). A third ("split-k")
  keeps its row kernel and computes both weight gradients in one split-K kernel over column tiles x row splits,
  where a GEMM reducing all M rows into an H x R output has only a handful of output tiles to spread.
- tl.dot operands are in the activation's dtype when it is 16-bit (tensor cores, as torch's own bf16
  linear layers; weights are cast to it, as autocast does), otherwise in the accumulator dtype: fp32, or
  fp64 for gradcheck. fp32 dots on a GPU use input_precision="tf32x3" (each operand split into two TF32
  halves, three tensor-core products: fp32-level error, as torch's default fp32 matmul without TF32);
  "ieee" would run them on the FMA units, whose layouts spill registers at these tile sizes (checked with
  ptxas for sm_90). Elementwise math and all accumulations are fp32 (fp64 for fp64 inputs).
- tl.dot needs every dimension >= 16 and tl.arange powers of two: R is padded to BLOCK_R >= 16 and H
  walked in power-of-two chunks, all with masks, so any H and R work (H=36, 312, 768; R=9, 19, 48, 78).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from fastmini.kernels.adapter_bottleneck_rows import launch_forward_rows
from fastmini.kernels.adapter_output import store_normalised_chunk, store_saved_values
from fastmini.kernels.adapter_pre_norm import adapter_input_chunk, pre_norm_rows
from fastmini.kernels.chunked_statistics import merge_chunk_statistics
from fastmini.kernels.gelu import gelu, gelu_derivative
from fastmini.kernels.interpreter import cast_output, dot_operand
from fastmini.kernels.launching import accumulator_dtypes, on_device, streaming_multiprocessors


@triton.jit
def _residual_chunk(
    x_block,  # (BLOCK_M, H) rows of x from the block's first row on
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    row_offsets,  # (BLOCK_M,) int32: local row * H
    row_mask,  # (BLOCK_M,)
    g,  # (BLOCK_M, BLOCK_R) GELU(h) as a dot operand, zero in the padding
    start,  # first column of the chunk
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    residual_block=None,  # with PRE_NORM: x is LayerNorm(residual + x) (kernels/adapter_pre_norm.py)
    pre_weight_ptr=None,
    pre_bias_ptr=None,
    pre_mean=None,
    pre_rstd=None,
    PRE_NORM: tl.constexpr = False,
):
    """z = x + g W_u^T + b_u on columns [start, start + BLOCK_K), zero outside the (M, H) matrix."""
    columns = start + tl.arange(0, BLOCK_K)
    column_mask = columns < H
    bottleneck = tl.arange(0, BLOCK_R)
    tile_mask = row_mask[:, None] & column_mask[None, :]
    x = adapter_input_chunk(
        x_block, row_offsets, columns, column_mask, tile_mask, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean,
        pre_rstd, ACC_DTYPE, PRE_NORM,
    )  # fmt: skip
    up_weight_t = tl.load(  # (BLOCK_R, BLOCK_K) = W_u[columns, :]^T
        up_weight_ptr + columns[None, :] * R + bottleneck[:, None],
        mask=(bottleneck[:, None] < R) & column_mask[None, :],
        other=0.0,
    )
    up_bias = tl.load(up_bias_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    up = tl.dot(g, dot_operand(up_weight_t, DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    z = x.to(ACC_DTYPE) + up + up_bias[None, :]
    return tl.where(tile_mask, z, 0.0), columns, column_mask


@triton.jit
def _normalized_chunk(
    x_block,  # (BLOCK_M, H) rows of x from the block's first row on
    dy_block,  # (BLOCK_M, H) rows of dy, likewise
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    norm_weight_ptr,  # (H,)
    row_offsets,  # (BLOCK_M,) int32: local row * H
    row_mask,  # (BLOCK_M,)
    g,  # (BLOCK_M, BLOCK_R) GELU(h) as a dot operand
    mean,  # (BLOCK_M,) ACC_DTYPE
    rstd,  # (BLOCK_M,) ACC_DTYPE
    start,  # first column of the chunk
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The backward row kernels' view of columns [start, start + BLOCK_K): (xhat, dy, wdy = dy w, columns, column
    mask, tile mask), zero outside the (M, H) matrix; each of their sweeps walks the row through it."""
    z, columns, column_mask = _residual_chunk(
        x_block, up_weight_ptr, up_bias_ptr, row_offsets, row_mask, g, start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE,
        ACC_DTYPE, INPUT_PRECISION,
    )  # fmt: skip
    tile_mask = row_mask[:, None] & column_mask[None, :]
    dy = tl.load(dy_block + row_offsets[:, None] + columns[None, :], mask=tile_mask, other=0.0).to(ACC_DTYPE)
    norm_weight = tl.load(norm_weight_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    xhat = (z - mean[:, None]) * rstd[:, None]
    return xhat, dy, dy * norm_weight[None, :], columns, column_mask, tile_mask


@triton.jit
def _layer_norm_backward_means(
    x_block,  # (BLOCK_M, H) rows of x from the block's first row on
    dy_block,  # (BLOCK_M, H) rows of dy, likewise
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    norm_weight_ptr,  # (H,)
    row_offsets,  # (BLOCK_M,) int32: local row * H
    row_mask,  # (BLOCK_M,)
    g,  # (BLOCK_M, BLOCK_R) GELU(h) as a dot operand
    mean,  # (BLOCK_M,) ACC_DTYPE
    rstd,  # (BLOCK_M,) ACC_DTYPE
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The LayerNorm backward's two row means, mean_H(wdy xhat) and mean_H(wdy): the first sweep of both
    backward row kernels (x and dy from DRAM)."""
    sum_wdy_xhat = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    sum_wdy = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for start in range(0, H, BLOCK_K):
        xhat, _dy, wdy, _columns, _column_mask, _tile_mask = _normalized_chunk(
            x_block, dy_block, up_weight_ptr, up_bias_ptr, norm_weight_ptr, row_offsets, row_mask, g, mean, rstd,
            start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
        )  # fmt: skip
        # wdy is zero outside the matrix, so the products below are too
        sum_wdy_xhat += tl.sum(wdy * xhat, axis=1)
        sum_wdy += tl.sum(wdy, axis=1)
    return sum_wdy_xhat / H, sum_wdy / H


@triton.jit
def _bottleneck(
    x_block,  # (BLOCK_M, H) rows of x from the block's first row on
    down_weight_ptr,  # (R, H)
    down_bias_ptr,  # (R,)
    row_offsets,  # (BLOCK_M,) int32: local row * H
    row_mask,  # (BLOCK_M,)
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    residual_block=None,  # with PRE_NORM: x is LayerNorm(residual + x) (kernels/adapter_pre_norm.py)
    pre_weight_ptr=None,
    pre_bias_ptr=None,
    pre_mean=None,
    pre_rstd=None,
    PRE_NORM: tl.constexpr = False,
):
    """h = x W_d^T + b_d for BLOCK_M rows, (BLOCK_M, BLOCK_R), zero in the padded bottleneck columns."""
    bottleneck = tl.arange(0, BLOCK_R)
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for start in range(0, H, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        column_mask = columns < H
        x = adapter_input_chunk(
            x_block, row_offsets, columns, column_mask, row_mask[:, None] & column_mask[None, :], residual_block,
            pre_weight_ptr, pre_bias_ptr, pre_mean, pre_rstd, ACC_DTYPE, PRE_NORM,
        )  # fmt: skip
        down_weight_t = tl.load(  # (BLOCK_K, BLOCK_R) = W_d[:, columns]^T
            down_weight_ptr + bottleneck[None, :] * H + columns[:, None],
            mask=column_mask[:, None] & (bottleneck[None, :] < R),
            other=0.0,
        )
        h = tl.dot(
            dot_operand(x, DOT_DTYPE),
            dot_operand(down_weight_t, DOT_DTYPE),
            h,
            input_precision=INPUT_PRECISION,
            out_dtype=ACC_DTYPE,
        )
    down_bias = tl.load(down_bias_ptr + bottleneck, mask=bottleneck < R, other=0.0).to(ACC_DTYPE)
    return h + down_bias[None, :]


@triton.jit
def _forward_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
    STASH_Z: tl.constexpr = False,
    residual_ptr=None,  # with PRE_NORM: (M, H); the adapter's input is LayerNorm(residual + x), never written
    pre_weight_ptr=None,  # with PRE_NORM: (H,) that LayerNorm's weight
    pre_bias_ptr=None,  # with PRE_NORM: (H,) its bias
    pre_eps=0.0,  # with PRE_NORM: its eps
    PRE_NORM: tl.constexpr = False,  # inference only (the host refuses SAVE_FOR_BACKWARD with it)
):
    # STASH_Z: the statistics sweep writes z, rounded to y's dtype as torch's unfused add rounds it, into y, and
    # the last sweep normalises it in place (one load from L2 a chunk) instead of recomputing it (x and a W_u
    # chunk from L2 and a dot). Statistics and output then come from the rounded z, as torch's LayerNorm sees it.
    # The block's rows are addressed from 64-bit base pointers with 32-bit offsets inside the block: a
    # 64-bit offset per element costs two registers per element in every tile that is kept alive.
    first_row = tl.program_id(0) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M - first_row
    row_offsets = rows * H
    x_block = x_ptr + first_row.to(tl.int64) * H
    residual_block, pre_mean, pre_rstd = pre_norm_rows(
        x_block, residual_ptr, first_row, row_offsets, row_mask, pre_eps, H, BLOCK_M, BLOCK_K, ACC_DTYPE, PRE_NORM
    )

    h = _bottleneck(
        x_block, down_weight_ptr, down_bias_ptr, row_offsets, row_mask, H, R, BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE,
        ACC_DTYPE, INPUT_PRECISION, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean, pre_rstd, PRE_NORM,
    )  # fmt: skip
    g = dot_operand(gelu(h, False), DOT_DTYPE)

    # LayerNorm statistics, merged chunk by chunk (kernels/chunked_statistics.py).
    mean = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    centred_squares = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    y_block = y_ptr + first_row.to(tl.int64) * H
    for start in range(0, H, BLOCK_K):
        z, columns, column_mask = _residual_chunk(
            x_block, up_weight_ptr, up_bias_ptr, row_offsets, row_mask, g, start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE,
            ACC_DTYPE, INPUT_PRECISION, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean, pre_rstd, PRE_NORM,
        )  # fmt: skip
        if STASH_Z:
            tile_mask = row_mask[:, None] & column_mask[None, :]
            stashed = cast_output(z, y_ptr.dtype.element_ty)
            tl.store(y_block + row_offsets[:, None] + columns[None, :], stashed, mask=tile_mask)
            z = tl.where(tile_mask, stashed.to(ACC_DTYPE), 0.0)
        mean, centred_squares = merge_chunk_statistics(
            mean, centred_squares, z, column_mask, start, H, BLOCK_K, ACC_DTYPE
        )
    rstd = 1.0 / tl.sqrt(centred_squares / H + eps)

    for start in range(0, H, BLOCK_K):
        if STASH_Z:
            columns = start + tl.arange(0, BLOCK_K)
            column_mask = columns < H
            z = tl.load(
                y_block + row_offsets[:, None] + columns[None, :],
                mask=row_mask[:, None] & column_mask[None, :],
                other=0.0,
            ).to(ACC_DTYPE)
        else:
            z, columns, column_mask = _residual_chunk(
                x_block, up_weight_ptr, up_bias_ptr, row_offsets, row_mask, g, start, H, R, BLOCK_K, BLOCK_R,
                DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION, residual_block, pre_weight_ptr, pre_bias_ptr, pre_mean,
                pre_rstd, PRE_NORM,
            )  # fmt: skip
        store_normalised_chunk(
            y_block, z, mean, rstd, norm_weight_ptr, norm_bias_ptr, row_offsets, row_mask, columns, column_mask,
            ACC_DTYPE,
        )  # fmt: skip

    if SAVE_FOR_BACKWARD:
        store_saved_values(mean_ptr, rstd_ptr, h_ptr, first_row, rows, row_mask, mean, rstd, h, R, BLOCK_R)


@triton.jit
def _backward_rows_kernel(
    dy_ptr,  # (M, H) activation dtype
    x_ptr,  # (M, H) activation dtype
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    norm_weight_ptr,  # (H,)
    h_ptr,  # (M, R) ACC_DTYPE, saved by the forward
    mean_ptr,  # (M,) ACC_DTYPE, saved by the forward
    rstd_ptr,  # (M,) ACC_DTYPE, saved by the forward
    dh_ptr,  # (M, R) ACC_DTYPE, out: gradient of h
    g_ptr,  # (M, R) the dot operand dtype, out: GELU(h), for the column kernel
    mean_wdy_xhat_ptr,  # (M,) ACC_DTYPE, out: mean_H(wdy xhat)
    mean_wdy_ptr,  # (M,) ACC_DTYPE, out: mean_H(wdy)
    M,
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The per-row half of the backward: the LayerNorm means, dh = (dz W_u) GELU'(h), and GELU(h) once more
    (R values a row) so that the column kernel's loop runs no erf: it held ~65 of its registers."""
    first_row = tl.program_id(0) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M - first_row
    row_offsets = rows * H
    x_block = x_ptr + first_row.to(tl.int64) * H
    dy_block = dy_ptr + first_row.to(tl.int64) * H
    bottleneck = tl.arange(0, BLOCK_R)
    bottleneck_mask = row_mask[:, None] & (bottleneck[None, :] < R)
    bottleneck_offsets = first_row.to(tl.int64) * R + rows[:, None] * R + bottleneck[None, :]
    h = tl.load(h_ptr + bottleneck_offsets, mask=bottleneck_mask, other=0.0)
    g = dot_operand(gelu(h, False), DOT_DTYPE)
    mean = tl.load(mean_ptr + first_row + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + first_row + rows, mask=row_mask, other=0.0)

    mean_wdy_xhat, mean_wdy = _layer_norm_backward_means(
        x_block, dy_block, up_weight_ptr, up_bias_ptr, norm_weight_ptr, row_offsets, row_mask, g, mean, rstd, H, R,
        BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
    )  # fmt: skip

    # Second sweep (x and dy now come from L2): dz exactly as the LayerNorm backward defines it, then
    # dg = dz W_u. Expanding dg into per-row sums would save the sweep but cancel badly in bf16 dots.
    dg = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for start in range(0, H, BLOCK_K):
        xhat, _dy, wdy, columns, column_mask, tile_mask = _normalized_chunk(
            x_block, dy_block, up_weight_ptr, up_bias_ptr, norm_weight_ptr, row_offsets, row_mask, g, mean, rstd,
            start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
        )  # fmt: skip
        dz = rstd[:, None] * (wdy - xhat * mean_wdy_xhat[:, None] - mean_wdy[:, None])
        dz = tl.where(tile_mask, dz, 0.0)
        up_weight = tl.load(  # (BLOCK_K, BLOCK_R) = W_u[columns, :]
            up_weight_ptr + columns[:, None] * R + bottleneck[None, :],
            mask=column_mask[:, None] & (bottleneck[None, :] < R),
            other=0.0,
        )
        dg = tl.dot(
            dot_operand(dz, DOT_DTYPE),
            dot_operand(up_weight, DOT_DTYPE),
            dg,
            input_precision=INPUT_PRECISION,
            out_dtype=ACC_DTYPE,
        )

    dh = dg * gelu_derivative(h, False)
    tl.store(dh_ptr + bottleneck_offsets, dh, mask=bottleneck_mask)
    tl.store(g_ptr + bottleneck_offsets, g, mask=bottleneck_mask)
    tl.store(mean_wdy_xhat_ptr + first_row + rows, mean_wdy_xhat, mask=row_mask)
    tl.store(mean_wdy_ptr + first_row + rows, mean_wdy, mask=row_mask)


@triton.jit
def _backward_gemm_rows_kernel(
    dy_ptr,  # (M, H) activation dtype
    x_ptr,  # (M, H) activation dtype
    down_weight_ptr,  # (R, H)
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    norm_weight_ptr,  # (H,)
    h_ptr,  # (M, R) ACC_DTYPE, saved by the forward
    mean_ptr,  # (M,) ACC_DTYPE, saved by the forward
    rstd_ptr,  # (M,) ACC_DTYPE, saved by the forward
    dz_ptr,  # (M, H) the dot operand dtype, out: gradient of z, for the dW_u GEMM
    dx_ptr,  # (M, H) activation dtype, out
    dh_ptr,  # (M, R) the dot operand dtype, out: gradient of h, for the dW_d GEMM
    g_ptr,  # (M, R) the dot operand dtype, out: GELU(h), for the dW_u GEMM
    column_partial_ptr,  # (3, BLOCKS, H) ACC_DTYPE, out: this block's sums over rows of dy xhat, dy and dz
    down_bias_partial_ptr,  # (BLOCKS, R) ACC_DTYPE, out: this block's sum over rows of dh
    M,
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The whole backward but the two weight gradients, one program per BLOCK_M rows (the "gemm" path): the
    row kernel's two sweeps, the second also writing dz and the block's column sums, then a third writing dx
    (x and dy from L2 again; dz is recomputed in fp32 rather than read back rounded). dW_u = dz^T g and
    dW_d = dh^T x are left to two GEMMs on the host, so no program holds a weight-gradient tile."""
    block = tl.program_id(0)
    first_row = block * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M - first_row
    row_offsets = rows * H
    x_block = x_ptr + first_row.to(tl.int64) * H
    dy_block = dy_ptr + first_row.to(tl.int64) * H
    bottleneck = tl.arange(0, BLOCK_R)
    bottleneck_mask = row_mask[:, None] & (bottleneck[None, :] < R)
    bottleneck_offsets = first_row.to(tl.int64) * R + rows[:, None] * R + bottleneck[None, :]
    h = tl.load(h_ptr + bottleneck_offsets, mask=bottleneck_mask, other=0.0)
    g = dot_operand(gelu(h, False), DOT_DTYPE)
    mean = tl.load(mean_ptr + first_row + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + first_row + rows, mask=row_mask, other=0.0)  # 0 outside: dz vanishes there
    mean_wdy_xhat, mean_wdy = _layer_norm_backward_means(
        x_block, dy_block, up_weight_ptr, up_bias_ptr, norm_weight_ptr, row_offsets, row_mask, g, mean, rstd, H, R,
        BLOCK_M, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
    )  # fmt: skip

    dz_block = dz_ptr + first_row.to(tl.int64) * H
    partial_row = column_partial_ptr + block.to(tl.int64) * H
    partial_stride = tl.cdiv(M, BLOCK_M).to(tl.int64) * H  # between the three sums
    dg = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for start in range(0, H, BLOCK_K):
        xhat, dy, wdy, columns, column_mask, tile_mask = _normalized_chunk(
            x_block, dy_block, up_weight_ptr, up_bias_ptr, norm_weight_ptr, row_offsets, row_mask, g, mean, rstd,
            start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
        )  # fmt: skip
        dz = tl.where(tile_mask, rstd[:, None] * (wdy - xhat * mean_wdy_xhat[:, None] - mean_wdy[:, None]), 0.0)
        dz_dot = dot_operand(dz, DOT_DTYPE)
        tl.store(dz_block + row_offsets[:, None] + columns[None, :], dz_dot, mask=tile_mask)
        tl.store(partial_row + columns, tl.sum(dy * xhat, axis=0), mask=column_mask)
        tl.store(partial_row + partial_stride + columns, tl.sum(dy, axis=0), mask=column_mask)
        tl.store(partial_row + 2 * partial_stride + columns, tl.sum(dz, axis=0), mask=column_mask)
        up_weight = tl.load(  # (BLOCK_K, BLOCK_R) = W_u[columns, :]
            up_weight_ptr + columns[:, None] * R + bottleneck[None, :],
            mask=column_mask[:, None] & (bottleneck[None, :] < R),
            other=0.0,
        )
        dg = tl.dot(dz_dot, dot_operand(up_weight, DOT_DTYPE), dg, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    dh = dg * gelu_derivative(h, False)  # zero in masked rows (dz is) and padded columns (W_u is)
    dh_dot = dot_operand(dh, DOT_DTYPE)
    tl.store(dh_ptr + bottleneck_offsets, dh_dot, mask=bottleneck_mask)
    tl.store(g_ptr + bottleneck_offsets, g, mask=bottleneck_mask)
    tl.store(down_bias_partial_ptr + block * R + bottleneck, tl.sum(dh, axis=0), mask=bottleneck < R)

    dx_block = dx_ptr + first_row.to(tl.int64) * H
    for start in range(0, H, BLOCK_K):
        xhat, _dy, wdy, columns, column_mask, tile_mask = _normalized_chunk(
            x_block, dy_block, up_weight_ptr, up_bias_ptr, norm_weight_ptr, row_offsets, row_mask, g, mean, rstd,
            start, H, R, BLOCK_K, BLOCK_R, DOT_DTYPE, ACC_DTYPE, INPUT_PRECISION,
        )  # fmt: skip
        dz = rstd[:, None] * (wdy - xhat * mean_wdy_xhat[:, None] - mean_wdy[:, None])
        down_weight = tl.load(  # (BLOCK_R, BLOCK_K) = W_d[:, columns]
            down_weight_ptr + bottleneck[:, None] * H + columns[None, :],
            mask=(bottleneck[:, None] < R) & column_mask[None, :],
            other=0.0,
        )
        dx = dz + tl.dot(
            dh_dot, dot_operand(down_weight, DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
        )
        tl.store(
            dx_block + row_offsets[:, None] + columns[None, :], cast_output(dx, dx_ptr.dtype.element_ty), mask=tile_mask
        )


@triton.jit
def _weight_gradients_kernel(
    dz_ptr,  # (M, H) the dot operand dtype: gradient of z (the "gemm" row kernel's)
    g_ptr,  # (M, R) the dot operand dtype: GELU(h)
    dh_ptr,  # (M, R) the dot operand dtype: gradient of h
    x_ptr,  # (M, H) activation dtype
    up_partial_ptr,  # (SPLITS, H, R) ACC_DTYPE, out: this split's rows of dz^T g
    down_partial_ptr,  # (SPLITS, R, H) ACC_DTYPE, out: this split's rows of dh^T x
    M,
    rows_per_split,  # a multiple of BLOCK_M
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dW_u = dz^T g and dW_d = dh^T x as split-K GEMMs (the "split-k" path): program (column tile, split)
    holds its (BLOCK_N, R) and (R, BLOCK_N) tiles of both over the split's rows, BLOCK_M at a time, and stores
    them as partials the host sums in fp32. The products reduce over all M rows into outputs of only H x R, so
    a GEMM that gives each output tile one program has ~H/BLOCK_N programs, each walking every row: split-K
    gives the GPU column tiles x SPLITS of them."""
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    column_mask = columns < H
    bottleneck = tl.arange(0, BLOCK_R)
    bottleneck_mask = bottleneck < R
    first_row = tl.program_id(1) * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, M)
    up_gradient = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE)
    down_gradient = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC_DTYPE)
    for start in range(first_row, end_row, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < end_row
        wide = rows.to(tl.int64)[:, None] * H + columns[None, :]
        wide_mask = row_mask[:, None] & column_mask[None, :]
        narrow = rows.to(tl.int64)[:, None] * R + bottleneck[None, :]
        narrow_mask = row_mask[:, None] & bottleneck_mask[None, :]
        dz = tl.load(dz_ptr + wide, mask=wide_mask, other=0.0)
        x = tl.load(x_ptr + wide, mask=wide_mask, other=0.0)
        g = tl.load(g_ptr + narrow, mask=narrow_mask, other=0.0)
        dh = tl.load(dh_ptr + narrow, mask=narrow_mask, other=0.0)
        up_gradient = tl.dot(
            tl.trans(dot_operand(dz, DOT_DTYPE)), dot_operand(g, DOT_DTYPE), up_gradient,
            input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE,
        )  # fmt: skip
        down_gradient = tl.dot(
            tl.trans(dot_operand(dh, DOT_DTYPE)), dot_operand(x, DOT_DTYPE), down_gradient,
            input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE,
        )  # fmt: skip
    split = tl.program_id(1).to(tl.int64)
    tl.store(
        up_partial_ptr + split * H * R + columns[:, None] * R + bottleneck[None, :],
        up_gradient,
        mask=column_mask[:, None] & bottleneck_mask[None, :],
    )
    tl.store(
        down_partial_ptr + split * R * H + bottleneck[:, None] * H + columns[None, :],
        down_gradient,
        mask=bottleneck_mask[:, None] & column_mask[None, :],
    )


@triton.jit
def _backward_columns_kernel(
    dy_ptr,  # (M, H) activation dtype
    x_ptr,  # (M, H) activation dtype
    down_weight_ptr,  # (R, H)
    up_weight_ptr,  # (H, R)
    up_bias_ptr,  # (H,)
    norm_weight_ptr,  # (H,)
    g_ptr,  # (M, R) the dot operand dtype, from the row kernel
    mean_ptr,  # (M,) ACC_DTYPE
    rstd_ptr,  # (M,) ACC_DTYPE
    dh_ptr,  # (M, R) ACC_DTYPE, from the row kernel
    mean_wdy_xhat_ptr,  # (M,) ACC_DTYPE, from the row kernel
    mean_wdy_ptr,  # (M,) ACC_DTYPE, from the row kernel
    dx_ptr,  # (M, H) activation dtype, out
    down_weight_partial_ptr,  # (SPLITS, R, H) ACC_DTYPE, out
    down_bias_partial_ptr,  # (SPLITS, R) ACC_DTYPE, out (written by the first column tile)
    up_weight_partial_ptr,  # (SPLITS, H, R) ACC_DTYPE, out
    up_bias_partial_ptr,  # (SPLITS, H) ACC_DTYPE, out
    norm_weight_partial_ptr,  # (SPLITS, H) ACC_DTYPE, out
    norm_bias_partial_ptr,  # (SPLITS, H) ACC_DTYPE, out
    M,
    SPLITS,
    H: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dx and the partial parameter gradients of a BLOCK_N column tile over row blocks split, split + SPLITS, ..."""
    column_tile = tl.program_id(0)
    split = tl.program_id(1)
    columns = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    column_mask = columns < H
    bottleneck = tl.arange(0, BLOCK_R)
    weight_mask = (bottleneck[:, None] < R) & column_mask[None, :]  # (BLOCK_R, BLOCK_N)
    # This program's slices of the weights stay on chip for all its row blocks.
    up_weight_t = tl.load(up_weight_ptr + columns[None, :] * R + bottleneck[:, None], mask=weight_mask, other=0.0)
    up_weight_t = dot_operand(up_weight_t, DOT_DTYPE)  # (BLOCK_R, BLOCK_N) = W_u[columns, :]^T
    down_weight = tl.load(down_weight_ptr + bottleneck[:, None] * H + columns[None, :], mask=weight_mask, other=0.0)
    down_weight = dot_operand(down_weight, DOT_DTYPE)  # (BLOCK_R, BLOCK_N) = W_d[:, columns]
    up_bias = tl.load(up_bias_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    norm_weight = tl.load(norm_weight_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)
    # Offsets inside a row block, the same for every block (see _forward_kernel on 32-bit offsets).
    rows = tl.arange(0, BLOCK_M)
    tile_offsets = rows[:, None] * H + columns[None, :]
    bottleneck_offsets = rows[:, None] * R + bottleneck[None, :]

    down_weight_grad = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC_DTYPE)
    up_weight_grad = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE)
    down_bias_grad = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    up_bias_grad = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    norm_weight_grad = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    norm_bias_grad = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for row_block in range(split, tl.cdiv(M, BLOCK_M), SPLITS):
        first_row = row_block * BLOCK_M
        row_mask = rows < M - first_row
        tile_mask = row_mask[:, None] & column_mask[None, :]
        bottleneck_mask = row_mask[:, None] & (bottleneck[None, :] < R)
        tile_start = first_row.to(tl.int64) * H
        bottleneck_start = first_row.to(tl.int64) * R
        g = tl.load(g_ptr + bottleneck_start + bottleneck_offsets, mask=bottleneck_mask, other=0.0)
        g = dot_operand(g, DOT_DTYPE)
        dh = tl.load(dh_ptr + bottleneck_start + bottleneck_offsets, mask=bottleneck_mask, other=0.0)
        dh_dot = dot_operand(dh, DOT_DTYPE)
        mean = tl.load(mean_ptr + first_row + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + first_row + rows, mask=row_mask, other=0.0)  # 0 outside: dz and xhat vanish
        mean_wdy_xhat = tl.load(mean_wdy_xhat_ptr + first_row + rows, mask=row_mask, other=0.0)
        mean_wdy = tl.load(mean_wdy_ptr + first_row + rows, mask=row_mask, other=0.0)
        x = tl.load(x_ptr + tile_start + tile_offsets, mask=tile_mask, other=0.0)
        dy = tl.load(dy_ptr + tile_start + tile_offsets, mask=tile_mask, other=0.0).to(ACC_DTYPE)

        up = tl.dot(g, up_weight_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        xhat = tl.where(tile_mask, (x.to(ACC_DTYPE) + up + up_bias[None, :] - mean[:, None]) * rstd[:, None], 0.0)
        dz = rstd[:, None] * (dy * norm_weight[None, :] - xhat * mean_wdy_xhat[:, None] - mean_wdy[:, None])
        dz = tl.where(tile_mask, dz, 0.0)
        dx = dz + tl.dot(dh_dot, down_weight, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(dx_ptr + tile_start + tile_offsets, cast_output(dx, dx_ptr.dtype.element_ty), mask=tile_mask)

        dz_dot = dot_operand(dz, DOT_DTYPE)
        up_weight_grad = tl.dot(
            tl.trans(dz_dot), g, up_weight_grad, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
        )
        down_weight_grad = tl.dot(
            tl.trans(dh_dot),
            dot_operand(x, DOT_DTYPE),
            down_weight_grad,
            input_precision=INPUT_PRECISION,
            out_dtype=ACC_DTYPE,
        )
        down_bias_grad += tl.sum(dh, axis=0)
        up_bias_grad += tl.sum(dz, axis=0)
        norm_weight_grad += tl.sum(dy * xhat, axis=0)
        norm_bias_grad += tl.sum(dy, axis=0)

    split_offset = split.to(tl.int64) * H
    tl.store(
        down_weight_partial_ptr + split_offset * R + bottleneck[:, None] * H + columns[None, :],
        down_weight_grad,
        mask=weight_mask,
    )
    tl.store(
        up_weight_partial_ptr + split_offset * R + columns[:, None] * R + bottleneck[None, :],
        up_weight_grad,
        mask=column_mask[:, None] & (bottleneck[None, :] < R),
    )
    tl.store(up_bias_partial_ptr + split_offset + columns, up_bias_grad, mask=column_mask)
    tl.store(norm_weight_partial_ptr + split_offset + columns, norm_weight_grad, mask=column_mask)
    tl.store(norm_bias_partial_ptr + split_offset + columns, norm_bias_grad, mask=column_mask)
    # Every column tile sums the same dh; the first one stores it.
    stored_bottleneck = tl.where(column_tile == 0, R, 0)
    tl.store(down_bias_partial_ptr + split * R + bottleneck, down_bias_grad, mask=bottleneck < stored_bottleneck)


# --------------------------------------------------------------------------------------------- host side

# Tile sizes by the widest element of the activation and the weights (fp64 takes the fp32 ones). The first
# defaults were compiled for sm_90 with ptxas (triton 3.9 and 3.6) at H=36, 312, 768 and R=9, 19, 48, 78: no
# register spills in 16-bit, <= 90 KB shared memory (fp32, whose tf32x3 dots hold two halves of every
# operand, spills a little at R=78); those below ran the GPU kernel tests on an H200 (triton 3.6). The
# launchers take overrides, so a GPU sweep needs no edit here (benchmarks/test_adapter_bottleneck.py times
# the *_TILE_CANDIDATES below). Two H200 sweeps (2026-11-26, 16384 x 768 bf16, GPU time) agreed on two
# changes from the first defaults, now taken: forward chunks 128 wide rather than 64 (1.12x, 1.14x; 256
# wide was slower, 0.90x) and the backward column kernel in 16-row steps on 4 warps (1.11x both times).
# Inputs too small to give every SM a 64-row block (1024 rows: 16 blocks on 132 SMs) shrink BLOCK_M to 16
# (_tiles); at that size whole rows in one chunk were the fastest forward (1024 rows: 2.1x the 64-wide
# chunks, 1.55x the 128-wide), and the slowest at 16384 rows (0.67x): FORWARD_FEW_ROWS_TILES. Two later H200
# sweeps (sessions 11 and 13, the same shape) agreed on the 16-bit backward column kernel in 64-row steps
# (1.16x both times), now taken; the 16-row steps it replaces stay a candidate.
FORWARD_TILES = {
    2: {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
}
# At one chunk a row the three sweeps are not three times the work: compiled for sm_90, this forward issues the same
# 128 tensor-core MMAs a thread as a version written to compute z once and keep it (tried in session 16: 72 vector
# loads against 80), so the ~13 us that small inputs take at every tiling is not recomputation.
FORWARD_FEW_ROWS_TILES = {2: {"BLOCK_K": 1024}, 4: {}}  # where BLOCK_M shrank to 16 (only bf16 was timed)
# With the residual + LayerNorm folded in (pre_norm), whole-row chunks need all 255 registers and spill 216 bytes a
# thread (bf16, sm_90, make kernel-resources); chunks at most this wide keep the few-rows blocks spill-free.
PRE_NORM_WIDEST_CHUNK = 256
BACKWARD_ROW_TILES = {
    2: {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
}
BACKWARD_COLUMN_TILES = {
    2: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    4: {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
}
# The "split-k" path's weight-gradient kernel: two (BLOCK_N, R) accumulators and four small tiles a step, no
# recomputation (a plain GEMM loop). Chosen without a GPU, by registers (make kernel-resources, bf16, sm_90):
# 32-row steps on 8 warps need 62 a thread (32 warps an SM), 64-row steps on 4 warps 106 and 96 KB of shared
# memory (8 warps).
WEIGHT_GRADIENT_TILES = {
    2: {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
}
# What a GPU sweep tries besides the defaults: each candidate differs from them in one place (launcher
# overrides), so a results table says which knob matters. Small batches (a few programs per SM) sit on
# a latency floor of ~17 us at every BLOCK_M (H200): the wide-chunk candidates take fewer steps along H.
FORWARD_TILE_CANDIDATES = {
    "default": {},
    "64-wide chunks": {"BLOCK_K": 64},
    "256-wide chunks": {"BLOCK_K": 256},
    "16 rows, 128-wide chunks, 4 warps": {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4},
    "16 rows, whole rows": {"BLOCK_M": 16, "BLOCK_K": 1024},
    "32 rows, 4 warps": {"BLOCK_M": 32, "num_warps": 4},
    "128 rows": {"BLOCK_M": 128},
    "2 stages": {"num_stages": 2},
    "4 stages": {"num_stages": 4},
    # 64 registers a thread (inference, bf16, sm_90: make kernel-resources): 4 blocks, 32 warps an SM, against
    # the default's 126 (2 blocks, 16 warps). Slower all the same on the H200 (session 15, GPU time): 0.70x at
    # 16384 rows, 0.40x and 0.41x at 128 and 1024.
    "32 rows, 64-wide chunks": {"BLOCK_M": 32, "BLOCK_K": 64},
    # The forward reads each weight chunk once a sweep for every BLOCK_M rows: at 64 rows ~40% of what it moves
    # from L2 are weights. 128 rows halve that, but on 8 warps one program an SM was slower (above, 0.885x); on
    # 16 warps each thread holds half as much of a tile.
    "128 rows, 16 warps": {"BLOCK_M": 128, "num_warps": 16},
    # The last sweep normalises z written into y by the statistics sweep (STASH_Z in _forward_kernel): per chunk
    # one tile from L2 instead of x, a W_u chunk and a dot (~14% less read from L2 at 64 rows).
    "stash z in y": {"STASH_Z": True},
    "stash z in y, 128 rows, 16 warps": {"STASH_Z": True, "BLOCK_M": 128, "num_warps": 16},
    # The CUDA-core forward for few rows (kernels/adapter_bottleneck_rows.py, its ROWS_TILES): 2 rows a program by
    # default, 1 (128 programs at 128 rows), 4 in narrower chunks.
    "rows kernel": {"kernel": "rows"},
    "rows kernel, 1 row a program": {"kernel": "rows", "ROWS": 1},
    "rows kernel, 4 rows, 64-wide chunks": {"kernel": "rows", "ROWS": 4, "BLOCK_K": 64},
}
BACKWARD_TILE_CANDIDATES = {
    "default": {},
    "rows: 64 rows": {"row_tiles": {"BLOCK_M": 64}},
    "rows: 32x32, 4 warps": {"row_tiles": {"BLOCK_K": 32, "num_warps": 4}},
    "columns: 16-row steps": {"column_tiles": {"BLOCK_M": 16}},
    "columns: 128-row steps": {"column_tiles": {"BLOCK_M": 128}},
    "columns: 32 wide": {"column_tiles": {"BLOCK_N": 32}},
    "columns: 32-row steps, 8 warps": {"column_tiles": {"BLOCK_M": 32, "num_warps": 8}},
    "columns: 3 stages": {"column_tiles": {"num_stages": 3}},
    "columns: 6 splits": {"splits": 6},
    "columns: 44 splits": {"splits": 44},
    "gemm": {"path": "gemm"},
    "gemm: 16 rows": {"path": "gemm", "row_tiles": {"BLOCK_M": 16}},
    "gemm: 64 rows": {"path": "gemm", "row_tiles": {"BLOCK_M": 64}},
    "gemm: 128-wide chunks": {"path": "gemm", "row_tiles": {"BLOCK_K": 128}},
    "split-k": {"path": "split-k"},
    "split-k: 128-wide column tiles": {"path": "split-k", "weight_tiles": {"BLOCK_N": 128}},
    "split-k: 64-row steps, 4 warps": {"path": "split-k", "weight_tiles": {"BLOCK_M": 64, "num_warps": 4}},
    "split-k: 16-row steps, 4 warps": {"path": "split-k", "weight_tiles": {"BLOCK_M": 16, "num_warps": 4}},
}
# The backward's two designs. "columns": a row kernel for the per-row values, then a column kernel that writes
# dx and holds its slice of every parameter gradient on chip across many row blocks (5 activation passes).
# "gemm": one row kernel writes dx, dz and the per-block column sums, and two GEMMs (cuBLAS on a GPU) give the
# weight gradients (6 passes, but no program holds a weight-gradient tile: compiled for sm_90 the column kernel
# needs all 255 registers and, in its 64-row steps, 456 bytes of spill stack a thread; the gemm row kernel does
# not spill). On the H200 (session 15, 16384 x 768 bf16, GPU time) "gemm" was the slower: its backward 0.72x the
# column path's in the sweep (0.85-0.88x in 64-row steps or 128-wide chunks), the op's forward+backward 416 us
# against 320. So "columns" stays the default. A likely culprit: its two weight-gradient GEMMs reduce over all
# 16384 rows into 768 x 48 outputs, a handful of output tiles, so a GEMM without split-K runs them on a handful of
# SMs. "split-k": the "gemm" row kernel, then one Triton kernel for both weight gradients over column tiles x row
# splits (_weight_gradients_kernel; fp32 partials). Not yet timed on a GPU.
# The forward's two kernels: "tensor cores" (_forward_kernel, tl.dot over blocks of 16 rows or more) and "rows"
# (kernels/adapter_bottleneck_rows.py: a few rows a program on the CUDA cores, for inputs that give the first only a
# few programs). The op takes "rows" up to ROWS_KERNEL_UP_TO rows: 0, never, until a GPU sweep times it (the "rows
# kernel" candidates above, at 128, 1024 and 4608 rows).
FORWARD_KERNELS = ("tensor cores", "rows")
ROWS_KERNEL_UP_TO = 0
BACKWARD_PATHS = ("columns", "gemm", "split-k")
BACKWARD_PATH = "columns"
_ROW_GROUPS_ON_CPU = 2  # SPLITS under the interpreter: small, but > 1 so the partial reduction is exercised

# tl.dot's operand dtype by activation dtype: 16-bit on the tensor cores, else the accumulator's (fp64 for gradcheck)
_DOT_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _precision(activation_dtype: torch.dtype) -> tuple[tl.dtype, tl.dtype, torch.dtype]:
    """(tl.dot operand dtype, accumulator dtype, accumulator dtype in torch) for an activation dtype."""
    return (_DOT_DTYPES[activation_dtype], *accumulator_dtypes(activation_dtype))


def _input_precision(x: torch.Tensor) -> str:
    """tl.dot's input_precision for fp32 operands (see the module docstring); ignored for 16-bit ones."""
    return "tf32x3" if x.is_cuda and x.dtype == torch.float32 else "ieee"


def _tiles(
    table: dict,
    overrides: dict | None,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    rows: int,
    bottleneck: int,
    by_rows: bool,
    few_rows_table: dict | None = None,
) -> dict:
    """The launch's tile sizes: the table's entry for the widest element of x and the weights (under autocast
    a bf16 x meets fp32 weights, whose chunks take twice the shared memory: 1024-wide ones overflow it), then
    overrides; chunks no wider than the padded row. For kernels with one program per row block (``by_rows``)
    and no explicit BLOCK_M, small inputs get fewer rows a program (down to tl.dot's 16) until every SM has
    one; where that reaches 16 rows, ``few_rows_table``'s entry replaces what the overrides leave as default."""
    hidden, device = x.shape[-1], x.device
    size = min(max(tensor.element_size() for tensor in (x, *weights)), 4)
    overrides = overrides or {}
    tiles = {**table[size], **overrides}
    if by_rows and "BLOCK_M" not in overrides and device.type == "cuda":
        while tiles["BLOCK_M"] > 16 and triton.cdiv(rows, tiles["BLOCK_M"]) < streaming_multiprocessors(device):
            tiles["BLOCK_M"] //= 2
        if tiles["BLOCK_M"] == 16 and few_rows_table is not None:
            tiles.update({key: value for key, value in few_rows_table[size].items() if key not in overrides})
    for chunk in ("BLOCK_K", "BLOCK_N"):
        if chunk in tiles:
            tiles[chunk] = max(16, min(tiles[chunk], triton.next_power_of_2(hidden)))
    tiles["BLOCK_R"] = max(16, triton.next_power_of_2(bottleneck))
    return tiles


def _row_groups(device: torch.device, column_tiles: int, row_blocks: int, programs_per_sm: int = 2) -> int:
    """SPLITS of a kernel over column tiles x row groups: about ``programs_per_sm`` programs per SM in all (the
    column kernel: 2); each split adds one set of partials."""
    if device.type != "cuda":
        return max(1, min(_ROW_GROUPS_ON_CPU, row_blocks))
    return max(1, min(row_blocks, triton.cdiv(programs_per_sm * streaming_multiprocessors(device), column_tiles)))


def adapter_bottleneck_forward(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    save_for_backward: bool,
    *,
    tiles: dict | None = None,
    pre_norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (x's shape and dtype) and, when ``save_for_backward``, mean and rstd (rows,) and h (rows, R) in the
    accumulator dtype (fp32, fp64 for fp64 x); empty tensors otherwise. Shapes are checked by the caller;
    ``tiles`` overrides entries of FORWARD_TILES[element size], or with ``"kernel": "rows"`` those of the rows
    kernel's ROWS_TILES (the kernel otherwise: "rows" up to ROWS_KERNEL_UP_TO rows, else "tensor cores").
    ``pre_norm`` = (residual, weight, bias, eps), x's shape and (H,): the adapter's input is then LayerNorm(residual
    + x) as add_layer_norm computes it (kernels/adapter_pre_norm.py), never written; inference only."""
    if pre_norm is not None and save_for_backward:
        raise ValueError("adapter_bottleneck_forward: pre_norm is for inference; save_for_backward must be False")
    if pre_norm is not None and pre_norm[0].dtype != x.dtype:
        # the kernel rounds residual + x to the residual's dtype and its LayerNorm to x's: one dtype, as the op has
        raise ValueError(
            f"adapter_bottleneck_forward: pre_norm's residual must have x's dtype {x.dtype}, got {pre_norm[0].dtype}"
        )
    hidden, bottleneck = x.shape[-1], down_weight.shape[0]
    x_rows = x.reshape(-1, hidden).contiguous()
    rows = x_rows.shape[0]
    dot_dtype, acc_dtype, acc_torch_dtype = _precision(x.dtype)
    y = torch.empty_like(x_rows)
    saved_rows = rows if save_for_backward else 0
    mean = torch.empty(saved_rows, dtype=acc_torch_dtype, device=x.device)
    rstd = torch.empty(saved_rows, dtype=acc_torch_dtype, device=x.device)
    h = torch.empty(saved_rows, bottleneck if save_for_backward else 0, dtype=acc_torch_dtype, device=x.device)
    pre_norm_arguments = {}
    if pre_norm is not None:
        residual, pre_weight, pre_bias, pre_eps = pre_norm
        pre_norm_arguments = dict(
            residual_ptr=residual.reshape(-1, hidden).contiguous(), pre_weight_ptr=pre_weight.contiguous(),
            pre_bias_ptr=pre_bias.contiguous(), pre_eps=pre_eps, PRE_NORM=True,
        )  # fmt: skip
    tiles = dict(tiles or {})
    kernel = tiles.pop("kernel", "rows" if rows <= ROWS_KERNEL_UP_TO else "tensor cores")
    if kernel not in FORWARD_KERNELS:
        raise ValueError(f"adapter_bottleneck_forward: kernel must be one of {FORWARD_KERNELS}, got {kernel!r}")
    if rows > 0 and kernel == "rows":
        parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
        parameters = tuple(parameter.contiguous() for parameter in parameters)
        outputs = (y, mean, rstd, h)
        launch_forward_rows(
            x_rows, parameters, outputs, eps, save_for_backward, dot_dtype, acc_dtype, tiles, pre_norm_arguments
        )
    elif rows > 0:
        weights = (down_weight, up_weight)
        few_rows = FORWARD_FEW_ROWS_TILES
        launch = _tiles(FORWARD_TILES, tiles, x, weights, rows, bottleneck, by_rows=True, few_rows_table=few_rows)
        if pre_norm is not None and "BLOCK_K" not in tiles:
            launch["BLOCK_K"] = min(launch["BLOCK_K"], PRE_NORM_WIDEST_CHUNK)
        with on_device(x):
            _forward_kernel[(triton.cdiv(rows, launch["BLOCK_M"]),)](
                x_rows, down_weight.contiguous(), down_bias.contiguous(), up_weight.contiguous(),
                up_bias.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(), y, mean, rstd, h, rows, eps,
                H=hidden, R=bottleneck, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=_input_precision(x),
                SAVE_FOR_BACKWARD=save_for_backward, **launch, **pre_norm_arguments,
            )  # fmt: skip
    return y.view(x.shape), mean, rstd, h


def adapter_bottleneck_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    path: str | None = None,
    row_tiles: dict | None = None,
    column_tiles: dict | None = None,
    splits: int | None = None,
    weight_tiles: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias (each in its input's
    dtype) from the forward's saved h, mean and rstd. The biases are passed only for their dtypes.
    ``path`` is one of BACKWARD_PATHS (default BACKWARD_PATH). ``row_tiles`` override BACKWARD_ROW_TILES (the
    "gemm" and "split-k" paths' row kernel takes them too); ``column_tiles`` / ``splits`` the "columns" path's
    column kernel: BACKWARD_COLUMN_TILES and its number of row groups (partial sums per parameter);
    ``weight_tiles`` the "split-k" path's weight-gradient kernel, WEIGHT_GRADIENT_TILES."""
    path = path or BACKWARD_PATH
    if path not in BACKWARD_PATHS:
        raise ValueError(f"adapter_bottleneck_backward: path must be one of {BACKWARD_PATHS}, got {path!r}")
    hidden, bottleneck = x.shape[-1], down_weight.shape[0]
    x_rows = x.reshape(-1, hidden).contiguous()
    dy_rows = grad_output.reshape(-1, hidden).contiguous()
    rows = x_rows.shape[0]
    dot_dtype, acc_dtype, acc_torch_dtype = _precision(x.dtype)
    down_weight, up_weight = down_weight.contiguous(), up_weight.contiguous()
    up_bias, norm_weight = up_bias.contiguous(), norm_weight.contiguous()
    weights = (down_weight, up_weight)
    if path in ("gemm", "split-k"):
        parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
        weight_gradients = _weight_gradients_mm
        if path == "split-k":
            weight_gradients = functools.partial(_weight_gradients_split_k, tiles=weight_tiles)
        saved = (h, mean, rstd)
        return _backward_through_gemms(dy_rows, x_rows, x.shape, parameters, saved, row_tiles, weight_gradients)
    row_launch = _tiles(BACKWARD_ROW_TILES, row_tiles, x, weights, rows, bottleneck, by_rows=True)
    column_launch = _tiles(BACKWARD_COLUMN_TILES, column_tiles, x, weights, rows, bottleneck, by_rows=False)
    column_blocks = triton.cdiv(hidden, column_launch["BLOCK_N"])
    splits = splits or _row_groups(x.device, column_blocks, triton.cdiv(rows, column_launch["BLOCK_M"]))

    new = dict(dtype=acc_torch_dtype, device=x.device)
    dh = torch.empty(rows, bottleneck, **new)
    operand_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc_torch_dtype
    g = torch.empty(rows, bottleneck, dtype=operand_dtype, device=x.device)
    mean_wdy_xhat, mean_wdy = torch.empty(rows, **new), torch.empty(rows, **new)
    dx = torch.empty_like(x_rows)
    # Every program stores its whole tile of partials, so torch.empty is enough (zeros for rows == 0).
    allocate = torch.empty if rows > 0 else torch.zeros
    down_weight_partial = allocate(splits, bottleneck, hidden, **new)
    down_bias_partial = allocate(splits, bottleneck, **new)
    up_weight_partial = allocate(splits, hidden, bottleneck, **new)
    up_bias_partial, norm_weight_partial, norm_bias_partial = (allocate(splits, hidden, **new) for _ in range(3))
    if rows > 0:
        precision = dict(DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=_input_precision(x))
        with on_device(x):
            _backward_rows_kernel[(triton.cdiv(rows, row_launch["BLOCK_M"]),)](
                dy_rows, x_rows, up_weight, up_bias, norm_weight, h, mean, rstd, dh, g, mean_wdy_xhat, mean_wdy,
                rows, H=hidden, R=bottleneck, **precision, **row_launch,
            )  # fmt: skip
            _backward_columns_kernel[(column_blocks, splits)](
                dy_rows, x_rows, down_weight, up_weight, up_bias, norm_weight, g, mean, rstd, dh, mean_wdy_xhat,
                mean_wdy, dx, down_weight_partial, down_bias_partial, up_weight_partial, up_bias_partial,
                norm_weight_partial, norm_bias_partial, rows, splits, H=hidden, R=bottleneck, **precision,
                **column_launch,
            )  # fmt: skip
    return (
        dx.view(x.shape),
        down_weight_partial.sum(0).to(down_weight.dtype),
        down_bias_partial.sum(0).to(down_bias.dtype),
        up_weight_partial.sum(0).to(up_weight.dtype),
        up_bias_partial.sum(0).to(up_bias.dtype),
        norm_weight_partial.sum(0).to(norm_weight.dtype),
        norm_bias_partial.sum(0).to(norm_bias.dtype),
    )


def _backward_through_gemms(
    dy_rows: torch.Tensor,
    x_rows: torch.Tensor,
    x_shape: torch.Size,
    parameters: tuple[torch.Tensor, ...],
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    row_tiles: dict | None,
    weight_gradients: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, ...]:
    """The "gemm" and "split-k" paths of adapter_bottleneck_backward (arguments made contiguous there;
    ``parameters`` in the op's order, ``saved`` = (h, mean, rstd)): one row kernel, then
    ``weight_gradients(dz, g, dh, x_rows)`` gives (dW_d, dW_u) = (dh^T x, dz^T g) over the materialised
    operands, and the per-block partial sums are reduced in the accumulator dtype."""
    down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias = parameters
    h, mean, rstd = saved
    rows, hidden = x_rows.shape
    bottleneck = down_weight.shape[0]
    dot_dtype, acc_dtype, acc_torch_dtype = _precision(x_rows.dtype)
    launch = _tiles(BACKWARD_ROW_TILES, row_tiles, x_rows, (down_weight, up_weight), rows, bottleneck, by_rows=True)
    blocks = triton.cdiv(rows, launch["BLOCK_M"])
    operand_dtype = x_rows.dtype if x_rows.dtype in (torch.float16, torch.bfloat16) else acc_torch_dtype
    operand = dict(dtype=operand_dtype, device=x_rows.device)
    dz, dh, g = (
        torch.empty(rows, hidden, **operand),
        torch.empty(rows, bottleneck, **operand),
        torch.empty(rows, bottleneck, **operand),
    )
    dx = torch.empty_like(x_rows)
    # Every program stores its whole rows of partials: empty is enough (no rows: no blocks, and the sums are 0).
    column_partial = torch.empty(3, blocks, hidden, dtype=acc_torch_dtype, device=x_rows.device)
    down_bias_partial = torch.empty(blocks, bottleneck, dtype=acc_torch_dtype, device=x_rows.device)
    if rows > 0:
        with on_device(x_rows):
            _backward_gemm_rows_kernel[(blocks,)](
                dy_rows, x_rows, down_weight, up_weight, up_bias, norm_weight, h, mean, rstd, dz, dx, dh, g,
                column_partial, down_bias_partial, rows, H=hidden, R=bottleneck, DOT_DTYPE=dot_dtype,
                ACC_DTYPE=acc_dtype, INPUT_PRECISION=_input_precision(x_rows), **launch,
            )  # fmt: skip
    # one sum each: three views of one (3, H) sum would alias, which a custom op may not return
    norm_weight_grad, norm_bias_grad, up_bias_grad = (partial.sum(0) for partial in column_partial)
    down_weight_grad, up_weight_grad = weight_gradients(dz, g, dh, x_rows)
    return (
        dx.view(x_shape),
        down_weight_grad.to(down_weight.dtype),
        down_bias_partial.sum(0).to(down_bias.dtype),
        up_weight_grad.to(up_weight.dtype),
        up_bias_grad.to(up_bias.dtype),
        norm_weight_grad.to(norm_weight.dtype),
        norm_bias_grad.to(norm_bias.dtype),
    )


def _weight_gradients_mm(
    dz: torch.Tensor, g: torch.Tensor, dh: torch.Tensor, x_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_d, dW_u) = (dh^T x, dz^T g) as two GEMMs in the dot operand dtype (fp32 accumulation inside, as
    torch's own bf16 linear backward): the "gemm" path."""
    return torch.mm(dh.t(), x_rows), torch.mm(dz.t(), g)


def _weight_gradients_split_k(
    dz: torch.Tensor, g: torch.Tensor, dh: torch.Tensor, x_rows: torch.Tensor, tiles: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_d, dW_u) = (dh^T x, dz^T g) in the accumulator dtype by _weight_gradients_kernel over column tiles x
    row splits (``tiles`` override WEIGHT_GRADIENT_TILES), the splits' partials summed here: the "split-k" path."""
    rows, hidden = x_rows.shape
    bottleneck = g.shape[1]
    dot_dtype, acc_dtype, acc_torch_dtype = _precision(x_rows.dtype)
    new = dict(dtype=acc_torch_dtype, device=x_rows.device)
    if rows == 0:
        return torch.zeros(bottleneck, hidden, **new), torch.zeros(hidden, bottleneck, **new)
    launch = _tiles(WEIGHT_GRADIENT_TILES, tiles, x_rows, (dz,), rows, bottleneck, by_rows=False)
    column_blocks = triton.cdiv(hidden, launch["BLOCK_N"])
    splits = _row_groups(x_rows.device, column_blocks, triton.cdiv(rows, launch["BLOCK_M"]), programs_per_sm=4)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), launch["BLOCK_M"]) * launch["BLOCK_M"]
    splits = triton.cdiv(rows, rows_per_split)
    # Every program stores its whole (BLOCK_N, R) tiles: empty is enough.
    up_partial, down_partial = (
        torch.empty(splits, hidden, bottleneck, **new),
        torch.empty(splits, bottleneck, hidden, **new),
    )
    with on_device(x_rows):
        _weight_gradients_kernel[(column_blocks, splits)](
            dz, g, dh, x_rows, up_partial, down_partial, rows, rows_per_split, H=hidden, R=bottleneck,
            DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, INPUT_PRECISION=_input_precision(x_rows), **launch,
        )  # fmt: skip
    return down_partial.sum(0), up_partial.sum(0)
