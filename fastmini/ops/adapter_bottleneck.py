"""The bottleneck adapter: ``LayerNorm(x + Up(GELU(Down(x))))`` (SPEC.md, Model 4).

Down is H -> H/r, Up is H/r -> H, GELU is exact (erf). ``adapter_bottleneck_ref`` is the
oracle for kernels, the CPU path and the benchmark baseline.

The Triton backend is a pair of ``torch.library`` custom ops (forward, backward) joined by
``register_autograd``, so autocast and torch.compile see one opaque op each; its kernels live in
``fastmini.kernels.adapter_bottleneck`` and are imported only when the backend runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.add_layer_norm import add_layer_norm
from fastmini.ops.autocasting import autocast_upcasts_layer_norm
from fastmini.ops.checks import (
    accumulator_dtype,
    all_in,
    cast_to,
    check_eps,
    check_features,
    check_parameter,
    check_tensor,
)
from fastmini.ops.dispatch import in_cuda_graph_recording, resolve_backend

_OP = "adapter_bottleneck"

# Backends whose kernels have passed their tests on a GPU (tests/test_adapter_bottleneck_kernel.py, H200,
# 2026-11-26); only those can be auto-selected for CUDA tensors, and only where _triton_pays_off_on_gpu.
_VERIFIED_ON_GPU: tuple[str, ...] = ("triton",)
# Inside a CUDA graph the forward kernel beats torch's composition up to this many rows and from the next
# constant on; in between, torch's (see _triton_pays_off_on_gpu).
TRITON_MAX_FEW_ROWS_ON_GPU = 2048
TRITON_MIN_ROWS_ON_GPU = 16384


def adapter_bottleneck_ref(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    bottleneck = F.gelu(F.linear(x, down_weight, down_bias))
    return F.layer_norm(x + F.linear(bottleneck, up_weight, up_bias), norm_weight.shape, norm_weight, norm_bias, eps)


@torch.library.custom_op("fastmini::adapter_bottleneck_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y shaped like x, and for backward: mean, rstd (rows,) and the bottleneck before GELU h (rows, R) in
    fp32 (fp64 for fp64 x); these three are empty when ``save_for_backward`` is False)."""
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_forward

    return adapter_bottleneck_forward(
        x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps, save_for_backward
    )


@_forward_op.register_fake
def _forward_fake(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps, save_for_backward):
    saved_rows = x.numel() // x.shape[-1] if save_for_backward else 0
    bottleneck = down_weight.shape[0] if save_for_backward else 0
    accumulator = accumulator_dtype(x.dtype)
    return (
        x.new_empty(x.shape),
        x.new_empty((saved_rows,), dtype=accumulator),
        x.new_empty((saved_rows,), dtype=accumulator),
        x.new_empty((saved_rows, bottleneck), dtype=accumulator),
    )


@torch.library.custom_op("fastmini::adapter_bottleneck_backward", mutates_args=())
def _backward_op(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias), each in its input's
    dtype, from the forward's saved h, mean and rstd."""
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_backward

    return adapter_bottleneck_backward(
        grad_output, x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, h, mean, rstd
    )


@_backward_op.register_fake
def _backward_fake(grad_output, x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, h, mean, rstd):
    return tuple(t.new_empty(t.shape) for t in (x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias))


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, _eps, save_for_backward = inputs
    _y, mean, rstd, h = output
    # Nobody differentiates through the saved values: without materialize_grads off, autograd would make zero
    # gradients of shapes (rows,), (rows,) and (rows, R) for them on every backward.
    ctx.mark_non_differentiable(mean, rstd, h)
    ctx.set_materialize_grads(False)
    ctx.kept_for_backward = save_for_backward
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, h, mean, rstd)


def _backward(ctx, grad_output, _grad_mean, _grad_rstd, _grad_h):
    if not ctx.kept_for_backward:
        raise RuntimeError(
            "fastmini::adapter_bottleneck_forward ran with save_for_backward=False, so it kept nothing for backward"
        )
    if grad_output is None:  # y took no part in what was differentiated
        return (None,) * 9
    return (*_backward_op(grad_output, *ctx.saved_tensors), None, None)


torch.library.register_autograd("fastmini::adapter_bottleneck_forward", _backward, setup_context=_setup_context)


def _check_inputs(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    op: str = _OP,
) -> None:
    """``op``: the public op whose arguments these are, named in the errors."""
    hidden = check_features(op, x)
    device = x.device
    check_tensor(op, "down_weight", down_weight, device)
    if down_weight.dim() != 2 or down_weight.shape[0] == 0 or down_weight.shape[1] != hidden:
        raise ValueError(
            f"{op}: down_weight must be (R, H) = (R, {hidden}) with R > 0 (nn.Linear layout), "
            f"got {tuple(down_weight.shape)}"
        )
    bottleneck = down_weight.shape[0]
    check_parameter(op, "down_bias", down_bias, (bottleneck,), device)
    check_parameter(op, "up_weight", up_weight, (hidden, bottleneck), device)
    check_parameter(op, "up_bias", up_bias, (hidden,), device)
    check_parameter(op, "norm_weight", norm_weight, (hidden,), device)
    check_parameter(op, "norm_bias", norm_bias, (hidden,), device)
    check_eps(op, eps)


def _adapter_bottleneck_torch(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    norm_backend: str | None = "torch",
    low_precision: bool = False,
) -> torch.Tensor:
    """The oracle's ops, with parameters of another dtype than x cast to it as the kernels do (F.linear needs one
    dtype); its closing residual + LayerNorm is add_layer_norm's, through ``norm_backend`` (None: that op's own
    automatic choice, its fused kernel while a CUDA graph is recorded), as is ``low_precision``."""
    dtype = x.dtype
    if not all_in(dtype, down_weight, down_bias, up_weight, up_bias):
        down_weight, down_bias, up_weight, up_bias = (
            cast_to(t, dtype) for t in (down_weight, down_bias, up_weight, up_bias)
        )
    branch = F.linear(F.gelu(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    return add_layer_norm(
        branch, x, norm_weight, norm_bias, eps, backend=norm_backend, check_inputs=False, low_precision=low_precision
    )


def _adapter_bottleneck_triton(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
    # Inference writes y only; training also keeps mean, rstd and h (R values a row) for the backward.
    save_for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *parameters))
    y, _mean, _rstd, _h = _forward_op(x, *parameters, float(eps), save_for_backward)
    return y


_BACKENDS = {"torch": _adapter_bottleneck_torch, "triton": _adapter_bottleneck_triton}


def _triton_pays_off_on_gpu(x: torch.Tensor) -> bool:
    """Measured on an H200 (bf16, H=768, R=48, forward in a CUDA graph, benchmarks/launch_overhead.py,
    2026-11-26, with the whole-row tiles of small inputs): the kernel takes 9.1 / 9.3 / 9.8 / 17.9 / 30.4 /
    39.7 us at 128 / 1024 / 2048 / 4096 / 8192 / 16384 rows. Torch's composition, which when chosen
    automatically ends in add_layer_norm's fused kernel (see adapter_bottleneck), takes its five kernels'
    12.4 / 15.4 / 18.7 / 25.0 / 42.6 / 83.9 us less what that fused kernel saves over torch's add and
    LayerNorm in the same table (2.3 / 2.9 / 4.6 / 7.7 / 18.3 / 31.5 us): 10.1 / 12.5 / 14.1 / 17.4 / 24.3 /
    52.4 us. So, recorded into a CUDA graph: the kernel up to TRITON_MAX_FEW_ROWS_ON_GPU rows and from
    TRITON_MIN_ROWS_ON_GPU on, torch's composition in between. Eagerly, torch: a call costs the host ~180 us
    against ~105 us, and forward+backward takes 1.1x torch's GPU time at 16384 rows. Not under CUDA autocast,
    whose LayerNorm returns fp32 (ops.autocasting.autocast_upcasts_layer_norm)."""
    if not in_cuda_graph_recording() or autocast_upcasts_layer_norm(x):
        return False
    rows = x.numel() // x.shape[-1]
    return rows <= TRITON_MAX_FEW_ROWS_ON_GPU or rows >= TRITON_MIN_ROWS_ON_GPU


def adapter_bottleneck(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    backend: str | None = None,
    *,
    check_inputs: bool = True,
    low_precision: bool = False,
) -> torch.Tensor:
    """``LayerNorm(x + Up(GELU(Down(x))))`` over the last dimension of ``x`` (..., H).

    Parameters are (R, H), (R,), (H, R), (H,), (H,), (H,) on x's device (no bias may be None); one in another
    floating dtype than x is used in x's dtype, as under autocast. ``eps`` is a Python float > 0. Misuse is a
    ValueError or TypeError naming the argument, whichever backend runs.

    ``check_inputs=False`` skips the argument checks (a few microseconds a call): for callers whose parameters
    fit x by construction, such as fastmini's own modules on the recursion's hot path.
    ``low_precision``: add_layer_norm's (the output in x's dtype under autocast too; the kernel's always is).
    """
    if check_inputs:
        _check_inputs(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
    chosen = resolve_backend(_OP, x, backend, _BACKENDS, _VERIFIED_ON_GPU, _triton_pays_off_on_gpu)
    parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
    if chosen == "torch":
        # The composition's add_layer_norm is asked for what this op was asked for: torch by name stays torch;
        # chosen automatically, it makes its own choice (in a CUDA graph of a small batch, its fused kernel).
        return _adapter_bottleneck_torch(x, *parameters, eps, norm_backend=backend, low_precision=low_precision)
    return _BACKENDS[chosen](x, *parameters, eps)
