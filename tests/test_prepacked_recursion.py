"""The lean loop of CPU inference on prepacked weights (modules.prepacked_recursion): where it runs it gives the
module path's outputs exactly, and it steps aside wherever the module path would run other ops."""

from __future__ import annotations

import copy

import pytest
import torch

import fastmini.modules.encoder as encoder_module
from fastmini import FastMiniModel
from fastmini.modules.adapter import BottleneckAdapter
from fastmini.modules.shared_layer import SharedLayer
from fastmini.ops import adapter_bottleneck_ref
from fastmini.ops.prepacked_linear import onednn_linear_available

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def lean_runs(monkeypatch):
    """A list that gets True for each forward of an optimized encoder that the lean loop ran, False for each it
    stepped aside (plain models' forwards are not counted)."""
    runs: list[bool] = []
    original = encoder_module.prepacked_recursions

    def spy(encoder, *args):
        out = original(encoder, *args)
        if encoder.shared_layer.prepacked is not None:
            runs.append(out is not None)
        return out

    monkeypatch.setattr(encoder_module, "prepacked_recursions", spy)
    return runs


def _batch(ragged: bool):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 99, (3, 11), generator=generator)
    mask = torch.ones(3, 11, dtype=torch.long)
    if ragged:
        mask[1, 6:] = 0
        mask[2, 2:] = 0
    return input_ids, mask


def _models(tiny_config, randomize, **config):
    plain = randomize(FastMiniModel(tiny_config(**config))).eval()
    return plain, copy.deepcopy(plain).optimize_for_inference()


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("config", [{}, {"use_adapter": False}, {"hidden_act": "gelu_new"}],
                         ids=["adapters", "no-adapters", "gelu-tanh"])  # fmt: skip
def test_the_lean_loop_equals_the_module_path_and_the_plain_model(tiny_config, randomize, lean_runs, ragged, config):
    plain, optimized = _models(tiny_config, randomize, **config)
    input_ids, mask = _batch(ragged)
    with torch.inference_mode():
        lean = optimized(input_ids, mask).last_hidden_state
        assert lean_runs == [True]
        modules = optimized(input_ids, mask, output_hidden_states=True).last_hidden_state  # per-recursion outputs
        expected = plain(input_ids, mask).last_hidden_state
    assert lean_runs == [True]  # the second forward asked for per-recursion outputs: the encoder did not ask
    torch.testing.assert_close(lean, modules, rtol=0, atol=0)  # the same ops in the same order
    real = mask.bool()
    torch.testing.assert_close(lean[real], expected[real], rtol=1e-5, atol=1e-5)


def test_adapters_added_after_optimize_for_inference_are_prepacked_too(tiny_config, randomize, lean_runs):
    plain, optimized = _models(tiny_config, randomize, use_adapter=False)
    for model in (plain, optimized):
        model.encoder.add_adapters(model.config)
    optimized.encoder.load_state_dict(plain.encoder.state_dict())
    assert all(a.prepacked is not None for a in optimized.encoder.attention_adapters)
    assert all(a.prepacked is None for a in plain.encoder.attention_adapters)
    input_ids, mask = _batch(ragged=True)
    with torch.inference_mode():
        got, expected = optimized(input_ids, mask).last_hidden_state, plain(input_ids, mask).last_hidden_state
    assert lean_runs == [True]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def _hook_an_adapter(model):
    calls = []
    model.encoder.ffn_adapters[1].register_forward_hook(lambda *args: calls.append(1))
    return calls


def _unprepacked_adapter(model):
    model.encoder.attention_adapters[0].use_prepacked_weights(False)


def _subclassed_adapter(model):
    class Custom(BottleneckAdapter):
        pass

    old = model.encoder.attention_adapters[2]
    new = Custom(old.down.in_features, old.down.out_features, old.norm.eps)
    new.load_state_dict(old.state_dict())
    new.use_prepacked_weights(old.prepacked is not None)
    model.encoder.attention_adapters[2] = new


def _subclassed_shared_layer(model):
    class Custom(SharedLayer):
        def ffn_block(self, x, then=None):
            return super().ffn_block(2 * x, then)  # a user's change to the layer's computation

    old = model.encoder.shared_layer
    new = Custom(model.config)
    new.load_state_dict(old.state_dict())
    new.use_prepacked_weights(old.prepacked is not None)
    model.encoder.shared_layer = new.eval()


def _patched_recursion(model):
    encoder = model.encoder
    recursion = encoder.recursion
    encoder.recursion = lambda h, *args: recursion(h.flip(-1), *args)  # replaced on the instance


def _ffn_adapters_only(model):
    model.encoder.attention_adapters = None


def _attention_adapters_only(model):
    model.encoder.ffn_adapters = None


@pytest.mark.parametrize(
    "change",
    [_hook_an_adapter, _unprepacked_adapter, _subclassed_adapter, _subclassed_shared_layer, _patched_recursion,
     _ffn_adapters_only, _attention_adapters_only],
    ids=["hooked-adapter", "adapter-without-cache", "adapter-subclass", "shared-layer-subclass", "patched-recursion",
         "ffn-adapters-only", "attention-adapters-only"],
)  # fmt: skip
def test_the_lean_loop_steps_aside_where_the_modules_would_run_other_ops(tiny_config, randomize, lean_runs, change):
    plain, optimized = _models(tiny_config, randomize)
    change(plain)
    calls = change(optimized)
    input_ids, mask = _batch(ragged=True)
    with torch.no_grad():
        got, expected = optimized(input_ids, mask).last_hidden_state, plain(input_ids, mask).last_hidden_state
    assert lean_runs == [False]
    if calls is not None:
        assert len(calls) == 1  # the hook fired: the adapter module was called
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "wanted",
    [lambda m: m.encoder.ffn_adapters[0].up.bias, lambda m: m.encoder.shared_layer.attention_norm.weight],
    ids=["adapter-bias", "layer-norm-weight"],  # the norm's output feeds the next GEMMs: no linear wants a gradient
)
def test_a_parameter_that_wants_a_gradient_gets_the_plain_models(tiny_config, randomize, lean_runs, wanted):
    """Eval mode, one parameter trainable (BitFit, LayerNorm tuning, saliency): oneDNN's ops have no autograd rule,
    and a lean loop that checked the linears alone cut the norm's gradient."""
    input_ids, mask = _batch(ragged=True)
    real = mask.bool()
    results = []
    for model in _models(tiny_config, randomize):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        wanted(model).requires_grad_(True)
        out = model(input_ids, mask).last_hidden_state
        out[real].pow(2).sum().backward()
        results.append((out[real].detach(), wanted(model).grad))
    assert lean_runs == [False]
    (expected, expected_grad), (got, grad) = results
    assert expected_grad.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_a_key_projection_without_a_bias(tiny_config, randomize, lean_runs):
    """q/k/v where only the key has no bias: the prepacked paths raised in a forward the plain model runs."""
    plain, optimized = _models(tiny_config, randomize)
    for model in (plain, optimized):
        layer = model.encoder.shared_layer
        key = torch.nn.Linear(layer.key.in_features, layer.key.out_features, bias=False)
        key.weight.data.copy_(layer.key.weight)
        layer.key = key
    input_ids, mask = _batch(ragged=True)
    with torch.inference_mode():
        got, expected = optimized(input_ids, mask).last_hidden_state, plain(input_ids, mask).last_hidden_state
        modules = optimized(input_ids, mask, output_hidden_states=True).last_hidden_state
    assert lean_runs == [True]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, modules, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "bf16", "hidden-states", "attentions"])
def test_the_lean_loop_does_not_run_outside_fp32_inference_of_the_last_state(tiny_config, randomize, lean_runs, mode):
    _, optimized = _models(tiny_config, randomize)
    input_ids, mask = _batch(ragged=True)
    options = {"hidden-states": {"output_hidden_states": True}, "attentions": {"output_attentions": True}}
    if mode == "train":
        optimized.train()
    if mode == "bf16":
        optimized.to(torch.bfloat16)
    with torch.no_grad():
        optimized(input_ids, mask, **options.get(mode, {}))
    assert lean_runs in ([False], [])  # [] where the encoder never asked (it wants per-recursion outputs)


def test_the_prepacked_adapter_module_equals_the_reference(randomize):
    adapter = randomize(BottleneckAdapter(36, 9, 1e-12)).eval()
    adapter.use_prepacked_weights()
    x = torch.randn(2, 5, 36)
    with torch.inference_mode():
        got = adapter(x)
    assert len(adapter.prepacked) == 1  # Up's entry: the module ran its prepacked path
    parameters = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
    expected = adapter_bottleneck_ref(x, *parameters, adapter.norm.weight, adapter.norm.bias, 1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
