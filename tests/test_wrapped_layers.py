"""Layers users wrap, hook or replace take effect: the fused ops read a submodule's weights only where that
equals calling it (fastmini.ops.plain_layers).

PEFT's LoRA layers, forward hooks, pruning and dynamic quantization all act through the module call; a
fused op reading ``layer.weight`` instead would silently skip them (a LoRA that never trains).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmini import FastMiniForMaskedLM


class LowRankDelta(nn.Module):
    """What PEFT's LoRA layer computes: the base layer's output plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.a.weight, std=0.3)
        nn.init.normal_(self.b.weight, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))

    def merged(self) -> nn.Linear:
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight += self.b.weight @ self.a.weight
        return linear


# Every layer a fused op reads: the FFN up-projection (linear_gelu), an adapter's two linears
# (adapter_bottleneck), the MLM head's transform (linear_gelu), and layers the prepacked path reads.
WRAPPED = (
    "fastmini.encoder.shared_layer.ffn_intermediate",
    "fastmini.encoder.shared_layer.query",
    "fastmini.encoder.shared_layer.ffn_output",
    "fastmini.encoder.attention_adapters.0.down",
    "fastmini.encoder.ffn_adapters.1.up",
    "lm_head.transform",
)


def model_pair(tiny_config, randomize):
    """(model with LowRankDelta layers, the same model with the deltas merged into plain weights)."""
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize(FastMiniForMaskedLM(config), 0.2)
    torch.manual_seed(3)
    for name in WRAPPED:
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, LowRankDelta(model.get_submodule(name)))
    merged = copy.deepcopy(model)
    for name in WRAPPED:
        parent, _, child = name.rpartition(".")
        merged.get_submodule(parent).register_module(child, merged.get_submodule(name).merged())
    return model, merged


@pytest.mark.parametrize("mode", ["train", "inference", "prepacked"])
def test_a_wrapped_layer_acts_like_its_merged_weights(mode, tiny_config, randomize, batch):
    model, merged = model_pair(tiny_config, randomize)
    for m in (model, merged):
        m.train(mode == "train")
        if mode == "prepacked":
            m.optimize_for_inference()
    with torch.set_grad_enabled(mode == "train"):
        got = model(**batch).logits
        expected = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if mode == "train":
        got.sum().backward()
        for name in WRAPPED:
            assert model.get_submodule(name).a.weight.grad.abs().sum() > 0, name  # the update trains


def test_forward_hooks_on_every_layer_fire(tiny_config, randomize, batch):
    model = randomize(FastMiniForMaskedLM(tiny_config()), 0.2).eval().optimize_for_inference()
    fired = set()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding))}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda module, args, output, name=name: fired.add(name))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # default positions, types
    assert model.fastmini.projector is not None and "fastmini.projector" in layers  # E != H: every kind is here
    assert fired == set(layers), sorted(set(layers) - fired)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao's own deprecation
def test_dynamically_quantized_linears_run(tiny_config, randomize, batch):
    quantize_dynamic = pytest.importorskip("torch.ao.quantization").quantize_dynamic
    model = randomize(FastMiniForMaskedLM(tiny_config()), 0.2).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        got = quantized(**batch).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99
