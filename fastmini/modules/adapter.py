"""Bottleneck adapter module: a thin owner of parameters around ops.adapter_bottleneck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmini.ops import adapter_bottleneck, add_layer_norm_adapter
from fastmini.ops.plain_layers import all_plain, unhooked


class BottleneckAdapter(nn.Module):
    """``LayerNorm(x + Up(GELU(Down(x))))`` with Down H -> H/r and Up H/r -> H (SPEC.md, Model 4)."""

    low_precision_norms = False  # the model's set_low_precision_norms (ops.add_layer_norm's low_precision)

    def __init__(self, hidden_size: int, adapter_size: int, eps: float):
        """``adapter_size``: the bottleneck width H/r (``FastMiniConfig.adapter_size``)."""
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size)
        self.up = nn.Linear(adapter_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not all_plain(self.down, self.up, self.norm):  # see ops.plain_layers
            return self.norm(x + self.up(F.gelu(self.down(x))))
        return adapter_bottleneck(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            self.norm.weight,
            self.norm.bias,
            self.norm.eps,
            check_inputs=False,  # its own parameters, built to fit: no checks on the recursion's hot path
            low_precision=self.low_precision_norms,
        )


def adapter_after_layer_norm(
    adapter: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, low_precision: bool
) -> torch.Tensor | None:
    """``adapter(norm(residual + x))`` as one op (ops.add_layer_norm_adapter: in inference one kernel where its
    backend is Triton, otherwise the two ops), or None where that would not equal calling the modules: anything
    but a BottleneckAdapter itself (a subclass, a wrapper such as PEFT's modules_to_save), a hook on it, or
    layers that are not plain (ops.plain_layers), or an adapter whose ``low_precision_norms`` is not
    ``low_precision``, the LayerNorm's (ops.add_layer_norm's): the op takes one for both, and adapters added after
    the model's set_low_precision_norms keep their own until it is called again."""
    if type(adapter) is not BottleneckAdapter or not unhooked(adapter):
        return None
    if adapter.low_precision_norms != low_precision:
        return None
    down, up, adapter_norm = adapter.down, adapter.up, adapter.norm
    if not all_plain(norm, down, up, adapter_norm):
        return None
    return add_layer_norm_adapter(
        x, residual, norm.weight, norm.bias, norm.eps,
        down.weight, down.bias, up.weight, up.bias, adapter_norm.weight, adapter_norm.bias, adapter_norm.eps,
        check_inputs=False, low_precision=low_precision,
    )  # fmt: skip
