"""The lean loop of CPU inference on prepacked weights (modules.prepacked_recursion): where it runs it gives the
module path's outputs exactly, and it steps aside wherever the module path would run other ops."""

from __future__ import annotations

import copy

import pytest
import torch

import fastmini.modules.encoder as encoder_module
from fastmini import FastMiniModel
from fastmini.modules.adapter import BottleneckAdapter
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
    new.use_prepacked_weights()
    model.encoder.attention_adapters[2] = new


def _trainable_bias(model):
    model.encoder.ffn_adapters[0].up.bias.requires_grad_(True)


@pytest.mark.parametrize(
    "change", [_hook_an_adapter, _unprepacked_adapter, _subclassed_adapter, _trainable_bias],
    ids=["hooked-adapter", "adapter-without-cache", "adapter-subclass", "gradient-wanted"],
)  # fmt: skip
def test_the_lean_loop_steps_aside_where_the_modules_would_run_other_ops(tiny_config, randomize, lean_runs, change):
    plain, optimized = _models(tiny_config, randomize)
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    calls = change(optimized)
    input_ids, mask = _batch(ragged=True)
    with torch.no_grad() if change is not _trainable_bias else torch.enable_grad():
        got = optimized(input_ids, mask).last_hidden_state
    with torch.no_grad():
        expected = plain(input_ids, mask).last_hidden_state
    assert lean_runs == [False]
    if calls is not None:
        assert len(calls) == 1  # the hook fired: the adapter module was called
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


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
