"""The FFN up-projection with its bias and GELU: ``GELU(x @ W^T + b)``.

``approximate="none"`` is the exact erf GELU (config ``hidden_act="gelu"``), ``"tanh"`` the
tanh approximation (``"gelu_new"``).

The Triton backend is a pair of ``torch.library`` custom ops (forward, backward) over the host
launchers of ``fastmini.kernels.linear_gelu``, so that autocast, torch.compile and autograd see one
opaque op; the kernel module is imported only when the op first runs. Which of the kernel module's
two code paths runs ("bias_gelu": cuBLAS + one fused bias-GELU kernel, the default; "fused_gemm":
one Triton GEMM with the epilogue fused) is the launcher's choice, not this op's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastmini.ops.autocasting import autocast_dtype_for
from fastmini.ops.checks import all_in, cast_to, check_parameter, check_tensor
from fastmini.ops.dispatch import choose

_OP = "linear_gelu"

GELU_APPROXIMATIONS = ("none", "tanh")

# Backends whose kernels have passed tests/test_linear_gelu_kernel.py on a GPU (H200, 2026-11-26).
_VERIFIED_ON_GPU: tuple[str, ...] = ("triton",)


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


@torch.library.custom_op("fastmini::linear_gelu_forward", mutates_args=())
def _linear_gelu_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str,
    save_pre: bool,
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, H), weight (I, H), bias (I,) -> (y, pre): y = gelu(x @ W^T + b) and pre = x @ W^T, both
    (M, I) in x's dtype; pre is empty unless ``save_pre``. ``path=None`` is the launcher's default."""
    from fastmini.kernels import linear_gelu as kernels

    return kernels.linear_gelu_forward(x, weight, bias, approximate, save_pre=save_pre, path=path)


@_linear_gelu_forward.register_fake
def _(x, weight, bias, approximate, save_pre, path=None):
    rows, intermediate = x.shape[0], weight.shape[0]
    return x.new_empty((rows, intermediate)), x.new_empty((rows, intermediate) if save_pre else (0,))


@torch.library.custom_op("fastmini::linear_gelu_backward", mutates_args=())
def _linear_gelu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pre: torch.Tensor,
    approximate: str,
    needs_input_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db), each in its own input's dtype; a gradient not asked for is an empty tensor
    (custom ops cannot return None)."""
    from fastmini.kernels import linear_gelu as kernels

    grads = kernels.linear_gelu_backward(
        grad_y, x, weight, bias, pre, approximate, needs_input_grad, needs_weight_grad, needs_bias_grad
    )
    return tuple(
        grad if grad is not None else like.new_empty((0,)) for grad, like in zip(grads, (x, weight, bias), strict=True)
    )


@_linear_gelu_backward.register_fake
def _(grad_y, x, weight, bias, pre, approximate, needs_input_grad, needs_weight_grad, needs_bias_grad):
    needed = (needs_input_grad, needs_weight_grad, needs_bias_grad)
    # Contiguous whatever the strides of x and weight (a transposed view, a tied weight): the real
    # gradients are fresh matmul results, and inductor checks the fake strides against them.
    return tuple(
        like.new_empty(like.shape) if need else like.new_empty((0,))
        for need, like in zip(needed, (x, weight, bias), strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, _save_pre, _path = inputs
    _y, pre = output
    ctx.save_for_backward(x, weight, bias, pre)
    ctx.approximate = approximate
    # pre is a by-product for the backward, not a result: no gradient flows into it, and none is
    # materialised as an (M, I) tensor of zeros either.
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_pre):
    x, weight, bias, pre = ctx.saved_tensors
    needs_input_grad, needs_weight_grad, needs_bias_grad = ctx.needs_input_grad[:3]
    if grad_y is None or not (needs_input_grad or needs_weight_grad or needs_bias_grad):
        return None, None, None, None, None, None
    if pre.numel() != x.shape[0] * weight.shape[0]:
        raise RuntimeError(
            "linear_gelu: the forward ran with save_pre=False, so there is no pre-activation to backpropagate through"
        )
    grad_x, grad_weight, grad_bias = _linear_gelu_backward(
        grad_y, x, weight, bias, pre, ctx.approximate, needs_input_grad, needs_weight_grad, needs_bias_grad
    )
    return (
        grad_x if needs_input_grad else None,
        grad_weight if needs_weight_grad else None,
        grad_bias if needs_bias_grad else None,
        None,
        None,
        None,
    )


_linear_gelu_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> None:
    check_tensor(_OP, "x", x)
    check_tensor(_OP, "weight", weight, x.device)
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D (intermediate, hidden), got shape {tuple(weight.shape)}")
    intermediate, hidden = weight.shape
    if x.dim() < 1 or x.shape[-1] != hidden:
        raise ValueError(
            f"{_OP}: x's last dimension must be the weight's hidden size {hidden} "
            f"(weight is (intermediate, hidden) = {tuple(weight.shape)}), got x of shape {tuple(x.shape)}"
        )
    check_parameter(_OP, "bias", bias, (intermediate,), x.device)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"{_OP}: approximate must be one of {GELU_APPROXIMATIONS}, got '{approximate}'")


def _linear_gelu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """The oracle, with weight and bias of another dtype than x cast to it as the kernels do (F.linear needs one)."""
    if all_in(x.dtype, weight, bias):
        return linear_gelu_ref(x, weight, bias, approximate)
    return linear_gelu_ref(x, cast_to(weight, x.dtype), cast_to(bias, x.dtype), approximate)


def _autocast_activation(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype inside an autocast region (custom ops are not cast by autocast itself).
    Only the activation is cast: the kernels cast an fp32 weight for the GEMM and keep the bias in
    fp32 for the epilogue, and the weight gradients come back in fp32."""
    return x.to(autocast_dtype_for(x))


def _linear_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    x = _autocast_activation(x)
    # Inference needs no pre-activation: the launcher then skips writing it (or writes y over it).
    save_pre = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: ambiguous for H = 0, which the op takes
    y, _pre = _linear_gelu_forward(rows, weight, bias, approximate, save_pre)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_BACKENDS = {"torch": _linear_gelu_torch, "triton": _linear_gelu_triton}


def _triton_pays_off_on_gpu(x: torch.Tensor) -> bool:
    """Never, as measured on an H200 (rows 1024 and 16384, H=768, I=3072, bf16 and fp32): neither path beats
    F.linear + F.gelu. Speed against torch's, in GPU time: "bias_gelu" (cuBLAS + the fused bias-GELU kernel)
    0.88x-1.04x forward, 0.90x-1.01x forward+backward; "fused_gemm" (Triton GEMM, GELU in its epilogue)
    0.43x-0.88x. cuBLAS already fuses the bias and torch's GELU is one elementwise pass, so there is
    little left to fuse; the kernels stay for backend="triton" and as a base for an epilogue-fused
    down-projection."""
    return False


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
    backend: str | None = None,
    *,
    check_inputs: bool = True,
) -> torch.Tensor:
    """``GELU(x @ weight^T + bias)`` with ``approximate`` in ``("none", "tanh")``.

    x is (..., H), weight (I, H), bias (I,) (not None), all on one device; a weight or bias in another floating
    dtype than x is used in x's dtype, as under autocast. Misuse is a ValueError or TypeError naming the
    argument, whichever backend runs.

    ``check_inputs=False`` skips the argument checks (a few microseconds a call): for callers whose parameters
    fit x by construction, such as fastmini's own modules on the recursion's hot path.
    """
    if check_inputs:
        _check_inputs(x, weight, bias, approximate)
    implementation = choose(
        _OP, x, backend, _BACKENDS, verified_on_gpu=_VERIFIED_ON_GPU, pays_off_on_gpu=_triton_pays_off_on_gpu
    )
    return implementation(x, weight, bias, approximate)
