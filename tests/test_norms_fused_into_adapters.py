"""The encoder's LayerNorms folded into the adapters that read them (RecursiveEncoder.fuse_norms_into_adapters,
through ops.add_layer_norm_adapter): the same outputs as the modules called one by one, fused where nothing else
needs the LayerNorm's output, and the modules called as they are where a fused op could not stand in for them."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastmini import FastMiniForMaskedLM
from fastmini.modules.encoder import RecursiveEncoder


@pytest.fixture
def model(tiny_config, randomize):
    return randomize(FastMiniForMaskedLM(tiny_config(use_adapter=True))).eval()


@pytest.fixture
def fused_calls(monkeypatch):
    """How many adapter calls went through ops.add_layer_norm_adapter's fused kernel."""
    op = importlib.import_module("fastmini.ops.add_layer_norm_adapter")  # the module: the package exports the op

    calls = []
    original = op._forward_op
    monkeypatch.setattr(op, "_forward_op", lambda *args: calls.append(1) or original(*args))
    return calls


def outputs(model, batch, **options):
    with torch.no_grad():
        return model(**batch, **options)


@pytest.mark.parametrize("hidden_states", [False, True], ids=["last-state", "hidden-states"])
def test_fused_equals_the_modules_one_by_one(model, batch, monkeypatch, fused_calls, hidden_states):
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")  # the fused kernel, through the interpreter on the CPU
    n = model.config.num_hidden_layers
    fused = outputs(model, batch, output_hidden_states=hidden_states)
    # every FFN adapter reads the attention's LayerNorm; attention adapters 1..n-1 the FFN's, unless hidden states
    # (the FFN LayerNorm's outputs) are asked for
    assert len(fused_calls) == (n if hidden_states else 2 * n - 1)
    monkeypatch.setattr(RecursiveEncoder, "fuse_norms_into_adapters", False)
    separate = outputs(model, batch, output_hidden_states=hidden_states)
    assert len(fused_calls) == (n if hidden_states else 2 * n - 1)  # no more
    torch.testing.assert_close(fused.logits, separate.logits, atol=1e-5, rtol=1e-5)
    if hidden_states:
        for got, expected in zip(fused.hidden_states, separate.hidden_states, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_torch_path_calls_the_same_ops_as_before(model, batch, monkeypatch, fused_calls):
    """On the default CPU path the fused op is the two ops: outputs equal to the last bit."""
    fused = outputs(model, batch).logits
    monkeypatch.setattr(RecursiveEncoder, "fuse_norms_into_adapters", False)
    assert fused_calls == [] and torch.equal(fused, outputs(model, batch).logits)


def test_a_hooked_adapter_is_called_as_it_is(model, batch, monkeypatch, fused_calls):
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    encoder = model.fastmini.encoder
    seen = []
    encoder.ffn_adapters[0].register_forward_hook(lambda module, args, output: seen.append("ffn 0"))
    encoder.attention_adapters[1].register_forward_hook(lambda module, args, output: seen.append("attention 1"))
    outputs(model, batch)
    assert seen == ["ffn 0", "attention 1"]
    n = model.config.num_hidden_layers
    assert len(fused_calls) == 2 * n - 1 - 2  # all the others fused


def test_training_with_dropout_keeps_the_modules(tiny_config, randomize, batch, monkeypatch, fused_calls):
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    model = randomize(FastMiniForMaskedLM(tiny_config(use_adapter=True, hidden_dropout_prob=0.1))).train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    assert fused_calls == []
    assert all(p.grad is not None for p in model.fastmini.encoder.ffn_adapters.parameters())


def test_an_adapter_replaced_by_another_module_is_called_as_it_is(model, batch, monkeypatch, fused_calls):
    """A wrapper around an adapter (as PEFT's modules_to_save puts one) has no fused form: it is called."""
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    expected = outputs(model, batch).logits
    encoder = model.fastmini.encoder
    encoder.ffn_adapters[0] = torch.nn.Sequential(encoder.ffn_adapters[0])
    encoder.attention_adapters[1] = torch.nn.Sequential(encoder.attention_adapters[1])
    fused_calls.clear()
    torch.testing.assert_close(outputs(model, batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert len(fused_calls) == 2 * model.config.num_hidden_layers - 1 - 2  # all the others fused


def test_an_adapter_with_its_own_low_precision_is_called_as_it_is(model, batch, monkeypatch, fused_calls):
    """The fused op takes one low_precision for its LayerNorm and its adapter; an adapter added after the model's
    set_low_precision_norms keeps its own flag (load_adapters), and under CUDA autocast the two would differ in
    the dtype they return: that adapter is called as a module."""
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    model.set_low_precision_norms(True)
    encoder = model.fastmini.encoder
    encoder.ffn_adapters[0].low_precision_norms = False
    encoder.attention_adapters[1].low_precision_norms = False
    outputs(model, batch)
    assert len(fused_calls) == 2 * model.config.num_hidden_layers - 1 - 2  # all the others fused
