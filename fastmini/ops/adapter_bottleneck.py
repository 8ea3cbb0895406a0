"""The bottleneck adapter: ``LayerNorm(x + Up(GELU(Down(x))))`` (SPEC.md, Model 4).

Down is H -> H/r, Up is H/r -> H, GELU is exact (erf). ``adapter_bottleneck_ref`` is the
oracle for kernels, the CPU path and the benchmark baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.dispatch import choose


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
    return F.layer_norm(x + F.linear(bottleneck, up_weight, up_bias), (x.shape[-1],), norm_weight, norm_bias, eps)


_BACKENDS = {"torch": adapter_bottleneck_ref}


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
) -> torch.Tensor:
    """``LayerNorm(x + Up(GELU(Down(x))))`` over the last dimension of ``x`` (..., H)."""
    implementation = choose("adapter_bottleneck", x, backend, _BACKENDS)
    return implementation(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, eps)
