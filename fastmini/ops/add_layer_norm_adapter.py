"""The shared layer's residual + LayerNorm and the bottleneck adapter after it as one op:
``Adapter(LayerNorm(residual + x))`` (SPEC.md, Model 3: ``m = MlpAdapter_i(LayerNorm_att(a + o))``, and across
recursions ``AttAdapter_i+1(LayerNorm_full(m + f))``).

``add_layer_norm_adapter_ref`` is the two oracles one after the other. The Triton backend, in inference, is one
kernel: either adapter forward (fastmini.kernels.adapter_bottleneck) reading its input as the LayerNorm of
residual + x chunk by chunk (kernels/adapter_pre_norm.py), so the normalised activation is never written and one
launch of the two goes (the (1, 128) latency forward has 2N - 1 = 11 such pairs; its add_layer_norm kernels took
2.3 us each on an H200, its launches ~1 us apart). Where autograd needs gradients, or x and the residual differ
in dtype, it is the two ops one after the other, each with its own backward: the fused forward keeps nothing a
backward could use. Dropout has no place here: the shared layer's add_layer_norm applies it in training only.

Not chosen on CUDA unless asked for by name (``_VERIFIED_ON_GPU`` is empty): its GPU tests passed on an H200
(session 20), but in the (1, 128) graph it was slower than the two ops (README, GPU measurements). On a CUDA
tensor only ``backend="triton"`` reaches the kernel; automatic, and FASTMINI_BACKEND=triton too, are the two ops
(each with its own choice, the latter's their kernels).
"""

from __future__ import annotations

import torch

from fastmini.ops.adapter_bottleneck import _check_inputs as _check_adapter_inputs
from fastmini.ops.adapter_bottleneck import _triton_pays_off_on_gpu as _adapter_kernel_pays_off_on_gpu
from fastmini.ops.adapter_bottleneck import adapter_bottleneck, adapter_bottleneck_ref
from fastmini.ops.add_layer_norm import _check_inputs as _check_add_layer_norm_inputs
from fastmini.ops.add_layer_norm import add_layer_norm, add_layer_norm_ref
from fastmini.ops.dispatch import resolve_backend

_OP = "add_layer_norm_adapter"
_BACKENDS = ("torch", "triton")
_VERIFIED_ON_GPU: tuple[str, ...] = ()


def add_layer_norm_adapter_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    adapter_eps: float,
) -> torch.Tensor:
    normalised = add_layer_norm_ref(x, residual, weight, bias, eps)
    adapter_parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
    return adapter_bottleneck_ref(normalised, *adapter_parameters, adapter_eps)


@torch.library.custom_op("fastmini::add_layer_norm_adapter_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    adapter_eps: float,
) -> torch.Tensor:
    """The fused inference forward (no autograd: the op routes calls that need gradients elsewhere)."""
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_forward

    parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
    y, _mean, _rstd, _h = adapter_bottleneck_forward(
        x, *parameters, adapter_eps, False, pre_norm=(residual, weight, bias, eps)
    )
    return y


@_forward_op.register_fake
def _forward_fake(x, residual, weight, bias, eps, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias,
                  adapter_eps):  # fmt: skip
    return x.new_empty(x.shape)


def _two_ops(x, residual, weight, bias, eps, adapter_parameters, adapter_eps, backend, low_precision=False):
    """add_layer_norm, then adapter_bottleneck, each through ``backend`` (None: its own automatic choice)."""
    normalised = add_layer_norm(
        x, residual, weight, bias, eps, backend=backend, check_inputs=False, low_precision=low_precision
    )
    return adapter_bottleneck(
        normalised, *adapter_parameters, adapter_eps, backend=backend, check_inputs=False, low_precision=low_precision
    )


def add_layer_norm_adapter(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    adapter_eps: float,
    backend: str | None = None,
    *,
    check_inputs: bool = True,
    low_precision: bool = False,
) -> torch.Tensor:
    """``adapter_bottleneck(add_layer_norm(x, residual, weight, bias, eps), down_weight, ..., adapter_eps)``.

    The arguments are those two ops' (add_layer_norm's first, without dropout; then the adapter's parameters and
    its LayerNorm's eps), with their rules; misuse is a ValueError or TypeError naming the argument and which of
    the two it belongs to. ``check_inputs`` and ``low_precision`` as in those ops.
    """
    adapter_parameters = (down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias)
    if check_inputs:
        _check_add_layer_norm_inputs(x, residual, weight, bias, eps, 0.0, op=f"{_OP} (its LayerNorm)")
        # the adapter's input, LayerNorm(residual + x), has x's shape, dtype and device
        _check_adapter_inputs(x, *adapter_parameters, adapter_eps, op=f"{_OP} (its adapter)")
    # Once verified on a GPU, chosen automatically where the adapter's kernel is (the fused kernel is that kernel
    # with the LayerNorm's launch saved): in a CUDA graph, at the row counts where it beats torch's composition.
    chosen = resolve_backend(_OP, x, backend, _BACKENDS, _VERIFIED_ON_GPU, _adapter_kernel_pays_off_on_gpu)
    # FASTMINI_BACKEND=triton asks every op for its kernel: on a GPU, not for this one until it has run on one
    unverified = x.is_cuda and backend is None and "triton" not in _VERIFIED_ON_GPU
    fused = (
        chosen == "triton"
        and not unverified
        and residual.dtype == x.dtype
        and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight, bias, *adapter_parameters))
        )
    )
    if fused:
        return _forward_op(x, residual, weight, bias, float(eps), *adapter_parameters, float(adapter_eps))
    # chosen "torch" by name stays torch; otherwise each op makes its own choice, or takes "triton" when asked
    return _two_ops(x, residual, weight, bias, eps, adapter_parameters, adapter_eps, backend, low_precision)
