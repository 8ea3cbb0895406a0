"""Fixed-shape CPU serving: ``optimize_for_inference(cpu_token_counts=...)`` packs the prepacked GEMM weights for
MKL's packed sgemm at those row counts too (ops.prepacked_linear). Calls of exactly such a count take MKL's op and
give the reference's outputs; every other count keeps the oneDNN path; the counts survive what the cache does not
(train(), copies, pickles, adapters added later); bad counts are refused with one message."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from fastmini import FastMiniForMaskedLM, FastMiniModel
from fastmini.modules.adapter import BottleneckAdapter
from fastmini.ops import adapter_bottleneck_ref, prepacked_linear
from fastmini.ops.prepacked_linear import PackedLinear, PrepackedLinears, linear_ref, mkl_packing_available

pytestmark = pytest.mark.skipif(
    not (prepacked_linear.onednn_linear_available() and mkl_packing_available()),
    reason="this torch build lacks oneDNN's linear or MKL's packed sgemm",
)


@pytest.fixture
def mkl_calls(monkeypatch):
    """A list of the row counts of every call that MKL's packed sgemm ran (PackedLinear.mkl_linear)."""
    calls: list[int] = []
    original = PackedLinear.mkl_linear

    def spy(self, x):
        out = original(self, x)
        if out is not None:
            calls.append(x.numel() // x.shape[-1])
        return out

    monkeypatch.setattr(PackedLinear, "mkl_linear", spy)
    return calls


def _weights(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, inp, generator=generator) * 0.1 for out, inp in shapes]
    biases = [torch.randn(out, generator=generator) for out, _ in shapes]
    return weights, biases


@pytest.mark.parametrize("post_op", [None, "gelu-none", "gelu-tanh", "residual"])
@pytest.mark.parametrize("leading", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("fused", [1, 3], ids=["one", "qkv"])
def test_a_packed_row_count_runs_mkl_and_matches_the_reference(mkl_calls, post_op, leading, fused):
    weights, biases = _weights(*[(12, 36)] * fused)
    rows = leading[0] if len(leading) == 1 else leading[0] * leading[1]
    cache = PrepackedLinears(row_counts=[rows, 64])
    gelu = post_op.removeprefix("gelu-") if post_op and post_op.startswith("gelu") else None
    for shape in (leading, (3,)):  # a packed count, then one that is not
        x = torch.randn(*shape, 36)
        residual = torch.randn(*shape, 12 * fused) if post_op == "residual" else None
        with torch.inference_mode():
            out = cache.linear("w", x, weights, biases, gelu=gelu, residual=residual)
            expected = linear_ref(x, weights, biases, gelu, residual)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert mkl_calls == [rows]  # the packed count through MKL, the other through oneDNN
    entry = cache.packed("w", weights, biases)
    assert sorted(entry.mkl_by_rows) == sorted({rows, 64})


def test_without_counts_nothing_is_packed_for_mkl(mkl_calls):
    weights, biases = _weights((12, 36))
    cache = PrepackedLinears()
    with torch.inference_mode():
        cache.linear("w", torch.randn(7, 36), weights, biases)
    assert cache.packed("w", weights, biases).mkl_by_rows == {} and mkl_calls == []


def test_a_torch_without_mkl_keeps_the_onednn_path(monkeypatch, mkl_calls):
    monkeypatch.setattr(prepacked_linear, "mkl_packing_available", lambda: False)
    weights, biases = _weights((12, 36))
    cache = PrepackedLinears(row_counts=[7])
    x = torch.randn(7, 36)
    with torch.inference_mode():
        out = cache.linear("w", x, weights, biases)
    torch.testing.assert_close(out, linear_ref(x, weights, biases, None), rtol=1e-5, atol=1e-5)
    assert mkl_calls == []


def _batch():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 99, (3, 11), generator=generator)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0  # 11 + 6 + 2 = 19 real tokens: the unpadded path's row count
    return input_ids, mask


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_a_model_with_token_counts_equals_the_plain_model(tiny_config, randomize, mkl_calls, hidden_act):
    plain = randomize(FastMiniModel(tiny_config(hidden_act=hidden_act))).eval()
    counted = copy.deepcopy(plain).optimize_for_inference(cpu_token_counts=[19])
    input_ids, mask = _batch()
    real = mask.bool()
    with torch.inference_mode():
        expected = plain(input_ids, mask).last_hidden_state
        lean = counted(input_ids, mask).last_hidden_state
        ran_lean = len(mkl_calls)
        modules = counted(input_ids, mask, output_hidden_states=True).last_hidden_state
    torch.testing.assert_close(lean[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean, modules, rtol=0, atol=0)  # the lean loop and the modules: the same entries
    recursions = plain.config.num_hidden_layers
    # per recursion: q/k/v, attention output, FFN up and down, and each of two adapters' Down and Up
    assert ran_lean == recursions * 8 and set(mkl_calls) == {19} and len(mkl_calls) == 2 * ran_lean


def test_a_count_the_model_does_not_see_keeps_the_onednn_path(tiny_config, randomize, mkl_calls):
    plain = randomize(FastMiniModel(tiny_config())).eval()
    counted = copy.deepcopy(plain).optimize_for_inference(cpu_token_counts=[20])
    input_ids, mask = _batch()
    with torch.inference_mode():
        got, expected = counted(input_ids, mask).last_hidden_state, plain(input_ids, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert mkl_calls == []


def test_the_counts_outlive_the_cache(tiny_config):
    counts = (33, torch.tensor(19), np.int64(33))  # any integers, repeated or not
    model = FastMiniModel(tiny_config(use_adapter=False)).eval().optimize_for_inference(cpu_token_counts=counts)
    assert model.encoder.shared_layer.prepacked.row_counts == (19, 33)
    with torch.inference_mode():
        model(*_batch())
    assert len(model.encoder.shared_layer.prepacked) == 4
    model.train().eval()  # frees the packed weights, keeps the counts
    assert len(model.encoder.shared_layer.prepacked) == 0
    for clone in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.encoder.shared_layer.prepacked.row_counts == (19, 33)
        with torch.inference_mode():
            clone(*_batch())
        assert len(clone.encoder.shared_layer.prepacked) == 4
    model.encoder.add_adapters(model.config)
    assert all(a.prepacked.row_counts == (19, 33) for a in model.encoder.ffn_adapters)
    assert model.optimize_for_inference().encoder.shared_layer.prepacked.row_counts == ()


def test_an_adapter_packs_its_down_projection_only_with_counts(randomize, mkl_calls):
    adapter = randomize(BottleneckAdapter(36, 9, 1e-12)).eval()
    x = torch.randn(2, 5, 36)
    parameters = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
    expected = adapter_bottleneck_ref(x, *parameters, adapter.norm.weight, adapter.norm.bias, 1e-12)
    for counts, entries, calls in (((), 1, []), ((10,), 2, [10, 10])):
        adapter.use_prepacked_weights(row_counts=counts)
        with torch.inference_mode():
            got = adapter(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert len(adapter.prepacked) == entries  # Up's entry, and Down's where it is packed for MKL
        assert mkl_calls == calls  # Down and Up through MKL at the packed count


def test_weights_changed_in_place_are_packed_again(mkl_calls):
    weights, biases = _weights((12, 36), (12, 36))
    cache = PrepackedLinears(row_counts=[7])
    x = torch.randn(7, 36)
    with torch.inference_mode():
        cache.linear("w", x, weights, biases)
    with torch.no_grad():
        weights[1].mul_(-2.0)
        biases[0].add_(1.0)
    with torch.inference_mode():
        out = cache.linear("w", x, weights, biases)
    torch.testing.assert_close(out, linear_ref(x, weights, biases, None), rtol=1e-5, atol=1e-5)
    assert mkl_calls == [7, 7]


@pytest.mark.parametrize("head_variant", ["minialbert", "albert"])
def test_a_masked_lm_with_token_counts_equals_the_plain_one(tiny_config, randomize, mkl_calls, head_variant):
    plain = randomize(FastMiniForMaskedLM(tiny_config(head_variant=head_variant))).eval()
    counted = copy.deepcopy(plain).optimize_for_inference(cpu_token_counts=[19])
    input_ids, mask = _batch()
    real = mask.bool()
    with torch.inference_mode():
        got, expected = counted(input_ids, mask).logits, plain(input_ids, mask).logits
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert len(mkl_calls) == plain.config.num_hidden_layers * 8 + 2  # the recursions', the head's two


@pytest.mark.parametrize(
    "counts, error, message",
    [
        ("32", TypeError, "expected a sequence of token counts"),
        (32, TypeError, "expected a sequence of token counts"),
        ([0], ValueError, "positive ints up to 2147483647, got 0 "),
        ([32, -1], ValueError, "positive ints up to 2147483647, got -1 "),
        ([2.5], ValueError, "positive ints up to 2147483647, got 2.5 "),
        ([torch.tensor(3.0)], ValueError, "positive ints up to 2147483647, got tensor"),
        ([torch.tensor(True)], ValueError, "got tensor\\(True\\)"),
        ([2**31], ValueError, "got 2147483648"),
        (torch.tensor(32), TypeError, "expected a sequence of token counts"),
        (np.array(32), TypeError, "expected a sequence of token counts"),
        ([True], ValueError, "positive ints up to 2147483647, got True "),
    ],
)
def test_bad_counts_are_refused_with_one_message(tiny_config, counts, error, message):
    model = FastMiniModel(tiny_config())
    with pytest.raises(error, match=f"optimize_for_inference: cpu_token_counts: .*{message}"):
        model.optimize_for_inference(cpu_token_counts=counts)
    assert model.encoder.shared_layer.prepacked is None  # nothing switched on half-way


def test_counts_without_prepacked_weights_are_refused(tiny_config):
    with pytest.raises(ValueError, match="cpu_token_counts needs prepacked_weights=True"):
        FastMiniModel(tiny_config()).optimize_for_inference(prepacked_weights=False, cpu_token_counts=[32])


def test_moving_the_model_frees_the_packed_weights_at_once(tiny_config, randomize):
    """The entries hold the fp32 weights MKL's op reads its sizes from: a model moved to another dtype must not keep
    them (nor the packed copies) alive until its next forward."""
    model = randomize(FastMiniModel(tiny_config())).eval().optimize_for_inference(cpu_token_counts=[19])
    with torch.inference_mode():
        model(*_batch())
    adapters = [*model.encoder.attention_adapters, *model.encoder.ffn_adapters]
    assert len(model.encoder.shared_layer.prepacked) == 4 and all(len(a.prepacked) == 2 for a in adapters)
    model.to(torch.float64)
    assert len(model.encoder.shared_layer.prepacked) == 0 and all(len(a.prepacked) == 0 for a in adapters)
    assert model.encoder.shared_layer.prepacked.row_counts == (19,)
