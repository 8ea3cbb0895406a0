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
from fastmini.ops.checks import (
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
# Below this many rows the forward kernel's GPU time is no better than torch's five kernels (see below).
TRITON_MIN_ROWS_ON_GPU = 8192


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


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    accumulator = _accumulator_dtype(x.dtype)
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
    ctx.mark_non_differentiable(mean, rstd, h)
    ctx.kept_for_backward = save_for_backward
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, h, mean, rstd)


def _backward(ctx, grad_output, _grad_mean, _grad_rstd, _grad_h):
    if not ctx.kept_for_backward:
        raise RuntimeError(
            "fastmini::adapter_bottleneck_forward ran with save_for_backward=False, so it kept nothing for backward"
        )
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
) -> None:
    hidden = check_features(_OP, x)
    device = x.device
    check_tensor(_OP, "down_weight", down_weight, device)
    if down_weight.dim() != 2 or down_weight.shape[0] == 0 or down_weight.shape[1] != hidden:
        raise ValueError(
            f"{_OP}: down_weight must be (R, H) = (R, {hidden}) with R > 0 (nn.Linear layout), "
            f"got {tuple(down_weight.shape)}"
        )
    bottleneck = down_weight.shape[0]
    check_parameter(_OP, "down_bias", down_bias, (bottleneck,), device)
    check_parameter(_OP, "up_weight", up_weight, (hidden, bottleneck), device)
    check_parameter(_OP, "up_bias", up_bias, (hidden,), device)
    check_parameter(_OP, "norm_weight", norm_weight, (hidden,), device)
    check_parameter(_OP, "norm_bias", norm_bias, (hidden,), device)
    check_eps(_OP, eps)


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
) -> torch.Tensor:
    """The oracle's ops, with parameters of another dtype than x cast to it as the kernels do (F.linear needs one
    dtype); its closing residual + LayerNorm is add_layer_norm's, through ``norm_backend`` (None: that op's own
    automatic choice, its fused kernel while a CUDA graph is recorded)."""
    dtype = x.dtype
    if not all_in(dtype, down_weight, down_bias, up_weight, up_bias):
        down_weight, down_bias, up_weight, up_bias = (
            cast_to(t, dtype) for t in (down_weight, down_bias, up_weight, up_bias)
        )
    branch = F.linear(F.gelu(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    return add_layer_norm(branch, x, norm_weight, norm_bias, eps, backend=norm_backend, check_inputs=False)


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
    """Measured on an H200 (bf16, H=768, R=48, forward in a CUDA graph): the kernel takes 1.40x torch's GPU time
    at 128 rows, 1.15x at 1024, 0.96x at 2048, 0.99x at 4096, 0.82x at 8192, 0.53x at 16384 (each program
    walks its rows' H in sequence: a latency floor of ~17 us); a call costs the host ~200 us against ~115 us;
    forward+backward takes 1.2x torch's GPU time at 16384 rows. So: inference recorded into a CUDA graph,
    from TRITON_MIN_ROWS_ON_GPU rows on; eagerly, torch. (Below that, recorded, torch's composition still ends
    in add_layer_norm's fused kernel: see adapter_bottleneck.)"""
    return in_cuda_graph_recording() and x.numel() >= TRITON_MIN_ROWS_ON_GPU * x.shape[-1]


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
) -> torch.Tensor:
    """``LayerNorm(x + Up(GELU(Down(x))))`` over the last dimension of ``x`` (..., H).

    Parameters are (R, H), (R,), (H, R), (H,), (H,), (H,) on x's device (no bias may be None); one in another
    floating dtype than x is used in x's dtype, as under autocast. ``eps`` is a Python float > 0. Misuse is a
    ValueError or TypeError naming the argument, whichever backend runs.

    ``check_inputs=False`` skips the argument checks (a few microseconds a call): for callers whose parameters
    fit x by construction, such as fastmini's own modules on the recursion's hot path.
    """
    if check_inputs:
        _check_inputs(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
    chosen = resolve_backend(_OP, x, backend, _BACKENDS, _VERIFIED_ON_GPU, _triton_pays_off_on_gpu)
    parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
    if chosen == "torch":
        # The composition's add_layer_norm is asked for what this op was asked for: torch by name stays torch;
        # chosen automatically, it makes its own choice (in a CUDA graph of a small batch, its fused kernel).
        return _adapter_bottleneck_torch(x, *parameters, eps, norm_backend=backend)
    return _BACKENDS[chosen](x, *parameters, eps)
