"""Triton kernels of ``fastmini.ops.linear_gelu``: the FFN up-projection with its bias and GELU.

The math (x: (M, H) rows, W: (I, H) in nn.Linear layout, b: (I,)):

    forward    pre = x @ W^T                       (M, I), no bias: the GEMM's own output
               z   = pre + b
               y   = gelu(z)
    backward   dz  = dy * gelu'(z)                 (M, I), elementwise
               db  = sum over rows of dz           (I,)
               dW  = dz^T @ x                      (I, H)
               dx  = dz @ W                        (M, H)

    exact ("none", config "gelu"):   gelu(z)  = z Phi(z) = z/2 (1 + erf(z / sqrt 2))
                                     gelu'(z) = Phi(z) + z phi(z),   phi(z) = exp(-z^2/2) / sqrt(2 pi)
    tanh ("tanh", config "gelu_new"): u = sqrt(2/pi) (z + 0.044715 z^3)
                                     gelu(z)  = z/2 (1 + tanh u) = z s,   s = sigmoid(2u)
                                     gelu'(z) = s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
    (tanh u = 2 sigmoid(2u) - 1, so 1 - tanh^2 u = 4 s (1 - s); the sigmoid form never overflows.)

Two code paths of the Triton backend, chosen by the ``path`` keyword of :func:`linear_gelu_forward`
(a knob of this host launcher, never of the public op):

- ``"bias_gelu"`` (the default): ``pre`` by cuBLAS (torch.matmul without bias), then one elementwise
  kernel ``y = gelu(pre + b)``. Extra traffic over the bare GEMM: one read of ``pre`` and one write of
  ``y`` (2 * M * I elements).
- ``"fused_gemm"``: one Triton GEMM with ``+ b`` and GELU in its epilogue, writing ``y`` and, when a
  backward will follow, ``pre``. Extra traffic: the ``pre`` write in training, nothing in inference.

Both share the backward: one elementwise kernel for ``dz`` (and fp32 partial sums of ``db``, one row of
partials per program row-group, reduced on the host), then two torch.matmul GEMMs for ``dW`` and ``dx``.

Which path is the default was measured on an H200 (benchmarks/test_linear_gelu.py; the figures are in
ops/linear_gelu.py's _triton_pays_off_on_gpu): "bias_gelu" 0.88-1.04x torch's F.linear + F.gelu, "fused_gemm"
0.43-0.88x, so neither is chosen automatically. The estimate that came first, at M=16384, H=768, I=3072 in
bf16 on an H100: the GEMM is 77 GFLOP,
~130 us at 600 TFLOP/s, and the bias-GELU pass moves 200 MB, ~60 us at 3.3 TB/s, so bias_gelu takes
~190 us. The fused GEMM takes 130 us / f at a fraction f of cuBLAS's throughput, plus ~30 us for the
``pre`` write when training: it wins if f > ~0.7 (inference) or ~0.8 (training), which a plain
(non-TMA, non-warp-specialised) Triton GEMM may or may not reach: it reached 0.43-0.88x.

Precision: the GEMMs take both operands in the activation's dtype (an fp32 weight under bf16 autocast
is cast on every call, forward and backward, where autocast caches one cast a region: a cost of
backend="triton" only, which nothing chooses automatically) and accumulate in fp32; the epilogue, GELU and the bias
gradient run in fp32 (fp64 for fp64 inputs, so that gradcheck can see the kernels' own derivative).
fp32 GEMMs follow torch's ``float32_matmul_precision`` (ieee unless TF32 is allowed), as cuBLAS does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmini.kernels.gelu import gelu, gelu_derivative
from fastmini.kernels.interpreter import cast_output
from fastmini.kernels.launching import accumulator_dtypes, on_device

PATHS = ("bias_gelu", "fused_gemm")
DEFAULT_PATH = "bias_gelu"

# Elementwise tiles: BLOCK_M x BLOCK_N = 4096 elements, 16 per thread at 4 warps.
_ELEMENTWISE_ELEMENTS = 4096
_ELEMENTWISE_MAX_COLUMNS = 256
# The bias gradient is reduced from at most this many fp32 partial rows (each program walks several
# row blocks first), so the host-side sum reads ~1.5 MB at I=3072 whatever M is.
_MAX_BIAS_PARTIALS = 128


@triton.jit
def _bias_gelu_forward_kernel(
    pre_ptr,  # (rows, cols) x @ W^T, contiguous
    bias_ptr,  # (cols,)
    y_ptr,  # (rows, cols) output, may be pre_ptr itself (each element is read before it is written)
    rows,
    cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row_offsets = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_offsets = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_offsets < cols
    mask = (row_offsets < rows)[:, None] & col_mask[None, :]
    # int64 so that rows * cols past 2^31 elements still addresses correctly
    offsets = row_offsets.to(tl.int64)[:, None] * cols + col_offsets[None, :]
    bias = tl.load(bias_ptr + col_offsets, mask=col_mask, other=0.0).to(ACC_DTYPE)
    z = tl.load(pre_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE) + bias[None, :]
    tl.store(y_ptr + offsets, cast_output(gelu(z, APPROX_TANH), y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    grad_y_ptr,  # (rows, cols) dy, contiguous
    pre_ptr,  # (rows, cols) x @ W^T saved by the forward
    bias_ptr,  # (cols,)
    grad_pre_ptr,  # (rows, cols) output dz = dy * gelu'(pre + b)
    bias_grad_partial_ptr,  # (row_groups, cols) fp32/fp64 output: sum of dz over this program's rows
    rows,
    cols,
    rows_per_program,  # a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    COMPUTE_BIAS_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row_group = tl.program_id(0)
    col_offsets = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_offsets < cols
    bias = tl.load(bias_ptr + col_offsets, mask=col_mask, other=0.0).to(ACC_DTYPE)
    bias_grad = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    first_row = row_group * rows_per_program
    # Walking several row blocks per program keeps the partial-sum buffer (and its host reduction)
    # small; the bias gradient is summed from the unrounded dz.
    for block_start in range(0, rows_per_program, BLOCK_M):
        row_offsets = first_row + block_start + tl.arange(0, BLOCK_M)
        mask = (row_offsets < rows)[:, None] & col_mask[None, :]
        offsets = row_offsets.to(tl.int64)[:, None] * cols + col_offsets[None, :]
        grad_y = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        z = tl.load(pre_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE) + bias[None, :]
        grad_pre = grad_y * gelu_derivative(z, APPROX_TANH)  # 0 where masked: dy loads as 0
        tl.store(grad_pre_ptr + offsets, cast_output(grad_pre, grad_pre_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_BIAS_GRAD:
            bias_grad += tl.sum(grad_pre, axis=0)
    if COMPUTE_BIAS_GRAD:
        tl.store(bias_grad_partial_ptr + row_group * cols + col_offsets, bias_grad, mask=col_mask)


@triton.jit
def _linear_gelu_gemm_kernel(
    x_ptr,  # (rows, hidden) contiguous
    weight_ptr,  # (intermediate, hidden) contiguous, same dtype as x
    bias_ptr,  # (intermediate,)
    y_ptr,  # (rows, intermediate) output gelu(x @ W^T + b)
    pre_ptr,  # (rows, intermediate) output x @ W^T (without bias) for the backward; unused unless STORE_PRE
    rows,
    hidden,
    intermediate,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr,
):
    # Grouped order: GROUP_M consecutive row tiles sweep the weight's column tiles together, so a
    # weight tile is fetched from DRAM once per group rather than once per row tile (L2 reuse).
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_M)
    col_tiles = tl.cdiv(intermediate, BLOCK_N)
    tiles_per_group = GROUP_M * col_tiles
    group = pid // tiles_per_group
    first_row_tile = group * GROUP_M
    group_rows = min(row_tiles - first_row_tile, GROUP_M)
    row_tile = first_row_tile + (pid % tiles_per_group) % group_rows
    col_tile = (pid % tiles_per_group) // group_rows

    row_offsets = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    col_offsets = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offsets = tl.arange(0, BLOCK_K)
    row_mask = row_offsets < rows
    col_mask = col_offsets < intermediate
    x_tile_ptrs = x_ptr + row_offsets.to(tl.int64)[:, None] * hidden + k_offsets[None, :]
    # W^T tile (BLOCK_K, BLOCK_N): element [k, n] is W[n, k]
    weight_tile_ptrs = weight_ptr + col_offsets.to(tl.int64)[None, :] * hidden + k_offsets[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, hidden, BLOCK_K):
        k_mask = (k_start + k_offsets) < hidden
        x_tile = tl.load(x_tile_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        weight_tile = tl.load(weight_tile_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_DOT_OPERANDS:
            # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584); the
            # products of 16-bit floats are exact in fp32, so this is the tensor-core result.
            x_tile = x_tile.to(ACC_DTYPE)
            weight_tile = weight_tile.to(ACC_DTYPE)
        acc = tl.dot(x_tile, weight_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        x_tile_ptrs += BLOCK_K
        weight_tile_ptrs += BLOCK_K

    out_mask = row_mask[:, None] & col_mask[None, :]
    out_offsets = row_offsets.to(tl.int64)[:, None] * intermediate + col_offsets[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, cast_output(acc, pre_ptr.dtype.element_ty), mask=out_mask)
    bias = tl.load(bias_ptr + col_offsets, mask=col_mask, other=0.0).to(ACC_DTYPE)
    y = gelu(acc + bias[None, :], APPROX_TANH)
    tl.store(y_ptr + out_offsets, cast_output(y, y_ptr.dtype.element_ty), mask=out_mask)


def _elementwise_blocks(cols: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(cols), _ELEMENTWISE_MAX_COLUMNS)
    return _ELEMENTWISE_ELEMENTS // block_n, block_n


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs as precise as torch's own (TF32 only where torch allows it); fp64 exact; 16-bit
    operands ignore the setting, so they get triton's default."""
    if dtype == torch.float64 or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _upcast_dot_operands(x: torch.Tensor) -> bool:
    """16-bit GEMM operands are upcast to fp32 off the GPU only (the interpreter's bf16 dots are wrong)."""
    return not x.is_cuda


def _gemm_blocks(rows: int, hidden: int, intermediate: int, dtype: torch.dtype) -> dict:
    """Tiles of the fused GEMM: 128 x 128 output tiles with 64-wide (16-bit) or 32-wide (fp32) K steps
    at real sizes, three pipeline stages (~96 KB of shared memory); small sizes shrink to 16.
    A first guess for Hopper/Ampere, to be tuned with the benchmark on a GPU."""
    max_k = 64 if dtype.itemsize <= 2 else 32
    return dict(
        BLOCK_M=max(16, min(128, triton.next_power_of_2(rows))),
        BLOCK_N=max(16, min(128, triton.next_power_of_2(intermediate))),
        BLOCK_K=max(16, min(max_k, triton.next_power_of_2(hidden))),
        GROUP_M=8,
        num_warps=8,
        num_stages=3,
    )


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"linear_gelu: path must be one of {PATHS}, got '{path}'")


def bias_gelu(pre: torch.Tensor, bias: torch.Tensor, approximate: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(pre + bias) for pre (M, I) contiguous, written to ``out`` (default: a new tensor like pre)."""
    y = torch.empty_like(pre) if out is None else out
    rows, cols = pre.shape
    if pre.numel() == 0:
        return y
    block_m, block_n = _elementwise_blocks(cols)
    acc_dtype, _ = accumulator_dtypes(pre.dtype)
    with on_device(pre):
        _bias_gelu_forward_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
            pre,
            bias,
            y,
            rows,
            cols,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            APPROX_TANH=approximate == "tanh",
            ACC_DTYPE=acc_dtype,
            num_warps=4,
        )
    return y


def fused_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x @ W^T + b), x @ W^T or an empty tensor) from one Triton GEMM; x, weight contiguous, same dtype."""
    rows, hidden = x.shape
    intermediate = weight.shape[0]
    y = x.new_empty((rows, intermediate))
    pre = x.new_empty((rows, intermediate) if save_pre else (0,))
    if y.numel() == 0:
        return y, pre
    blocks = _gemm_blocks(rows, hidden, intermediate, x.dtype)
    acc_dtype, _ = accumulator_dtypes(x.dtype)
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]) * triton.cdiv(intermediate, blocks["BLOCK_N"]),)
    with on_device(x):
        _linear_gelu_gemm_kernel[grid](
            x,
            weight,
            bias,
            y,
            pre if save_pre else y,  # any valid pointer: with STORE_PRE off the kernel never writes it
            rows,
            hidden,
            intermediate,
            APPROX_TANH=approximate == "tanh",
            STORE_PRE=save_pre,
            ACC_DTYPE=acc_dtype,
            DOT_PRECISION=_dot_precision(x.dtype),
            UPCAST_DOT_OPERANDS=_upcast_dot_operands(x),
            **blocks,
        )
    return y, pre


def linear_gelu_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str,
    save_pre: bool = True,
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, H), weight (I, H), bias (I,) -> (y, pre), both (M, I) in x's dtype.

    ``pre`` = x @ W^T (no bias) is what the backward needs; with ``save_pre=False`` (inference) it is
    an empty tensor and the bias_gelu path writes y over the GEMM's output in place.
    ``path`` picks the code path (module docstring): "bias_gelu" or "fused_gemm"; None is DEFAULT_PATH.
    """
    path = DEFAULT_PATH if path is None else path
    _check_path(path)
    x = x.contiguous()
    gemm_weight = weight.to(x.dtype).contiguous()
    bias = bias.contiguous()
    if path == "fused_gemm":
        return fused_gemm(x, gemm_weight, bias, approximate, save_pre)
    pre = torch.matmul(x, gemm_weight.t())
    if save_pre:
        return bias_gelu(pre, bias, approximate), pre
    return bias_gelu(pre, bias, approximate, out=pre), x.new_empty((0,))


def bias_gelu_backward(
    grad_y: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, approximate: str, compute_bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dz = dy * gelu'(pre + b) in pre's dtype, db = sum of dz over rows in bias's dtype or None)."""
    rows, cols = pre.shape
    grad_pre = torch.empty_like(pre)
    acc_dtype, torch_acc_dtype = accumulator_dtypes(pre.dtype)
    if pre.numel() == 0:
        return grad_pre, torch.zeros_like(bias) if compute_bias_grad else None
    block_m, block_n = _elementwise_blocks(cols)
    row_blocks = triton.cdiv(rows, block_m)
    rows_per_program = triton.cdiv(row_blocks, _MAX_BIAS_PARTIALS) * block_m
    row_groups = triton.cdiv(rows, rows_per_program)
    partials = torch.empty((row_groups, cols) if compute_bias_grad else (1,), dtype=torch_acc_dtype, device=pre.device)
    with on_device(pre):
        _bias_gelu_backward_kernel[(row_groups, triton.cdiv(cols, block_n))](
            grad_y,
            pre,
            bias,
            grad_pre,
            partials,
            rows,
            cols,
            rows_per_program,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            APPROX_TANH=approximate == "tanh",
            COMPUTE_BIAS_GRAD=compute_bias_grad,
            ACC_DTYPE=acc_dtype,
            num_warps=4,
        )
    return grad_pre, partials.sum(dim=0).to(bias.dtype) if compute_bias_grad else None


def linear_gelu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pre: torch.Tensor,
    approximate: str,
    needs_input_grad: bool = True,
    needs_weight_grad: bool = True,
    needs_bias_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db) of both paths, each in its own input's dtype; None where not asked for
    (a frozen weight, as in adapter tuning, skips the dW GEMM)."""
    x = x.contiguous()
    grad_y = grad_y.to(pre.dtype).contiguous()
    grad_pre, grad_bias = bias_gelu_backward(grad_y, pre, bias.contiguous(), approximate, needs_bias_grad)
    grad_x = torch.matmul(grad_pre, weight.to(x.dtype)).to(x.dtype) if needs_input_grad else None
    grad_weight = torch.matmul(grad_pre.t(), x).to(weight.dtype) if needs_weight_grad else None
    return grad_x, grad_weight, grad_bias
