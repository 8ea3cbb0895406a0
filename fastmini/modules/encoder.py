"""The recursion: one SharedLayer applied N times, each pass wrapped by its own adapters.

for i in 0..N-1:  a = AttAdapter_i(h);  x = attention_block(a);  m = FfnAdapter_i(x);  h = ffn_block(m)

Each adapter reads a LayerNorm's output (x is attention_block's last LayerNorm, h ffn_block's): with
``fuse_norms_into_adapters`` the pair is one call of ops.add_layer_norm_adapter (see the attribute).

Activation checkpointing (transformers' ``activation_checkpointing_enable()``, named
``gradient_checkpointing_enable()`` before 5.23 and kept as a deprecated alias since; either sets
``gradient_checkpointing`` and ``_gradient_checkpointing_func`` here) checkpoints one recursion at a
time: backward keeps only each recursion's input and recomputes the rest, dropout masks included
(torch.utils.checkpoint restores the RNG states). fastmini.training.memory calls whichever the
installed transformers has.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from fastmini.modules.adapter import BottleneckAdapter
from fastmini.modules.prepacked_recursion import prepacked_recursions
from fastmini.modules.shared_layer import SharedLayer
from fastmini.ops import KeyPadding, Packing


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # packed (T, H) when the input was
    hidden_states: tuple[torch.Tensor, ...] | None  # N + 1: the encoder's input first; packed likewise
    attentions: tuple[torch.Tensor, ...] | None  # N maps of (B, A, S, S)


def make_adapters(config) -> nn.ModuleList:
    return nn.ModuleList(
        BottleneckAdapter(config.hidden_size, config.adapter_size, config.adapter_layer_norm_eps)
        for _ in range(config.num_hidden_layers)
    )


class RecursiveEncoder(nn.Module):
    gradient_checkpointing = False  # switched by transformers' activation_checkpointing_enable() (see above)
    checkpoint_every = 1  # its every_n_layers: recursions 0, n, 2n, ... are checkpointed, the others keep theirs
    # Each adapter reads a LayerNorm's output (LayerNorm_att's, and the previous recursion's LayerNorm_full's):
    # True calls the two as ops.add_layer_norm_adapter, which is those two ops unless its fused kernel is chosen
    # (in inference only, never automatically on CUDA until a GPU run verifies it). Across recursions only where no
    # recursion's own output is needed (no hidden states asked for, no checkpointing).
    fuse_norms_into_adapters = True

    def __init__(self, config):
        super().__init__()
        self.num_recursions = config.num_hidden_layers
        self.shared_layer = SharedLayer(config)
        self.attention_adapters: nn.ModuleList | None = None
        self.ffn_adapters: nn.ModuleList | None = None
        if config.use_adapter:
            self.add_adapters(config)

    @property
    def has_adapters(self) -> bool:
        return self.attention_adapters is not None

    def add_adapters(self, config) -> None:
        """Give every recursion a fresh pair of adapters (adapter tuning of a model without them). They take the
        shared layer's prepacked setting (``optimize_for_inference``), as they would have had they been there."""
        self.attention_adapters = make_adapters(config)
        self.ffn_adapters = make_adapters(config)
        if self.shared_layer.prepacked is not None:
            for adapter in (*self.attention_adapters, *self.ffn_adapters):
                adapter.use_prepacked_weights(row_counts=self.shared_layer.prepacked.row_counts)

    def forward(
        self,
        hidden_states: torch.Tensor,
        packing: Packing | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """``hidden_states`` is packed (T, H) with ``packing``, or (B, S, H) whose padded keys (if
        any) ``key_padding_mask`` marks False: the padded layout, for shapes fixed in advance. Every
        recursion attends with one KeyPadding of the mask (or of the packing's), so that attention's additive
        form of it is made once a forward."""
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        checkpointed = None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            checkpointed = functools.partial(self._gradient_checkpointing_func, self.recursion)
        mask = packing.key_padding_mask if packing is not None else key_padding_mask
        key_padding = None if mask is None else KeyPadding(mask)
        if all_hidden is None and all_attentions is None and checkpointed is None:
            last = prepacked_recursions(self, hidden_states, packing, key_padding)  # CPU inference, when it applies
            if last is not None:
                return EncoderOutput(last_hidden_state=last, hidden_states=None, attentions=None)
        h = hidden_states
        qkv_weight, qkv_bias = self.shared_layer.fused_qkv(h)  # once for all recursions (see SharedLayer.fused_qkv)
        across = self.fuse_norms_into_adapters and self.has_adapters and all_hidden is None and checkpointed is None
        adapted = False  # h is already the attention adapter's output (the last recursion applied it)
        for i in range(self.num_recursions):
            recursion = checkpointed if checkpointed is not None and i % self.checkpoint_every == 0 else self.recursion
            then = self.attention_adapters[i + 1] if across and i + 1 < self.num_recursions else None
            # Positional arguments only: reentrant checkpointing tracks gradients through those alone.
            h, probabilities = recursion(
                h, i, packing, output_attentions, key_padding, qkv_weight, qkv_bias, adapted, then
            )
            adapted = then is not None
            if all_hidden is not None:
                all_hidden.append(h)
            if all_attentions is not None:
                all_attentions.append(probabilities)
        return EncoderOutput(
            last_hidden_state=h,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
        )

    def recursion(
        self,
        h: torch.Tensor,
        index: int,
        packing: Packing | None,
        need_weights: bool,
        key_padding_mask: torch.Tensor | KeyPadding | None,
        qkv_weight: torch.Tensor | None = None,
        qkv_bias: torch.Tensor | None = None,
        adapted: bool = False,
        then: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Recursion ``index``: its adapters around the shared layer; the new hidden state and, when
        ``need_weights``, the attention probabilities. ``qkv_*``: SharedLayer.fused_qkv's, when fused.
        ``adapted``: ``h`` is this recursion's attention adapter's output already; ``then``: a module (the next
        recursion's attention adapter) applied to the new hidden state, which is returned instead."""
        if self.attention_adapters is not None and not adapted:
            h = self.attention_adapters[index](h)
        ffn_adapter = self.ffn_adapters[index] if self.ffn_adapters is not None else None
        fused_adapter = ffn_adapter if self.fuse_norms_into_adapters else None
        h, probabilities = self.shared_layer.attention_block(
            h, packing, need_weights, key_padding_mask, qkv_weight, qkv_bias, fused_adapter
        )
        if ffn_adapter is not None and fused_adapter is None:
            h = ffn_adapter(h)
        return self.shared_layer.ffn_block(h, then), probabilities
