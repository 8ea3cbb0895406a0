"""The FFN up-projection with its bias and GELU: ``GELU(x @ W^T + b)``.

``approximate="none"`` is the exact erf GELU (config ``hidden_act="gelu"``), ``"tanh"`` the
tanh approximation (``"gelu_new"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.dispatch import choose

GELU_APPROXIMATIONS = ("none", "tanh")


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


_BACKENDS = {"torch": linear_gelu_ref}


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """``GELU(x @ weight^T + bias)`` with ``approximate`` in ``("none", "tanh")``."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"linear_gelu: approximate must be one of {GELU_APPROXIMATIONS}, got '{approximate}'")
    implementation = choose("linear_gelu", x, backend, _BACKENDS)
    return implementation(x, weight, bias, approximate)
