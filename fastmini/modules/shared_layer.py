"""The one transformer layer that every recursion reuses (SPEC.md, Model 3).

Split in two halves because the per-recursion adapters sit between them:
``attention_block`` (q/k/v, attention, output projection, residual + LayerNorm) and
``ffn_block`` (H -> I with GELU, I -> H, residual + LayerNorm).

``use_prepacked_weights()`` (CPU inference, see ops.prepacked_linear) keeps the layer's GEMM
weights reordered for oneDNN across recursions and forwards, query/key/value as one matrix; any
input the cache does not apply to (training, gradients, CUDA, non-fp32) takes the usual ops.
A submodule that is not a plain nn.Linear / nn.LayerNorm (a PEFT LoRA layer, a hook, a quantized
layer: ops.plain_layers) is called as it is instead of having its weights read by a fused op.
The encoder calls the two halves directly (the layer has no ``forward``): a forward hook on the layer itself
never fires; hooks go on its submodules (query, ffn_intermediate, the norms, ...) or on the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmini.modules.adapter import adapter_after_layer_norm
from fastmini.ops import KeyPadding, Packing, add_layer_norm, linear_gelu, packed_self_attention, self_attention
from fastmini.ops.autocasting import autocast_dtype_for
from fastmini.ops.plain_layers import all_plain
from fastmini.ops.prepacked_linear import PrepackedLinears, PrepackedWeightsMixin


class SharedLayer(PrepackedWeightsMixin, nn.Module):
    fuse_qkv = True  # see fused_qkv; False keeps three projection GEMMs (what the GPU benchmarks compare against)
    low_precision_maps = False  # the model's set_low_precision_maps (ops.attention.self_attention_ref)
    low_precision_norms = False  # the model's set_low_precision_norms (ops.add_layer_norm's low_precision)

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.gelu_approximation = config.gelu_approximation
        self.attention_dropout_p = config.attention_probs_dropout_prob
        self.hidden_dropout_p = config.hidden_dropout_prob
        # transformers' AlbertLayer has no dropout on its FFN output (it builds one and never calls it); the original
        # MiniALBERT's residual wrapper does (SPEC.md): the ALBERT variant keeps ALBERT's training behaviour.
        self.ffn_dropout_p = 0.0 if config.head_variant == "albert" else config.hidden_dropout_prob
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_intermediate = nn.Linear(hidden, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.packed_attention_backend: str | None = None  # None: ops.attention's automatic choice

    def _dropout(self, p: float) -> float:
        return p if self.training else 0.0

    def fused_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Query, key and value as one (3H, H) weight and (3H,) bias, or (None, None) where they are not fused.

        The encoder concatenates them once per forward and every recursion runs one GEMM instead of three
        (two launches fewer a recursion, and a wider GEMM; in backward one GEMM per gradient and no sum of
        three input gradients). Under autocast the concatenation is cast once too: a cast of a non-leaf
        tensor is not cached by autocast, so F.linear would otherwise cast it in every recursion. Fused on
        CUDA and in training. Not in CPU inference (eval mode), where the concatenation (a copy of 3H^2
        weights a forward) costs what the two GEMM calls saved do ((1, 32) at the published size, 2 threads:
        34.4 against 33.3 ms; the prepacked cache fuses them without a copy), nor where a projection is not
        a plain nn.Linear with a bias (ops.plain_layers). The choice depends on the module's mode, not on
        grad mode: torch.jit.trace checks its trace again under no_grad and wants the same graph.
        """
        layers = (self.query, self.key, self.value)
        cpu_inference = x.device.type == "cpu" and not self.training
        if not self.fuse_qkv or cpu_inference or not all_plain(*layers) or any(m.bias is None for m in layers):
            return None, None
        weight, bias = torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])
        dtype = autocast_dtype_for(weight)  # cast once here: autocast does not cache casts of non-leaf tensors
        return weight.to(dtype), bias.to(dtype)

    def attention_block(
        self,
        x: torch.Tensor,
        packing: Packing | None,
        need_weights: bool,
        key_padding_mask: torch.Tensor | KeyPadding | None = None,
        qkv_weight: torch.Tensor | None = None,
        qkv_bias: torch.Tensor | None = None,
        then: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``LayerNorm(x + Dropout(Dense(Attention(x))))`` and the probabilities when asked for; with ``then`` (an
        adapter, the FFN's), ``then`` of it (see _add_and_norm).

        ``x`` is packed (T, H) when ``packing`` is given, else a (B, S, H) batch whose padded keys,
        if any, ``key_padding_mask`` (B, S) marks False; it may be the encoder's KeyPadding of it, or, with
        ``packing``, of the packing's mask. The residual is this block's own input, i.e. the attention adapter's
        output. ``qkv_weight``/``qkv_bias``:
        ``fused_qkv``'s, when the caller has them (the encoder makes them once for all recursions).
        """
        layers = (self.query, self.key, self.value)
        prepacked = self.prepacked_for(x, *layers, self.attention_output)
        if prepacked is not None:
            qkv = prepacked.linear("qkv", x, [m.weight for m in layers], [m.bias for m in layers], checked=True)
            projections = qkv.split(self.query.out_features, dim=-1)
        elif qkv_weight is not None:
            projections = F.linear(x, qkv_weight, qkv_bias).split(self.query.out_features, dim=-1)
        else:
            projections = tuple(layer(x) for layer in layers)
        context, probabilities = self.attend(projections, packing, need_weights, key_padding_mask)
        output = self._project_add_and_norm(
            prepacked, "attention_output", context, x, self.attention_norm, self.hidden_dropout_p, then
        )
        return output, probabilities

    def attend(
        self,
        projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        packing: Packing | None,
        need_weights: bool,
        key_padding_mask: torch.Tensor | KeyPadding | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention of the (query, key, value) projections (see attention_block): the context, heads
        merged, and the probabilities when asked for."""
        query = projections[0]
        dropout_p = self._dropout(self.attention_dropout_p)
        if packing is not None:
            context, probabilities = packed_self_attention(
                *projections,
                self.num_heads,
                packing,
                dropout_p=dropout_p,
                need_weights=need_weights,
                # A CUDA switch (optimize_for_inference(varlen_attention=True)): CPU tensors keep the
                # CPU path, as fp32 or dropout keep the padded one on CUDA.
                backend=self.packed_attention_backend if query.is_cuda else None,
                check_inputs=False,  # projections of the layer's own x and the encoder's packing: fit by construction
                low_precision_maps=self.low_precision_maps,
                key_padding=key_padding_mask if isinstance(key_padding_mask, KeyPadding) else None,
            )
        else:
            context, probabilities = self_attention(
                *projections,
                self.num_heads,
                key_padding_mask,
                dropout_p=dropout_p,
                need_weights=need_weights,
                check_inputs=False,
                low_precision_maps=self.low_precision_maps,
            )
        return context, probabilities

    def ffn_block(self, x: torch.Tensor, then: nn.Module | None = None) -> torch.Tensor:
        """``LayerNorm(x + Dropout(FfnOut(GELU(Ffn(x)))))`` (no dropout in the ALBERT variant, as ALBERT); with
        ``then`` (an adapter), ``then`` of it."""
        up = self.ffn_intermediate
        prepacked = self.prepacked_for(x, up, self.ffn_output)
        if prepacked is None and all_plain(up):
            intermediate = linear_gelu(x, up.weight, up.bias, self.gelu_approximation, check_inputs=False)
        else:
            intermediate = self.linear_through(
                prepacked, "ffn_intermediate", x, gelu=self.gelu_approximation, checked=True
            )
        return self._project_add_and_norm(
            prepacked, "ffn_output", intermediate, x, self.ffn_norm, self.ffn_dropout_p, then
        )

    def _project_add_and_norm(
        self,
        prepacked: PrepackedLinears | None,
        name: str,
        x: torch.Tensor,
        residual: torch.Tensor,
        norm: nn.Module,
        dropout_p: float,
        then: nn.Module | None,
    ) -> torch.Tensor:
        """``norm(residual + Dropout(layer(x)))`` for the submodule ``name``, then ``then`` (see _add_and_norm).
        With the prepacked cache (CPU inference) the residual is added by the GEMM's post-op, and ``then`` is
        called as a module (an adapter's own prepacked path): one pass over the activations fewer per block."""
        if prepacked is not None and self._dropout(dropout_p) == 0.0 and all_plain(norm):
            out = norm.forward(self.linear_through(prepacked, name, x, residual=residual, checked=True))
            return out if then is None else then(out)
        output = self.linear_through(prepacked, name, x, checked=True)
        return self._add_and_norm(output, residual, norm, dropout_p, then)

    def _add_and_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        norm: nn.Module,
        dropout_p: float,
        then: nn.Module | None = None,
    ) -> torch.Tensor:
        """``norm(residual + Dropout(x))``: fused when ``norm`` is a plain LayerNorm (ops.plain_layers). With
        ``then``, the adapter that reads it: where dropout is off both go through ops.add_layer_norm_adapter (the
        adapter_after_layer_norm, None where that cannot stand in for the modules' calls)."""
        dropout_p = self._dropout(dropout_p)
        if then is not None and dropout_p == 0.0:
            adapted = adapter_after_layer_norm(then, x, residual, norm, self.low_precision_norms)
            if adapted is not None:
                return adapted
        if not all_plain(norm):
            out = norm(residual + F.dropout(x, p=dropout_p, training=dropout_p > 0.0))
        else:
            # check_inputs=False: the layer's own parameters, built to fit x (see ops.checks)
            out = add_layer_norm(
                x, residual, norm.weight, norm.bias, norm.eps, dropout_p, check_inputs=False,
                low_precision=self.low_precision_norms,
            )  # fmt: skip
        return out if then is None else then(out)
