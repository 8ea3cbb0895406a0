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


def test_training_fuses_and_matches_three_projections(tiny_config, randomize, batch, monkeypatch):
    model = masked_lm(tiny_config, randomize)
    layer = model.fastmini.encoder.shared_layer
    x = torch.zeros(3, layer.query.in_features, dtype=torch.float64)
    weight, bias = layer.fused_qkv(x)
    assert weight.shape == (3 * layer.query.out_features, layer.query.in_features) and bias.shape == (weight.shape[0],)
    fused_loss, fused_grads = loss_and_gradients(model, batch)
    three_projections(monkeypatch)
    loss, grads = loss_and_gradients(model, batch)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-12)
    assert fused_grads.keys() == grads.keys() and {"query", "key", "value"} <= {n.split(".")[-2] for n in grads}
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_cpu_inference_keeps_three_projections(tiny_config, randomize):
    layer = masked_lm(tiny_config, randomize).eval().fastmini.encoder.shared_layer
    x = torch.zeros(3, layer.query.in_features, dtype=torch.float64)
    assert layer.fused_qkv(x) == (None, None)
    with torch.no_grad():
        assert layer.fused_qkv(x) == (None, None)


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


@pytest.mark.parametrize("projection", ["query", "key", "value"])
def test_a_hooked_projection_is_called_in_training(tiny_config, randomize, batch, projection):
    model = masked_lm(tiny_config, randomize)
    calls = []
    getattr(model.fastmini.encoder.shared_layer, projection).register_forward_hook(lambda *args: calls.append(1))
    model(**batch)
    assert len(calls) == model.config.num_hidden_layers
