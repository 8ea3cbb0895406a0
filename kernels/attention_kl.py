"""Triton kernels of the distillation's attention loss: KL(teacher || student) summed over attention maps.

The maps (B, A, S, K) are read as N = B*A*S rows of K keys; row r is query q = r % S of sequence
b = r // (A*S), weighted by w[b*S + q] (1.0 for a real query token, 0.0 for a padded one):

    loss_sum = sum_r w_r sum_k t'_rk (log t'_rk - log(s_rk + eps)),   t' = t + eps
    d loss_sum / d s_rk = -w_r t'_rk / (s_rk + eps)

Why kernels: torch's composition runs ~10 elementwise passes over fp32 copies of the maps forward and ~5
backward (one map is 151 MB in fp32 at 48 x 12 x 256 x 256, six of them a step). Here the forward reads
each map once (student in its dtype, teacher in its own, bf16 under the recipe) and writes one partial
sum per program; the backward reads them once more and writes the gradient. The partial sums are added
in a fixed order (deterministic, no atomics). The backward takes its scale (the upstream
gradient over the denominator) as a one-element device tensor: nothing is read on the host.
Accumulation in fp32 (fp64 for fp64 maps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmini.kernels.interpreter import cast_output
from fastmini.kernels.launching import accumulator_dtypes, on_device

TILE_ELEMENTS = 4096  # elements a program holds at once: rows x keys chunk
MAX_BLOCK_K = 1024  # longer rows are walked in chunks
NUM_WARPS = 4


@triton.jit
def _rows(weight_ptr, first_row, n_rows, heads_queries, queries, BLOCK_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(rows, row mask, weights) of BLOCK_ROWS rows from first_row on."""
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    weight = tl.load(weight_ptr + (rows // heads_queries) * queries + rows % queries, mask=row_mask, other=0.0)
    return rows, row_mask, weight.to(ACC_DTYPE)


@triton.jit
def _tile(
    student_ptr, teacher_ptr, rows, row_mask, start, keys, eps, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr
):  # fmt: skip
    """(s, t', offsets, mask) of the rows' keys [start, start + BLOCK_K); ``eps`` a [1, 1] ACC_DTYPE tile."""
    columns = start + tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] & (columns < keys)[None, :]
    offsets = rows.to(tl.int64)[:, None] * keys + columns[None, :]
    student = tl.load(student_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    target = tl.load(teacher_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE) + eps
    return student, target, offsets, mask


@triton.jit
def _forward_kernel(
    student_ptr, teacher_ptr, weight_ptr, partial_ptr, n_rows, keys, heads_queries, queries,
    EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    eps = tl.full([1, 1], EPS, ACC_DTYPE)  # a float argument would be fp32, even for fp64 maps
    rows, row_mask, weight = _rows(
        weight_ptr, tl.program_id(0) * BLOCK_ROWS, n_rows, heads_queries, queries, BLOCK_ROWS, ACC_DTYPE
    )
    row_sums = tl.zeros((BLOCK_ROWS,), dtype=ACC_DTYPE)
    for start in range(0, keys, BLOCK_K):
        student, target, _offsets, _mask = _tile(
            student_ptr, teacher_ptr, rows, row_mask, start, keys, eps, BLOCK_K, ACC_DTYPE
        )
        # Outside the maps s = t = 0 (the loads' fill): eps (log eps - log eps) adds exactly 0, as padded keys do.
        row_sums += tl.sum(target * (tl.log(target) - tl.log(student + eps)), axis=1)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(row_sums * weight, axis=0))


@triton.jit
def _backward_kernel(
    student_ptr, teacher_ptr, weight_ptr, scale_ptr, grad_ptr, n_rows, keys, heads_queries, queries,
    EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    eps = tl.full([1, 1], EPS, ACC_DTYPE)
    rows, row_mask, weight = _rows(
        weight_ptr, tl.program_id(0) * BLOCK_ROWS, n_rows, heads_queries, queries, BLOCK_ROWS, ACC_DTYPE
    )
    row_scale = weight * tl.load(scale_ptr).to(ACC_DTYPE)  # scale = -grad_output / denominator
    for start in range(0, keys, BLOCK_K):
        student, target, offsets, mask = _tile(
            student_ptr, teacher_ptr, rows, row_mask, start, keys, eps, BLOCK_K, ACC_DTYPE
        )
        grad = target / (student + eps) * row_scale[:, None]
        tl.store(grad_ptr + offsets, cast_output(grad, grad_ptr.dtype.element_ty), mask=mask)


def _launch(student: torch.Tensor, block_k: int | None) -> tuple[int, int, int, int, int, dict]:
    """(rows, keys, heads x queries, queries, programs, constexprs) for maps (B, A, S, K)."""
    _batch, heads, queries, keys = student.shape
    rows = student.numel() // keys if keys else 0
    block_k = block_k or min(triton.next_power_of_2(max(keys, 1)), MAX_BLOCK_K)
    block_rows = max(1, TILE_ELEMENTS // block_k)
    constexprs = {"BLOCK_ROWS": block_rows, "BLOCK_K": block_k, "num_warps": NUM_WARPS}
    return rows, keys, heads * queries, queries, triton.cdiv(rows, block_rows), constexprs


def attention_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, eps: float, *, block_k: int | None = None
) -> torch.Tensor:
    """loss_sum (0-dim, fp32 or fp64 for fp64 maps) of contiguous (B, A, S, K) maps; ``weight`` (B*S,) per query.
    ``block_k`` overrides the key chunk (tests walk rows in several chunks with it)."""
    tl_dtype, acc_dtype = accumulator_dtypes(student.dtype)
    rows, keys, heads_queries, queries, programs, constexprs = _launch(student, block_k)
    if rows == 0 or keys == 0:
        return torch.zeros((), dtype=acc_dtype, device=student.device)
    partial = torch.empty(programs, dtype=acc_dtype, device=student.device)
    with on_device(student):
        _forward_kernel[(programs,)](
            student, teacher, weight, partial, rows, keys, heads_queries, queries, EPS=eps, ACC_DTYPE=tl_dtype,
            **constexprs,
        )  # fmt: skip
    return partial.sum()


def attention_kl_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    *,
    block_k: int | None = None,
) -> torch.Tensor:
    """The gradient of ``scale * loss_sum`` with respect to ``student`` (its dtype and shape); ``scale`` is a
    one-element tensor on the maps' device."""
    tl_dtype, _acc_dtype = accumulator_dtypes(student.dtype)
    rows, keys, heads_queries, queries, programs, constexprs = _launch(student, block_k)
    grad = torch.empty_like(student)
    if rows == 0 or keys == 0:
        return grad
    with on_device(student):
        _backward_kernel[(programs,)](
            student, teacher, weight, scale, grad, rows, keys, heads_queries, queries, EPS=eps, ACC_DTYPE=tl_dtype,
            **constexprs,
        )  # fmt: skip
    return grad
