"""Bottleneck adapter module: a thin owner of parameters around ops.adapter_bottleneck."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastmini.ops import adapter_bottleneck, add_layer_norm_adapter
from fastmini.ops.plain_layers import all_plain, unhooked
from fastmini.ops.prepacked_linear import PackedLinear, PrepackedLinears, PrepackedWeightsMixin


class BottleneckAdapter(PrepackedWeightsMixin, nn.Module):
    """``LayerNorm(x + Up(GELU(Down(x))))`` with Down H -> H/r and Up H/r -> H (SPEC.md, Model 4).

    With prepacked weights (the model's ``optimize_for_inference``; CPU inference, ops.prepacked_linear) Up is a
    oneDNN GEMM on reordered weights with the residual's add as its post-op (``PackedAdapter``): at 32 rows
    the ops between the shared layer's GEMMs run on caches those GEMMs' weights have just swept, where each pass
    of its own over the activations costs several times what it does on warm caches."""

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
        prepacked = self.prepacked_for(x, self.down, self.up)
        if prepacked is not None:
            return self.packed(prepacked)(x)
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

    def packed(self, prepacked: PrepackedLinears) -> PackedAdapter:
        """The adapter's ops on the entries of ``prepacked`` (where it applies to the adapter: ``prepacked_for``).
        Down has an entry only where the cache packs for MKL's row counts (see PackedAdapter)."""
        up = prepacked.packed("up", [self.up.weight], [self.up.bias])
        down = prepacked.packed("down", [self.down.weight], [self.down.bias]) if prepacked.row_counts else None
        return PackedAdapter(self.down, down, up, self.norm)


@dataclass
class PackedAdapter:
    """``norm(x + up(GELU(down(x))))`` for CPU inference: Up a oneDNN GEMM on reordered weights with the residual's
    add as its post-op (or MKL's packed sgemm at the cache's row counts), Down MKL's packed sgemm at those counts
    and otherwise torch's F.linear (MKL, packing its 48 x 768 weight each call); ``down`` and ``norm`` plain
    layers without hooks (their weights are read, their modules not called). Down stays off oneDNN on purpose:
    with GELU fused there, a (1, 32) forward at the published size took ~1.5 ms longer (24 of them at ~60 us
    against MKL's ~20 + GELU's ~10; 2-core AVX-512); its MKL-packed weight saved ~0.8 ms of the forward there."""

    down: nn.Linear
    packed_down: PackedLinear | None
    up: PackedLinear
    norm: nn.LayerNorm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.packed_down.mkl_linear(x) if self.packed_down is not None else None
        if hidden is None:
            hidden = F.linear(x, self.down.weight, self.down.bias)
        return self.norm.forward(self.up(F.gelu(hidden), residual=x))


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
