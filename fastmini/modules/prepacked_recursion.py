"""The N recursions of CPU inference on prepacked weights as one lean loop (``optimize_for_inference()``).

Why: at small batches a CPU forward is its GEMMs plus a per-op toll. The module path pays it at every linear
(is the cache applicable: autocast, compile, tracing, gradients, inference tensors; is the entry stale; are the
layers plain) and in nn.Module calls and attribute lookups: ~1.6 ms of a ~17 ms (1, 32) forward at the published
size on a 2-core AVX-512 CPU (the lean loop against the module path, both warm). Here all of that is asked once a
forward, each oneDNN entry is fetched once, and the loop calls exactly the ops the module path calls (the
PackedLinear entries with their GELU/residual post-ops, the adapters' PackedAdapter, the LayerNorms' forward,
SharedLayer.attend), so that the two give identical outputs (tests/test_prepacked_recursion.py).

It applies only where the module path would run those very ops: the shared layer's and every adapter's cache
switched on and applicable to the input and all the weights (fp32 on the CPU, no gradient wanted, no autocast,
compile or tracing), eval mode, plain layers without hooks (ops.plain_layers), adapters that are BottleneckAdapter
themselves, and nothing per recursion asked for (hidden states, attention maps; the encoder checks those).
Elsewhere ``prepacked_recursions`` returns None and the encoder runs its modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastmini.modules.adapter import BottleneckAdapter, PackedAdapter
from fastmini.modules.shared_layer import SharedLayer
from fastmini.ops import KeyPadding, Packing
from fastmini.ops.plain_layers import all_plain, unhooked

if TYPE_CHECKING:
    from fastmini.modules.encoder import RecursiveEncoder


# The methods whose code the plan stands for: a module that replaces one on its instance runs its modules.
_PLANNED_METHODS = {
    "RecursiveEncoder": ("recursion",),
    "SharedLayer": ("attention_block", "attend", "ffn_block", "_project_add_and_norm", "_add_and_norm"),
}


def _as_defined(module: torch.nn.Module, cls: type) -> bool:
    """``module`` is exactly ``cls`` (a subclass may override what the plan stands for) with none of the planned
    methods replaced on the instance."""
    return type(module) is cls and not any(name in module.__dict__ for name in _PLANNED_METHODS[cls.__name__])


def _adapters_in_plan(encoder: RecursiveEncoder) -> list[BottleneckAdapter] | None:
    """The adapters, attention's and FFN's of each recursion in turn ([] without adapters), or None where one of
    them could not run as the plan runs it."""
    attention, ffn = encoder.attention_adapters, encoder.ffn_adapters
    if attention is None and ffn is None:
        return []
    # One of the two lists alone, or lists of another length: the module path handles each as it is.
    if attention is None or ffn is None or not len(attention) == len(ffn) == encoder.num_recursions:
        return None
    adapters = [a for pair in zip(attention, ffn, strict=True) for a in pair]
    for adapter in adapters:
        if type(adapter) is not BottleneckAdapter or adapter.prepacked is None:  # (no dropout: train mode is alike)
            return None
    if not unhooked(*adapters) or not all_plain(*(m for a in adapters for m in (a.down, a.up, a.norm))):
        return None
    return adapters


def prepacked_recursions(
    encoder: RecursiveEncoder, h: torch.Tensor, packing: Packing | None, key_padding: KeyPadding | None
) -> torch.Tensor | None:
    """The encoder's last hidden state for ``h`` (packed with ``packing``, or padded with ``key_padding``), or
    None where the plan does not apply (see the module's docstring)."""
    from fastmini.modules.encoder import RecursiveEncoder  # (that module imports this one)

    layer = encoder.shared_layer
    prepacked = layer.prepacked
    if prepacked is None or layer.training:
        return None
    if not (_as_defined(encoder, RecursiveEncoder) and _as_defined(layer, SharedLayer)):
        return None
    # oneDNN's ops have no autograd rule: any parameter that wants a gradient (a LayerNorm's, whose output then
    # feeds the next GEMM) takes the module path, which decides block by block.
    if torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters()):
        return None
    adapters = _adapters_in_plan(encoder)
    if adapters is None:
        return None
    qkv_layers = (layer.query, layer.key, layer.value)
    linears = [*qkv_layers, layer.attention_output, layer.ffn_intermediate, layer.ffn_output]
    if not all_plain(*linears, layer.attention_norm, layer.ffn_norm):
        return None
    adapter_linears = [m for a in adapters for m in (a.down, a.up)]
    every_linear = linears + adapter_linears
    if not prepacked.applies(h, [m.weight for m in every_linear], [m.bias for m in every_linear]):
        return None
    # Each entry is fetched (and rebuilt if stale) once here, under the names the module path uses.
    qkv = prepacked.packed("qkv", [m.weight for m in qkv_layers], [m.bias for m in qkv_layers])
    attention_output, ffn_up, ffn_down = (
        prepacked.packed(name, [m.weight], [m.bias])
        for name, m in (
            ("attention_output", layer.attention_output),
            ("ffn_intermediate", layer.ffn_intermediate),
            ("ffn_output", layer.ffn_output),
        )
    )
    packed_adapters: list[PackedAdapter] = [a.packed(a.prepacked) for a in adapters]
    width, gelu = layer.query.out_features, layer.gelu_approximation
    attention_norm, ffn_norm = layer.attention_norm, layer.ffn_norm
    for i in range(encoder.num_recursions):
        if packed_adapters:
            h = packed_adapters[2 * i](h)
        context, _ = layer.attend(qkv(h).split(width, dim=-1), packing, False, key_padding)
        x = attention_norm.forward(attention_output(context, residual=h))
        if packed_adapters:
            x = packed_adapters[2 * i + 1](x)
        h = ffn_norm.forward(ffn_down(ffn_up(x, gelu=gelu), residual=x))
    return h
