"""KL(teacher || student) of attention maps over the query rows of real tokens: the distillation's attention loss.

``attention_kl_sum(student, teacher, rows, denominator)`` is
``sum(rows * t' (log t' - log(s + eps))) / denominator`` with t' = t + eps (SPEC.md: kl_div(log(s + 1e-12),
t + 1e-12)), over (B, A, S, K) maps and per-query weights ``rows`` (B, S). fastmini.distill.losses builds
the recipe's term on it (which rows, which denominator).

Backends: "torch" (an autograd Function that saves nothing new: the student map is kept by the attention's
own backward, the teacher's is only read, and may be an inference tensor) and "triton" (two kernels that
read each map once per pass: fastmini.kernels.attention_kl). Automatic is triton on CUDA (H200, 48 x 12 x 256
x 256: 1/6.1 of torch's GPU time with an fp32 student map, 1/9.2 with bf16), torch elsewhere (triton on CPU
tensors under TRITON_INTERPRET=1; torch under torch.compile, jit.trace and export); ``backend=`` or
``FASTMINI_BACKEND`` chooses.
Both are autograd Functions rather than torch.library custom ops: the loss is never compiled or exported.
"""

from __future__ import annotations

import math

import torch

from fastmini.ops.checks import HeldTarget, accumulator_dtype, check_loss_inputs, check_tensor
from fastmini.ops.dispatch import choose

_OP = "attention_kl"
ATTENTION_EPS = 1e-12  # SPEC.md: kl_div(log(s + 1e-12), t + 1e-12)
# Backends whose kernels have passed their tests on a GPU (H200, 2026-11-26, benchmarks/results/*-session-11.md).
_VERIFIED_ON_GPU: tuple[str, ...] = ("triton",)


def attention_kl_sum_ref(
    student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, denominator: float
) -> torch.Tensor:
    """The formula as written, differentiable by autograd: the oracle of both backends."""
    dtype = accumulator_dtype(student.dtype)
    target = teacher.to(dtype) + ATTENTION_EPS
    pointwise = target * (target.log() - (student.to(dtype) + ATTENTION_EPS).log())
    return (pointwise * rows.to(dtype)[:, None, :, None]).sum() / denominator


class _TorchAttentionKL(torch.autograd.Function):
    """d/ds of t' (log t' - log(s + eps)) is -t' / (s + eps): backward needs s and t only. Both are read in fp32
    (fp64 stays fp64) whatever their dtype, and only ``student`` as given is saved: under bf16 autocast an fp32
    copy of every map kept for backward would outweigh the maps themselves. Few passes over the maps: the
    logarithms in place, t' . log-ratio as one dot product per query row (no product map written), the row
    weights and the scale applied to (B, A, S) row sums forward and as one factor backward."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, denominator: float):
        dtype = accumulator_dtype(student.dtype)
        weights = rows.to(dtype)[:, None, :]  # (B, 1, S): a weight per query row
        target = teacher.to(dtype) + ATTENTION_EPS
        log_ratio = target.log()
        log_ratio -= (student.to(dtype) + ATTENTION_EPS).log_()
        with torch.autocast(student.device.type, enabled=False):  # vecdot is on autocast's 16-bit list
            row_sums = torch.linalg.vecdot(target, log_ratio)  # (B, A, S)
        ctx.save_for_backward(student, weights)
        ctx.teacher = HeldTarget(_OP, teacher)  # read in backward, not saved through autograd
        ctx.denominator = denominator
        return (row_sums * weights).sum() / denominator

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, weights = ctx.saved_tensors
        target = ctx.teacher.get().to(weights.dtype) + ATTENTION_EPS
        factor = (weights * (-grad_output / ctx.denominator))[..., None]  # (B, 1, S, 1)
        grad = target.div_(student.to(weights.dtype) + ATTENTION_EPS).mul_(factor)
        return grad.to(student.dtype), None, None, None


class _TritonAttentionKL(torch.autograd.Function):
    """The same through fastmini.kernels.attention_kl; saves the student map and the query weights. The kernels
    read contiguous maps (the attention's own are): others are copied first, and the copies kept for backward.
    Its backward is not differentiable again (second-order gradients: the torch backend)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, denominator: float):
        from fastmini.kernels.attention_kl import attention_kl_forward

        student, teacher = student.contiguous(), teacher.contiguous()
        weights = rows.to(accumulator_dtype(student.dtype)).contiguous().view(-1)
        ctx.save_for_backward(student, weights)
        ctx.teacher = HeldTarget(_OP, teacher)
        ctx.denominator = denominator
        return attention_kl_forward(student, teacher, weights, ATTENTION_EPS) / denominator

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        from fastmini.kernels.attention_kl import attention_kl_backward

        if torch.is_grad_enabled():  # a backward with create_graph=True: the kernels' gradient has no graph
            raise RuntimeError(f"{_OP}: the triton backend has no second derivative; use backend='torch'")

        student, weights = ctx.saved_tensors
        scale = (grad_output.to(weights.dtype) / -ctx.denominator).reshape(1)  # on the device: no host read
        return attention_kl_backward(student, ctx.teacher.get(), weights, ATTENTION_EPS, scale), None, None, None


_BACKENDS = {"torch": _TorchAttentionKL.apply, "triton": _TritonAttentionKL.apply}


def attention_kl_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    rows: torch.Tensor,
    denominator: float,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum(rows * t' (log t' - log(s + eps))) / denominator``, a 0-dim tensor in fp32 (fp64 for fp64 maps).

    ``student``/``teacher``: (B, A, S, K) probabilities, any float dtypes, on one device; gradients flow to
    ``student`` only (the teacher is a target: one that requires grad is refused); ``rows``: (B, S) weights of
    the query rows (1 for real tokens, 0 for padding), any dtype."""
    check_attention_maps(student, teacher, rows)
    return choose(_OP, student, backend, _BACKENDS, _VERIFIED_ON_GPU)(
        student, teacher, rows, _positive_number(denominator)
    )


def _positive_number(denominator: object) -> float:
    """``denominator`` as a finite float > 0 (a count: int, float, numpy scalar, 0-d tensor, SymInt), else one
    ValueError (0 or NaN gave inf or NaN)."""
    try:
        value = float(denominator) if not isinstance(denominator, (bool, str)) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{_OP}: denominator must be a finite number > 0, got {denominator!r}")
    return value


def check_attention_maps(student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor) -> None:
    """Shapes, dtypes and devices, never values (no host read), so that misuse is the same error on every backend."""
    check_tensor(_OP, "student", student)
    check_tensor(_OP, "teacher", teacher)
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{_OP}: rows must be a torch.Tensor, got {type(rows).__name__}")
    if student.dim() != 4 or teacher.shape != student.shape:
        raise ValueError(
            f"{_OP}: student and teacher must be (B, A, S, K) maps of one shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if rows.shape != (student.shape[0], student.shape[2]):
        raise ValueError(
            f"{_OP}: rows must be (B, S) = {(student.shape[0], student.shape[2])} like the maps' batch and queries, "
            f"got {tuple(rows.shape)}"
        )
    check_loss_inputs(_OP, "maps", student=student, rows=rows, teacher=teacher)
