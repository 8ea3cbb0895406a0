"""Query, key and value as one GEMM a recursion (SharedLayer.fused_qkv): same outputs and gradients as three."""

from __future__ import annotations

import pytest
import torch

from fastmini import FastMiniForMaskedLM
from fastmini.modules.shared_layer import SharedLayer


def three_projections(monkeypatch) -> None:
    monkeypatch.setattr(SharedLayer, "fused_qkv", lambda self, x: (None, None))


def masked_lm(tiny_config, randomize) -> FastMiniForMaskedLM:
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return randomize(FastMiniForMaskedLM(config), 0.3).double().train()


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=labels, output_attentions=True).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def fused_widths(monkeypatch) -> list[int | None]:
    """The width of the fused weight every attention_block call receives (None: three projections)."""
    widths = []
    attention_block = SharedLayer.attention_block

    def spy(self, x, packing, need_weights, key_padding_mask=None, qkv_weight=None, qkv_bias=None, then=None):
        widths.append(None if qkv_weight is None else qkv_weight.shape[0])
        return attention_block(self, x, packing, need_weights, key_padding_mask, qkv_weight, qkv_bias, then)

    monkeypatch.setattr(SharedLayer, "attention_block", spy)
    return widths


def test_training_fuses_and_matches_three_projections(tiny_config, randomize, batch, monkeypatch):
    model = masked_lm(tiny_config, randomize)
    layer = model.fastmini.encoder.shared_layer
    x = torch.zeros(3, layer.query.in_features, dtype=torch.float64)
    weight, bias = layer.fused_qkv(x)
    assert weight.shape == (3 * layer.query.out_features, layer.query.in_features) and bias.shape == (weight.shape[0],)
    widths = fused_widths(monkeypatch)
    fused_loss, fused_grads = loss_and_gradients(model, batch)
    assert widths == [3 * layer.query.out_features] * model.config.num_hidden_layers  # every recursion fused
    three_projections(monkeypatch)
    loss, grads = loss_and_gradients(model, batch)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-12)
    assert fused_grads.keys() == grads.keys() and {"query", "key", "value"} <= {n.split(".")[-2] for n in grads}
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_cpu_inference_keeps_three_projections(tiny_config, randomize, batch, monkeypatch):
    model = masked_lm(tiny_config, randomize).eval()
    layer = model.fastmini.encoder.shared_layer
    x = torch.zeros(3, layer.query.in_features, dtype=torch.float64)
    assert layer.fused_qkv(x) == (None, None)
    widths = fused_widths(monkeypatch)
    with torch.no_grad():
        model(**batch)
    assert widths == [None] * model.config.num_hidden_layers


def test_under_autocast_the_fused_weight_is_cast_once(tiny_config, randomize, batch, monkeypatch):
    model = masked_lm(tiny_config, randomize).float()
    layer = model.fastmini.encoder.shared_layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight, bias = layer.fused_qkv(torch.zeros(3, layer.query.in_features))
        assert weight.dtype == bias.dtype == torch.bfloat16
        fused = model(**batch).logits.float()
        three_projections(monkeypatch)
        separate = model(**batch).logits.float()
    torch.testing.assert_close(fused, separate, rtol=0.05, atol=0.05)


def test_fp64_under_autocast_keeps_its_dtype(tiny_config, randomize, batch):
    """Autocast leaves fp64 alone: so does the fused weight (a bf16 copy would not multiply fp64 inputs)."""
    model = masked_lm(tiny_config, randomize)
    expected = model(**batch).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(**batch).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("hook", ["forward", "full backward"])
@pytest.mark.parametrize("projection", ["query", "key", "value"])
def test_a_hooked_projection_is_called_in_training(tiny_config, randomize, batch, projection, hook):
    model = masked_lm(tiny_config, randomize)
    calls = []
    layer = getattr(model.fastmini.encoder.shared_layer, projection)
    register = layer.register_forward_hook if hook == "forward" else layer.register_full_backward_hook
    register(lambda *args: calls.append(1))
    model(**batch).logits.sum().backward()
    assert len(calls) == model.config.num_hidden_layers


def test_the_switch_keeps_three_projections_in_training(tiny_config, randomize, batch, monkeypatch):
    model = masked_lm(tiny_config, randomize)
    model.fastmini.encoder.shared_layer.fuse_qkv = False
    widths = fused_widths(monkeypatch)
    model(**batch)
    assert widths == [None] * model.config.num_hidden_layers
