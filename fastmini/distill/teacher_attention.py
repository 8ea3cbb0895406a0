"""The teacher attends through SDPA in every layer but those whose maps the attention loss reads.

``output_attentions=True`` needs transformers' eager attention in every layer: each writes its (B, A, S, S)
scores, adds the mask to them, softmaxes them and keeps the probabilities until the losses have read them.
The loss compares only the matched layers (every second one of a 12-layer teacher for a 6-recursion
student); the others can attend through torch's ``scaled_dot_product_attention``, whose fused kernels never
write a map. ``matched_maps(encoder, layers)`` does that for one forward: inside it the encoder's attention
modules call ``_attend`` (registered with transformers' attention interface), which runs the eager formula
in the matched layers, keeping their probabilities, and SDPA in the rest.

Same maps and states as the eager teacher: the eager formula is transformers' own (matmul, scale, additive
mask, softmax, matmul; the mask is the eager one), and an SDPA layer differs from an eager one by float
rounding only. Teachers whose attention modules do not go through that interface (``supports_matched_maps``
says which do) keep ``output_attentions=True``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

# The name the encoder's config carries while maps are captured (transformers' attention and mask registries).
ATTENTION_NAME = "fastmini_matched_maps"

_capturing: MatchedMaps | None = None  # the capture in progress, if any (one forward at a time)


# Per encoder, found once: walking a 12-layer teacher's modules took ~0.5 ms of host time, twice a forward.
_attention_modules_of: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def attention_modules(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's self-attention modules in layer order: those whose outputs transformers records as
    ``attentions`` (e.g. BertSelfAttention); [] for a model that does not say which they are."""
    found = _attention_modules_of.get(encoder)
    if found is None:
        recorded = getattr(encoder, "_can_record_outputs", None) or {}
        target = recorded.get("attentions")
        target = getattr(target, "target_class", target)  # a class, or transformers' OutputRecorder naming one
        found = (
            [module for module in encoder.modules() if isinstance(module, target)] if isinstance(target, type) else []
        )
        _attention_modules_of[encoder] = found
    return found


def supports_matched_maps(encoder: nn.Module) -> bool:
    """An encoder (not a decoder) that dispatches attention through transformers' attention interface, one
    recorded attention module per layer."""
    config = encoder.config
    return (
        getattr(encoder, "_supports_attention_backend", False)
        and not getattr(config, "is_decoder", False)
        and len(attention_modules(encoder)) == config.num_hidden_layers
    )


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _attend)
    # The eager layers add the eager (additive, min-valued) mask to their scores, as transformers' eager path
    # does; SDPA takes the same additive mask.
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


class MatchedMaps:
    """The probabilities of the matched layers (1-based ``layers``) of one forward of ``encoder``, in the
    order of ``layers``; a context manager around that forward (see the module doc)."""

    def __init__(self, encoder: nn.Module, layers: tuple[int, ...]):
        modules = attention_modules(encoder)
        self.config = encoder.config
        # A layer may be matched to more than one recursion (an explicit --layer-map such as 2,2,4,4): all its slots.
        self.slots_of: dict[nn.Module, list[int]] = {}
        for slot, layer in enumerate(layers):
            self.slots_of.setdefault(modules[layer - 1], []).append(slot)
        self.maps: list[torch.Tensor | None] = [None] * len(layers)

    def __enter__(self) -> MatchedMaps:
        global _capturing
        if _capturing is not None:
            raise RuntimeError("matched_maps: one capture at a time (a forward inside another's capture)")
        _register()
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION_NAME
        _capturing = self
        return self

    def __exit__(self, *exc_info) -> None:
        global _capturing
        _capturing = None
        self.config._attn_implementation = self.previous

    def collected(self) -> list[torch.Tensor]:
        missing = [slot for slot, found in enumerate(self.maps) if found is None]
        if missing:
            raise RuntimeError(f"matched_maps: no attention map came from the matched layers at {missing}")
        return list(self.maps)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, S) additive bias of a (B, S) mask, 0 at real keys and ``dtype``'s lowest value at padded ones:
    transformers' eager mask, unexpanded (the sums with the scores are the same). Given to the encoder inside a
    capture in place of the 2D mask, it skips transformers' mask builder, which asks the host whether the mask
    is all ones (on a GPU a wait for every queued kernel)."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~attention_mask.bool(), torch.finfo(dtype).min)[:, None, None, :]


def matched_maps(encoder: nn.Module, layers: tuple[int, ...]) -> contextlib.AbstractContextManager:
    """``MatchedMaps`` where the encoder supports it, else a context giving None (the caller then asks for
    ``output_attentions``)."""
    if supports_matched_maps(encoder):
        return MatchedMaps(encoder, layers)
    return contextlib.nullcontext(None)


def _attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: (B, A, S, D) heads in, ((B, S, A, D) context, map or None)."""
    slots = None if _capturing is None else _capturing.slots_of.get(module)
    if slots is None:
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                 scale=scaling)  # fmt: skip
        return context.transpose(1, 2).contiguous(), None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = scores.softmax(dim=-1)
    for slot in slots:
        _capturing.maps[slot] = probabilities
    dropped = F.dropout(probabilities, p=dropout, training=dropout > 0.0)
    return torch.matmul(dropped, value).transpose(1, 2).contiguous(), probabilities
