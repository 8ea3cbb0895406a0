"""Triton kernels of ``fastmini.ops.add_layer_norm``: residual add (+ dropout) + LayerNorm over the last dim.

Rows are all leading dimensions flattened; every row of H values is normalised on its own.
Only the kernels and their host launchers live here; the custom ops, autograd and backend
choice are in ``fastmini/ops/add_layer_norm.py``.

Forward, for one row (keep_i ~ Bernoulli(1 - p), drawn by Philox from (seed, element offset)):

    s_i     = residual_i + x_i * keep_i / (1 - p)          (keep_i = 1 when p = 0)
    mean    = sum_i s_i / H
    rstd    = 1 / sqrt(sum_i (s_i - mean)^2 / H + eps)
    xhat_i  = (s_i - mean) * rstd
    y_i     = xhat_i * w_i + b_i

s is rounded to the output dtype (the promoted dtype of x and residual) before it is
normalised, as ``residual + x`` is in torch. All arithmetic is fp32 (fp64 for fp64 inputs,
so that gradcheck means something). mean and rstd (one per row, in that compute dtype) are
saved for backward, and so is s when a gradient will be asked for: backward then reads s and
dy, not x, residual and a mask.

Backward, for one row, with g_i = dy_i * w_i:

    ds_i        = rstd * (g_i - mean_j(g_j) - xhat_i * mean_j(g_j * xhat_j))
    dresidual_i = ds_i
    dx_i        = ds_i * keep_i / (1 - p)                   (= ds_i when p = 0)
    dw_i        = sum_rows dy_i * xhat_i,    db_i = sum_rows dy_i

The dropout mask is never stored: forward and backward call the same ``_dropout_keep`` on the
same (seed, row, column), so backward regenerates it bit for bit (Philox; DROPOUT_RNG says how). dw and db are summed
per program in compute-dtype registers over a contiguous slab of rows, written as
(programs, H) partials, and reduced by one torch sum on the host side.

Every block extent is a power of two with masks (H = 36, 312, 768 all pad to the next power
of two); the whole row stays in registers, so H is limited to MAX_HIDDEN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmini.kernels.interpreter import cast_output
from fastmini.kernels.launching import on_device, streaming_multiprocessors

from fastmini.ops.checks import accumulator_dtype

# The whole row lives in registers; past this the kernels would spill badly (and the model
# never comes near it: MiniALBERT's H is 312 or 768).
MAX_HIDDEN = 16384
# Elements of one program's (rows x BLOCK_H) tile, and of it a thread's share: backward keeps about twice as
# many live values per element as forward, so its tile is smaller and a thread holds fewer of them. At H=768
# the backward's tile is one (1024-padded) row on 4 warps (BACKWARD_CANDIDATES says what it beat).
_FORWARD_TILE_ELEMENTS = 4096
_FORWARD_ELEMENTS_PER_THREAD = 16
_BACKWARD_TILE_ELEMENTS = 1024
_BACKWARD_ELEMENTS_PER_THREAD = 8
# How dropout draws its uniforms (_dropout_keep), read at every launch, so forward, backward and
# dropout_keep_mask agree as long as it is not changed between them. "per-element" (tl.rand: Philox's ten rounds
# for each element) or "four-per-call" (tl.rand4x: a quarter of the Philox work; compiled for sm_90 its forward has
# 80 wide/high integer multiplies a thread instead of 280, its backward 92 instead of 288). On an H200
# (2026-11-26, session 15, 16384 x 768, GPU time, benchmarks/test_add_layer_norm.py) the dropout variant's
# forward+backward took 113 us with four-per-call against 179 us per-element (bf16; fp32 133 against 188), and
# the GPU tests passed under both, so four-per-call is the default.
DROPOUT_RNG_SCHEMES = ("per-element", "four-per-call")
DROPOUT_RNG = "four-per-call"
# Backward programs per SM: each sums dw and db over its slab of rows into one (H,) partial, so more programs
# mean more partials to reduce, fewer mean fewer warps in flight to hide the loads' latency.
_BACKWARD_PROGRAMS_PER_SM = 8
# What a GPU sweep tries besides the defaults (benchmarks/test_add_layer_norm.py times them through the
# launcher's overrides). Registers decide how many blocks an SM keeps (benchmarks/kernel_resources.py, bf16
# H=768 without dropout, sm_90): 2-row tiles on 4 warps need 111 registers a thread (16 warps an SM); 1-row tiles
# on 4 warps 56 (36), on 8 warps 39 (48). On an H200 (2026-11-26, GPU time, 16384 / 1024 x 768 bf16): session
# 13 chose 8 programs per SM over 4 (1.10x at 16384 rows); session 15 timed the then default, 2-row tiles on 4
# warps, at 53.3 / 29.9 us and 1-row tiles on 4 warps at 49.3 / 24.1 us (1.08x / 1.24x; the same with dropout),
# now the default; 1-row tiles on 8 warps 0.87x / 1.22x; 2-row on 8 warps 0.78x / 0.77x; 4-row tiles (8 warps)
# 0.74x / 1.12x; 4 or 16 programs per SM 0.92-0.94x / 1.01x.
BACKWARD_CANDIDATES = {
    "default": {},
    "1-row tiles, 2 warps": {"num_warps": 2},
    "1-row tiles, 8 warps": {"num_warps": 8},
    "1-row tiles, 4 programs per SM": {"programs_per_sm": 4},
    "1-row tiles, 16 programs per SM": {"programs_per_sm": 16},
    "2-row tiles, 4 warps (session 13)": {"tile_elements": 2048, "num_warps": 4},
    "4-row tiles, 8 warps": {"tile_elements": 4096, "num_warps": 8},
}


@triton.jit
def _dropout_keep(seed, rows, hidden, dropout_p, BLOCK_H: tl.constexpr, FOUR_PER_CALL: tl.constexpr):
    """(rows, BLOCK_H): True where element (row, column) survives dropout; a pure function of (seed, row, column)
    and the scheme (DROPOUT_RNG). "per-element": Philox's ten rounds for every element, counter r * H + c.
    "four-per-call" (FOUR_PER_CALL): one Philox call gives four uniforms, element (r, c) takes lane c % 4 of
    counter r * ceil(H / 4) + c // 4."""
    if not FOUR_PER_CALL:
        return tl.rand(seed, rows.to(tl.int64)[:, None] * hidden + tl.arange(0, BLOCK_H)[None, :]) > dropout_p
    quads = tl.arange(0, BLOCK_H // 4)
    counters = rows.to(tl.int64)[:, None] * tl.cdiv(hidden, 4) + quads[None, :]
    lane0, lane1, lane2, lane3 = tl.rand4x(seed, counters)
    # interleave(a, b) = a0 b0 a1 b1 ...: so this is lane0 lane1 lane2 lane3 of quad 0, then of quad 1, ...
    uniform = tl.interleave(tl.interleave(lane0, lane2), tl.interleave(lane1, lane3))
    return uniform > dropout_p


@triton.jit(do_not_specialize=["seed"])
def _add_layer_norm_forward_kernel(
    x_ptr,  # (rows, H) the branch that dropout applies to
    residual_ptr,  # (rows, H)
    weight_ptr,  # (H,)
    bias_ptr,  # (H,)
    out_ptr,  # (rows, H) output dtype
    sum_ptr,  # (rows, H) output dtype; written only when STORE_SUM
    mean_ptr,  # (rows,) compute dtype: fp32, or fp64 for fp64 inputs
    rstd_ptr,  # (rows,) compute dtype
    n_rows,
    hidden,
    eps,
    dropout_p,
    seed,
    HAS_DROPOUT: tl.constexpr,
    FOUR_PER_CALL: tl.constexpr,  # the dropout RNG scheme, see _dropout_keep
    STORE_SUM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    compute = mean_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = tl.arange(0, BLOCK_H)
    row_in = rows < n_rows
    column_in = columns < hidden
    inside = row_in[:, None] & column_in[None, :]
    # int64 so that rows * H never wraps on large activations
    offsets = rows.to(tl.int64)[:, None] * hidden + columns[None, :]

    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(compute)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rows, hidden, dropout_p, BLOCK_H, FOUR_PER_CALL)
        x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
    total = tl.load(residual_ptr + offsets, mask=inside, other=0.0).to(compute) + x
    # Normalise s as backward will see it (rounded to the output dtype), as the torch composition does.
    total = cast_output(total, out_ptr.dtype.element_ty).to(compute)

    mean = tl.sum(total, axis=1) / hidden
    centered = tl.where(inside, total - mean[:, None], 0.0)
    variance = tl.sum(centered * centered, axis=1) / hidden
    rstd = 1.0 / tl.sqrt(variance + eps)

    weight = tl.load(weight_ptr + columns, mask=column_in, other=0.0).to(compute)
    bias = tl.load(bias_ptr + columns, mask=column_in, other=0.0).to(compute)
    out = centered * rstd[:, None] * weight[None, :] + bias[None, :]

    tl.store(out_ptr + offsets, cast_output(out, out_ptr.dtype.element_ty), mask=inside)
    if STORE_SUM:
        tl.store(sum_ptr + offsets, cast_output(total, sum_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + rows, mean, mask=row_in)
    tl.store(rstd_ptr + rows, rstd, mask=row_in)


@triton.jit(do_not_specialize=["seed"])
def _add_layer_norm_backward_kernel(
    grad_out_ptr,  # (rows, H) dy
    sum_ptr,  # (rows, H) s saved by forward
    weight_ptr,  # (H,)
    mean_ptr,  # (rows,) compute dtype: fp32, or fp64 for fp64 inputs
    rstd_ptr,  # (rows,) compute dtype
    grad_sum_ptr,  # (rows, H) ds = dresidual
    grad_x_ptr,  # (rows, H) dx; written only when HAS_DROPOUT (otherwise dx is ds)
    partial_grad_weight_ptr,  # (programs, H) compute dtype
    partial_grad_bias_ptr,  # (programs, H) compute dtype
    n_rows,
    hidden,
    rows_per_program,  # a multiple of BLOCK_ROWS, so slabs never overlap
    dropout_p,
    seed,
    HAS_DROPOUT: tl.constexpr,
    FOUR_PER_CALL: tl.constexpr,  # the dropout RNG scheme, see _dropout_keep
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    compute = mean_ptr.dtype.element_ty
    program = tl.program_id(0)
    first_row = program * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    columns = tl.arange(0, BLOCK_H)
    column_in = columns < hidden
    weight = tl.load(weight_ptr + columns, mask=column_in, other=0.0).to(compute)
    # Per-row partial sums, folded across rows once at the end rather than every iteration.
    grad_weight = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=compute)
    grad_bias = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=compute)

    for block_start in range(first_row, end_row, BLOCK_ROWS):
        rows = block_start + tl.arange(0, BLOCK_ROWS)
        row_in = rows < end_row
        inside = row_in[:, None] & column_in[None, :]
        offsets = rows.to(tl.int64)[:, None] * hidden + columns[None, :]

        grad_out = tl.load(grad_out_ptr + offsets, mask=inside, other=0.0).to(compute)
        total = tl.load(sum_ptr + offsets, mask=inside, other=0.0).to(compute)
        mean = tl.load(mean_ptr + rows, mask=row_in, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_in, other=0.0)
        normalized = tl.where(inside, (total - mean[:, None]) * rstd[:, None], 0.0)

        scaled_grad = grad_out * weight[None, :]
        mean_scaled_grad = tl.sum(scaled_grad, axis=1) / hidden
        mean_projection = tl.sum(scaled_grad * normalized, axis=1) / hidden
        grad_sum = (scaled_grad - mean_scaled_grad[:, None] - normalized * mean_projection[:, None]) * rstd[:, None]
        tl.store(grad_sum_ptr + offsets, cast_output(grad_sum, grad_sum_ptr.dtype.element_ty), mask=inside)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, hidden, dropout_p, BLOCK_H, FOUR_PER_CALL)
            grad_x = tl.where(keep, grad_sum * (1.0 / (1.0 - dropout_p)), 0.0)
            tl.store(grad_x_ptr + offsets, cast_output(grad_x, grad_x_ptr.dtype.element_ty), mask=inside)

        grad_weight += grad_out * normalized
        grad_bias += grad_out

    partial_offsets = program * hidden + columns
    tl.store(partial_grad_weight_ptr + partial_offsets, tl.sum(grad_weight, axis=0), mask=column_in)
    tl.store(partial_grad_bias_ptr + partial_offsets, tl.sum(grad_bias, axis=0), mask=column_in)


@triton.jit(do_not_specialize=["seed"])
def _dropout_keep_mask_kernel(
    keep_ptr,  # (rows, H) uint8, 1 where the element survives
    n_rows,
    hidden,
    dropout_p,
    seed,
    FOUR_PER_CALL: tl.constexpr,  # the dropout RNG scheme, see _dropout_keep
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = tl.arange(0, BLOCK_H)
    inside = (rows < n_rows)[:, None] & (columns < hidden)[None, :]
    offsets = rows.to(tl.int64)[:, None] * hidden + columns[None, :]
    keep = _dropout_keep(seed, rows, hidden, dropout_p, BLOCK_H, FOUR_PER_CALL)
    tl.store(keep_ptr + offsets, keep.to(tl.uint8), mask=inside)


def _four_per_call() -> bool:
    if DROPOUT_RNG not in DROPOUT_RNG_SCHEMES:
        raise ValueError(f"add_layer_norm: DROPOUT_RNG must be one of {DROPOUT_RNG_SCHEMES}, got {DROPOUT_RNG!r}")
    return DROPOUT_RNG == "four-per-call"


def _tile(hidden: int, tile_elements: int, elements_per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_H, num_warps): a whole padded row per tile row, small H packs several rows."""
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"add_layer_norm: the Triton kernels keep a whole row on chip and support H <= {MAX_HIDDEN}, got H={hidden}"
        )
    block_h = max(16, triton.next_power_of_2(hidden))  # >= 16: _dropout_keep draws 4 columns a Philox call
    block_rows = max(1, tile_elements // block_h)
    num_warps = min(16, max(1, block_rows * block_h // (32 * elements_per_thread)))
    return block_rows, block_h, num_warps


def add_layer_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    seed: int,
    keep_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, sum, mean, rstd) for contiguous (rows, H) ``x`` and ``residual``.

    ``out`` and ``sum`` have the promoted dtype of x and residual; ``sum`` is empty unless
    ``keep_sum`` (backward needs it, inference does not).
    """
    n_rows, hidden = x.shape
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty((n_rows, hidden), dtype=out_dtype, device=x.device)
    total = torch.empty((n_rows, hidden) if keep_sum else (0,), dtype=out_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=accumulator_dtype(out_dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=accumulator_dtype(out_dtype), device=x.device)
    if n_rows == 0:
        return out, total, mean, rstd
    block_rows, block_h, num_warps = _tile(hidden, _FORWARD_TILE_ELEMENTS, _FORWARD_ELEMENTS_PER_THREAD)
    with on_device(x):
        _add_layer_norm_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
            x,
            residual,
            weight,
            bias,
            out,
            total if keep_sum else out,  # never written when STORE_SUM is off
            mean,
            rstd,
            n_rows,
            hidden,
            eps,
            dropout_p,
            seed,
            HAS_DROPOUT=dropout_p > 0.0,
            FOUR_PER_CALL=_four_per_call(),
            STORE_SUM=keep_sum,
            BLOCK_ROWS=block_rows,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return out, total, mean, rstd


def add_layer_norm_backward(
    grad_out: torch.Tensor,
    total: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: int,
    *,
    tile_elements: int = _BACKWARD_TILE_ELEMENTS,
    programs_per_sm: int = _BACKWARD_PROGRAMS_PER_SM,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_sum, grad_x, grad_weight, grad_bias) for contiguous (rows, H) ``grad_out`` and saved ``total``.

    grad_sum is dresidual, in the dtype of ``total``; grad_x is empty without dropout (it equals
    grad_sum then). grad_weight and grad_bias are in the compute dtype (that of ``mean``), reduced
    over all rows. ``tile_elements``, ``programs_per_sm`` and ``num_warps`` override the launch
    (BACKWARD_CANDIDATES).
    """
    n_rows, hidden = total.shape
    grad_sum = torch.empty_like(total)
    grad_x = torch.empty_like(total) if dropout_p > 0.0 else total.new_empty((0,))
    if n_rows == 0:
        zeros = torch.zeros(hidden, dtype=mean.dtype, device=total.device)
        return grad_sum, grad_x, zeros, zeros.clone()
    block_rows, block_h, tile_warps = _tile(hidden, tile_elements, _BACKWARD_ELEMENTS_PER_THREAD)
    num_warps = num_warps or tile_warps
    programs_wanted = min(programs_per_sm * streaming_multiprocessors(total.device), triton.cdiv(n_rows, block_rows))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs_wanted), block_rows) * block_rows
    programs = triton.cdiv(n_rows, rows_per_program)
    partial_grad_weight = torch.empty((programs, hidden), dtype=mean.dtype, device=total.device)
    partial_grad_bias = torch.empty((programs, hidden), dtype=mean.dtype, device=total.device)
    with on_device(total):
        _add_layer_norm_backward_kernel[(programs,)](
            grad_out,
            total,
            weight,
            mean,
            rstd,
            grad_sum,
            grad_x if dropout_p > 0.0 else grad_sum,  # never written without dropout
            partial_grad_weight,
            partial_grad_bias,
            n_rows,
            hidden,
            rows_per_program,
            dropout_p,
            seed,
            HAS_DROPOUT=dropout_p > 0.0,
            FOUR_PER_CALL=_four_per_call(),
            BLOCK_ROWS=block_rows,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return grad_sum, grad_x, partial_grad_weight.sum(0), partial_grad_bias.sum(0)


def dropout_keep_mask(seed: int, n_rows: int, hidden: int, dropout_p: float, device: torch.device) -> torch.Tensor:
    """The (rows, H) bool mask of elements that the kernels above keep for this seed: for tests and debugging."""
    keep = torch.empty((n_rows, hidden), dtype=torch.uint8, device=device)
    if n_rows == 0:
        return keep.bool()
    block_rows, block_h, num_warps = _tile(hidden, _FORWARD_TILE_ELEMENTS, _FORWARD_ELEMENTS_PER_THREAD)
    with on_device(keep):
        _dropout_keep_mask_kernel[(triton.cdiv(n_rows, block_rows),)](
            keep, n_rows, hidden, dropout_p, seed, FOUR_PER_CALL=_four_per_call(), BLOCK_ROWS=block_rows,
            BLOCK_H=block_h, num_warps=num_warps,
        )  # fmt: skip
    return keep.bool()
