"""When a fused op may read a submodule's parameters instead of calling the submodule.

The fused ops (linear_gelu, adapter_bottleneck, add_layer_norm, the prepacked linears) take weights, not
modules, and the embeddings read their position and token-type tables for the default ids. Reading
``layer.weight`` equals calling ``layer`` only for torch's own nn.Linear / nn.LayerNorm / nn.Embedding
with no hook: a wrapper (PEFT's LoRA layers), a subclass or a parametrization (quantized, pruned or
weight-normed layers) or a hook changes what the call computes or observes (a backward hook fires only
when the module is called). Such a layer is called as it is, through the unfused ops, so that what users
attach to a layer always takes effect (the fused path would silently skip it).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_internals

PLAIN_KINDS = (nn.Linear, nn.LayerNorm, nn.Embedding)
# Hooks registered for every module (register_module_forward_hook, ..._full_backward_hook): dicts torch
# mutates in place.
_GLOBAL_HOOKS = tuple(
    getattr(module_internals, f"_global{name}", {})
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
)


def all_plain(*layers: nn.Module) -> bool:
    """Whether every layer is exactly torch's nn.Linear, nn.LayerNorm or nn.Embedding (no subclass, no
    wrapper) with no hook (forward or backward) on it or on every module. On the recursion's hot path: ~0.5 us."""
    return all(type(layer) in PLAIN_KINDS for layer in layers) and unhooked(*layers)


def unhooked(*modules: nn.Module) -> bool:
    """Whether no module has a hook (forward or backward) of its own and none is registered for every module: a
    fastmini module whose call a fused op stands in for (the adapter after a LayerNorm) must be this too."""
    if any(_GLOBAL_HOOKS):
        return False
    return not any(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        for module in modules
    )
