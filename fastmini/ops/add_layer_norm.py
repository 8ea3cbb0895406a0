"""Residual add (with dropout on the branch in training) followed by LayerNorm.

``add_layer_norm(x, residual) = LayerNorm(residual + Dropout(x))``: the closing step of both
halves of the shared layer (attention output + adapter output, FFN output + its input).

The Triton backend is a pair of ``torch.library`` custom ops (forward, backward) so that
autocast and torch.compile see one opaque op each; its kernels live in
``fastmini.kernels.add_layer_norm`` and are imported only when the backend runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.autocasting import autocast_upcasts_layer_norm
from fastmini.ops.checks import (
    accumulator_dtype,
    all_in,
    check_eps,
    check_features,
    check_parameter,
    check_probability,
    check_tensor,
    layer_norm_parameters,
)
from fastmini.ops.dispatch import choose, in_cuda_graph_recording

_OP = "add_layer_norm"

# Backends whose kernels have passed their tests on a GPU (tests/test_add_layer_norm_kernel.py, H200,
# 2026-11-26); only those can be auto-selected for CUDA tensors, and only where _triton_pays_off_on_gpu.
_VERIFIED_ON_GPU: tuple[str, ...] = ("triton",)
# Dropout seeds: 63 bits (Philox's key takes 64), so that the ~10^6 masks of a long training run do not repeat
# (31-bit seeds gave ~1300 pairs of identical masks in 2.4M calls, by the birthday bound); always above int32's range
# so the kernels see one argument type and compile once.
_SEED_RANGE = (2**32, 2**63 - 1)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p, training=True)
    return F.layer_norm(residual + x, weight.shape, weight, bias, eps)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """(rows, H) view, all leading dimensions flattened."""
    return tensor.contiguous().view(-1, tensor.shape[-1])


@torch.library.custom_op("fastmini::add_layer_norm_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    keep_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out shaped like x, sum (rows, H) or empty, mean (rows,), rstd (rows,)); seed is a 0-dim CPU int64.

    out and sum have the promoted dtype of x and residual; mean and rstd are fp32 (fp64 for fp64).
    """
    from fastmini.kernels.add_layer_norm import add_layer_norm_forward

    out, total, mean, rstd = add_layer_norm_forward(
        _rows(x), _rows(residual), weight.contiguous(), bias.contiguous(), eps, dropout_p, _seed_value(seed), keep_sum
    )
    return out.view(x.shape), total, mean, rstd


@_forward_op.register_fake
def _forward_fake(x, residual, weight, bias, eps, dropout_p, seed, keep_sum):
    hidden = x.shape[-1]
    n_rows = x.numel() // hidden
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    total_shape = (n_rows, hidden) if keep_sum else (0,)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(total_shape, dtype=out_dtype),
        x.new_empty((n_rows,), dtype=accumulator_dtype(out_dtype)),
        x.new_empty((n_rows,), dtype=accumulator_dtype(out_dtype)),
    )


@torch.library.custom_op("fastmini::add_layer_norm_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    total: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_sum (rows, H), grad_x (rows, H) or empty without dropout, grad_weight, grad_bias in mean's dtype)."""
    from fastmini.kernels.add_layer_norm import add_layer_norm_backward

    return add_layer_norm_backward(
        _rows(grad_out), total, weight.contiguous(), mean, rstd, dropout_p, _seed_value(seed)
    )


@_backward_op.register_fake
def _backward_fake(grad_out, total, weight, mean, rstd, dropout_p, seed):
    hidden = total.shape[-1]
    return (
        torch.empty_like(total),
        torch.empty_like(total) if dropout_p > 0.0 else total.new_empty((0,)),
        total.new_empty((hidden,), dtype=mean.dtype),
        total.new_empty((hidden,), dtype=mean.dtype),
    )


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, dropout_p, seed, keep_sum = inputs
    _out, total, mean, rstd = output
    # Nobody differentiates through the saved statistics; without these two lines autograd
    # would materialise a zero (rows, H) gradient for the sum on every backward.
    ctx.mark_non_differentiable(total, mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(total, weight, mean, rstd, seed)
    ctx.keep_sum = keep_sum
    ctx.dropout_p = dropout_p
    ctx.shape = x.shape
    ctx.dtypes = (x.dtype, residual.dtype, weight.dtype, bias.dtype)


def _backward(ctx, grad_out, _no_grad_total, _no_grad_mean, _no_grad_rstd):
    if not ctx.keep_sum:
        raise RuntimeError("fastmini::add_layer_norm_forward ran with keep_sum=False, so it kept nothing for backward")
    if grad_out is None:
        return (None,) * 8
    total, weight, mean, rstd, seed = ctx.saved_tensors
    grad_sum, grad_x, grad_weight, grad_bias = _backward_op(grad_out, total, weight, mean, rstd, ctx.dropout_p, seed)
    x_dtype, residual_dtype, weight_dtype, bias_dtype = ctx.dtypes
    grad_residual = grad_sum.view(ctx.shape).to(residual_dtype)
    # Without dropout d(x) is d(residual): one tensor, written once, handed to both inputs as the same
    # object when their dtypes agree. Two view objects of it would not do: autograd would take both as
    # the .grad of leaf inputs without copying, and every later accumulation into one would add into the
    # other as well. (With dtypes that differ, each gets its own cast of the full-precision gradient.)
    if ctx.dropout_p == 0.0:
        grad_x = grad_residual if x_dtype == residual_dtype else grad_sum.view(ctx.shape).to(x_dtype)
    else:
        grad_x = grad_x.view(ctx.shape).to(x_dtype)
    return (
        grad_x,
        grad_residual,
        grad_weight.to(weight_dtype),
        grad_bias.to(bias_dtype),
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("fastmini::add_layer_norm_forward", _backward, setup_context=_setup_context)


def _check_inputs(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    op: str = _OP,
) -> None:
    """``op``: the public op whose arguments these are, named in the errors."""
    hidden = check_features(op, x)
    device = x.device
    check_tensor(op, "residual", residual, device)
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_parameter(op, "weight", weight, (hidden,), device)
    check_parameter(op, "bias", bias, (hidden,), device)
    check_eps(op, eps)
    check_probability(op, "dropout_p", dropout_p)


def _add_layer_norm_torch(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    low_precision: bool = False,
) -> torch.Tensor:
    """The oracle, with weight and bias in the dtype of the sum where F.layer_norm would refuse theirs."""
    if low_precision and torch.is_autocast_enabled(x.device.type):
        # Outside autocast, whose policy computes a LayerNorm in fp32 and returns it so: the sum in the inputs'
        # (promoted) dtype, the statistics in fp32 inside torch's kernel, the output rounded once to that dtype.
        with torch.autocast(x.device.type, enabled=False):
            return _add_layer_norm_torch(x, residual, weight, bias, eps, dropout_p)
    if all_in(x.dtype, residual, weight, bias):
        return add_layer_norm_ref(x, residual, weight, bias, eps, dropout_p)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return add_layer_norm_ref(x, residual, *layer_norm_parameters(weight, bias, dtype), eps, dropout_p)


def _add_layer_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    low_precision: bool = False,  # the kernel's output is always in the inputs' dtype
) -> torch.Tensor:
    # Drawn from torch's default CPU generator, so torch.manual_seed makes the mask reproducible;
    # a tensor rather than an int so torch.compile traces the draw instead of freezing one value.
    seed = torch.randint(*_SEED_RANGE, (), dtype=torch.int64, device="cpu") if dropout_p > 0.0 else None
    keep_sum = torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight, bias))
    out, _total, _mean, _rstd = _forward_op(x, residual, weight, bias, eps, dropout_p, seed, keep_sum)
    return out


_BACKENDS = {"torch": _add_layer_norm_torch, "triton": _add_layer_norm_triton}


def _triton_pays_off_on_gpu(x: torch.Tensor) -> bool:
    """Measured on an H200 (bf16, H=768): the kernel's GPU time is 0.55x torch's add + LayerNorm at 128 rows,
    0.51x at 1024, 0.42x at 16384, but a call costs the host ~155 us against ~28 us. So: while a CUDA graph
    is recorded (host cost paid once); eagerly, torch (see fastmini/ops/dispatch.py). Not under CUDA autocast,
    whose LayerNorm returns fp32 (ops.autocasting.autocast_upcasts_layer_norm)."""
    return in_cuda_graph_recording() and not autocast_upcasts_layer_norm(x)


def _kernel_takes(x: torch.Tensor) -> bool:
    """The kernels keep a whole row on chip: H up to their MAX_HIDDEN. (Asked only where the automatic choice
    would run them, so importing their module here costs nothing it would not.)"""
    from fastmini.kernels.add_layer_norm import MAX_HIDDEN

    return x.shape[-1] <= MAX_HIDDEN


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    backend: str | None = None,
    *,
    check_inputs: bool = True,
    low_precision: bool = False,
) -> torch.Tensor:
    """``LayerNorm(residual + Dropout_p(x))`` over the last dimension of x (..., H).

    Dropout is applied whenever ``dropout_p > 0``, with or without grad: training is signalled by the caller
    passing its dropout probability, ``dropout_p=0`` outside training. residual has x's shape (no broadcasting),
    weight and bias are (H,) on x's device; the output has the promoted dtype of x and residual. ``eps`` is a
    Python float > 0, ``dropout_p`` one in [0, 1). Misuse is a ValueError or TypeError naming the argument,
    whichever backend runs.

    ``check_inputs=False`` skips the argument checks (a few microseconds a call): for callers whose parameters
    fit x by construction, such as fastmini's own modules on the recursion's hot path.

    ``low_precision``: under autocast, the output stays in the inputs' (promoted) dtype, as the Triton kernel's
    always does, rather than autocast's fp32 for a LayerNorm (the statistics are fp32 either way); without
    autocast it changes nothing.
    """
    if check_inputs:
        _check_inputs(x, residual, weight, bias, eps, dropout_p)
    implementation = choose(
        _OP, x, backend, _BACKENDS, _VERIFIED_ON_GPU, _triton_pays_off_on_gpu, kernel_takes=_kernel_takes
    )
    return implementation(x, residual, weight, bias, eps, dropout_p, low_precision)
