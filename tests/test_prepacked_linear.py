"""CPU inference through oneDNN-prepacked weights (ops.prepacked_linear, optimize_for_inference)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from fastmini import FastMiniForMaskedLM, FastMiniForSequenceClassification, FastMiniModel
from fastmini.ops.prepacked_linear import PrepackedLinears, linear_ref, onednn_linear_available

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


def _weights(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, inp, generator=generator) * 0.1 for out, inp in shapes]
    biases = [torch.randn(out, generator=generator) for out, _ in shapes]
    return weights, biases


@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("leading", [(7,), (2, 5), (0,)], ids=["2d", "3d", "empty"])
@pytest.mark.parametrize("fused", [1, 3], ids=["one", "qkv"])
def test_matches_the_reference(gelu, leading, fused):
    weights, biases = _weights(*[(36, 36)] * fused)
    x = torch.randn(*leading, 36)
    cache = PrepackedLinears()
    with torch.inference_mode():
        out = cache.linear("w", x, weights, biases, gelu=gelu)
        expected = linear_ref(x, weights, biases, gelu)
    assert out.shape == (*leading, 36 * fused)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(cache) == 1


@pytest.mark.parametrize("leading", [(7,), (2, 5), (0,)], ids=["2d", "3d", "empty"])
@pytest.mark.parametrize("fused", [1, 3], ids=["one", "qkv"])
def test_the_residual_is_added_as_the_reference_adds_it(leading, fused):
    weights, biases = _weights(*[(12, 36)] * fused)
    x, residual = torch.randn(*leading, 36), torch.randn(*leading, 12 * fused)
    cache = PrepackedLinears()
    with torch.inference_mode():
        out = cache.linear("w", x, weights, biases, residual=residual)
        expected = linear_ref(x, weights, biases, None, residual)
        without = cache.linear("w", x, weights, biases)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if out.numel():
        assert not torch.allclose(out, without)  # the residual was added, not dropped


def test_gelu_and_a_residual_together_are_refused():
    weights, biases = _weights((4, 4))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="gelu or residual, not both"):
        PrepackedLinears().linear("w", x, weights, biases, gelu="none", residual=x)


def test_a_residual_that_needs_a_gradient_takes_torch():
    weights, biases = _weights((4, 4))
    x, residual = torch.randn(2, 4), torch.randn(2, 4, requires_grad=True)
    out = PrepackedLinears().linear("w", x, weights, biases, residual=residual)
    out.sum().backward()
    torch.testing.assert_close(residual.grad, torch.ones(2, 4))


def test_non_contiguous_input_and_no_bias():
    weights, _ = _weights((37, 36))
    x = torch.randn(5, 72)[:, ::2]
    with torch.inference_mode():
        out = PrepackedLinears().linear("w", x, weights, [None])
    torch.testing.assert_close(out, F.linear(x, weights[0]), rtol=1e-5, atol=1e-5)


def test_a_linear_without_a_bias_beside_others_with_one():
    """q/k/v with the key's bias removed (bias=False): the prepacked path refused them (a ValueError in a forward
    the plain model runs)."""
    weights, biases = _weights((4, 4), (5, 4))
    x = torch.randn(2, 4)
    with torch.inference_mode():
        out = PrepackedLinears().linear("w", x, weights, [biases[0], None])
    torch.testing.assert_close(out, linear_ref(x, weights, [biases[0], None], None), rtol=1e-5, atol=1e-5)


def test_unknown_gelu_is_refused():
    weights, biases = _weights((4, 4))
    with pytest.raises(ValueError, match="gelu must be one of"):
        PrepackedLinears().linear("w", torch.randn(2, 4), weights, biases, gelu="relu")


@pytest.mark.parametrize(
    "case", ["weight_requires_grad", "input_requires_grad", "float64"], ids=lambda c: c.replace("_", " ")
)
def test_falls_back_to_torch_where_the_cache_does_not_apply(case):
    weights, biases = _weights((8, 4))
    x = torch.randn(3, 4)
    if case == "weight_requires_grad":
        weights[0].requires_grad_(True)
    elif case == "input_requires_grad":
        x.requires_grad_(True)
    else:
        weights, biases, x = [weights[0].double()], [biases[0].double()], x.double()
    cache = PrepackedLinears()
    out = cache.linear("w", x, weights, biases)
    assert torch.equal(out, F.linear(x, weights[0], biases[0]))  # the torch path itself, bit for bit
    assert len(cache) == 0
    if x.requires_grad or weights[0].requires_grad:
        out.sum().backward()  # gradients still flow


def test_in_place_weight_updates_rebuild_the_entry():
    weights, biases = _weights((8, 4))
    x = torch.randn(3, 4)
    cache = PrepackedLinears()
    with torch.inference_mode():
        before = cache.linear("w", x, weights, biases)
    with torch.no_grad():
        weights[0].mul_(2.0)  # what an optimizer step or load_state_dict does
    with torch.inference_mode():
        after = cache.linear("w", x, weights, biases)
    torch.testing.assert_close(after, F.linear(x, weights[0], biases[0]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def _padded_batch():
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, 99, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return input_ids, mask


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_optimized_model_equals_the_plain_one(tiny_config, randomize, padded, hidden_act):
    plain = randomize(FastMiniForMaskedLM(tiny_config(hidden_act=hidden_act))).eval()
    optimized = copy.deepcopy(plain).optimize_for_inference()
    input_ids, mask = _padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    with torch.inference_mode():
        expected = plain(input_ids, mask, output_hidden_states=True)
        got = optimized(input_ids, mask, output_hidden_states=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-4)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(optimized.fastmini.encoder.shared_layer.prepacked) == 4  # qkv, attention out, ffn up, ffn down
    assert len(optimized.lm_head.prepacked) == 2  # transform, decoder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_cpu_autocast_an_optimized_model_computes_as_the_plain_one(tiny_config, randomize, dtype):
    """oneDNN's linear is not on autocast's lists: run under it, the cache would keep computing in fp32 where
    a plain model computes in the autocast dtype (E == H: no projector casts the encoder's input first)."""
    config = tiny_config(embedding_size=36, use_embedding_projection=False)
    plain = randomize(FastMiniForMaskedLM(config)).eval()
    optimized = copy.deepcopy(plain).optimize_for_inference()
    input_ids, mask = _padded_batch()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        expected = plain(input_ids, mask).logits
        got = optimized(input_ids, mask).logits
    assert expected.dtype == got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(optimized.fastmini.encoder.shared_layer.prepacked) == 0  # never built: nothing ran through it


def test_an_optimized_model_still_compiles(tiny_config, randomize):
    """torch.compile of an optimized model takes the plain ops (inductor could not lower oneDNN's linear
    on a weight that is not a graph constant); its eager calls keep the cache."""
    plain = randomize(FastMiniForMaskedLM(tiny_config())).eval()
    optimized = copy.deepcopy(plain).optimize_for_inference()
    input_ids, mask = _padded_batch()
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            expected = plain(input_ids, mask).logits
            compiled = torch.compile(optimized)(input_ids, mask).logits
            eager = optimized(input_ids, mask).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-4)
    assert len(optimized.fastmini.encoder.shared_layer.prepacked) == 4


def test_albert_head_with_its_decoder_tied_to_the_embeddings(tiny_config, randomize):
    plain = randomize(FastMiniForMaskedLM(tiny_config(head_variant="albert", tie_word_embeddings=True))).eval()
    optimized = copy.deepcopy(plain).optimize_for_inference()
    assert optimized.lm_head.decoder.weight is optimized.fastmini.embeddings.word_embeddings.weight
    input_ids, mask = _padded_batch()

    def same_logits():
        with torch.inference_mode():
            expected = plain(input_ids, mask).logits
            torch.testing.assert_close(optimized(input_ids, mask).logits, expected, rtol=1e-5, atol=1e-4)

    same_logits()
    with torch.no_grad():  # an update of the tied embedding reaches the decoder's prepacked copy
        optimized.fastmini.embeddings.word_embeddings.weight.mul_(0.5)
        plain.fastmini.embeddings.word_embeddings.weight.mul_(0.5)
    same_logits()


def test_training_is_untouched(tiny_config, randomize, batch):
    """With gradients on, the optimized model takes the ordinary ops: same loss, same gradients."""
    plain = randomize(FastMiniForSequenceClassification(tiny_config(num_labels=3)))
    optimized = copy.deepcopy(plain).optimize_for_inference()
    labels = torch.tensor([0, 2])
    for model in (plain, optimized):
        torch.manual_seed(0)  # the same dropout masks
        model(**batch, labels=labels).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), optimized.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    assert len(optimized.fastmini.encoder.shared_layer.prepacked) == 0


def test_a_trainable_bias_under_frozen_weights_gets_its_gradient(tiny_config, randomize, batch):
    """BitFit-style tuning (biases train, weights frozen) of an optimized model: oneDNN's op holds detached copies
    of the biases too, so the ordinary ops must run wherever a bias needs a gradient."""
    plain = randomize(FastMiniForSequenceClassification(tiny_config(num_labels=3, use_adapter=False)))
    for name, parameter in plain.named_parameters():  # the first recursion's input then needs no gradient
        parameter.requires_grad_(name.startswith("fastmini.encoder.shared_layer.") and name.endswith("bias"))
    optimized = copy.deepcopy(plain).optimize_for_inference()
    labels = torch.tensor([0, 2])
    for model in (plain, optimized):
        torch.manual_seed(0)
        model(**batch, labels=labels).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), optimized.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


def test_an_unpickled_cache_counts_optimizer_steps(monkeypatch):
    """In a process that unpickles a model (no PrepackedLinears built there), the optimizer-step hook must still
    be registered, or a fused optimizer step would leave the cache stale."""
    from fastmini.ops import prepacked_linear

    registered = []
    monkeypatch.setattr(prepacked_linear, "_counting_optimizer_steps", False)
    monkeypatch.setattr(prepacked_linear, "register_optimizer_step_post_hook", registered.append)
    pickled = pickle.dumps(prepacked_linear.PrepackedLinears.__new__(prepacked_linear.PrepackedLinears))
    assert registered == []
    clone = pickle.loads(pickled)
    assert registered == [prepacked_linear._count_optimizer_step] and len(clone) == 0


def test_copies_pickles_and_saves_carry_no_cache(tiny_config, tmp_path):
    model = FastMiniModel(tiny_config()).eval().optimize_for_inference()
    input_ids, mask = _padded_batch()
    with torch.inference_mode():
        expected = model(input_ids, mask).last_hidden_state
    assert len(model.encoder.shared_layer.prepacked) == 4
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(clone.encoder.shared_layer.prepacked) == 0
        with torch.inference_mode():
            torch.testing.assert_close(clone(input_ids, mask).last_hidden_state, expected)
    model.save_pretrained(tmp_path)
    reloaded = FastMiniModel.from_pretrained(tmp_path).eval()
    assert reloaded.encoder.shared_layer.prepacked is None
    assert set(reloaded.state_dict()) == set(model.state_dict())


def test_switching_off(tiny_config):
    model = FastMiniModel(tiny_config()).optimize_for_inference()
    assert model.optimize_for_inference(prepacked_weights=False) is model
    assert model.encoder.shared_layer.prepacked is None


@pytest.mark.parametrize("fused_optimizer", [True, False], ids=["fused", "foreach"])
def test_eval_after_training_steps_uses_the_trained_weights(tiny_config, randomize, fused_optimizer):
    """Fused AdamW (the Trainer's default) writes parameters without bumping their version counters:
    the cache must not serve the weights from before the step."""
    input_ids, mask = _padded_batch()
    model = randomize(FastMiniForSequenceClassification(tiny_config(num_labels=2)), std=0.1).eval()
    model.optimize_for_inference()
    with torch.no_grad():
        model(input_ids, mask)  # fills the cache
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused_optimizer, foreach=not fused_optimizer)
    for train_mode in (True, False):  # stepping in eval mode (no dropout) too
        model.train(train_mode)
        model(input_ids, mask, labels=torch.tensor([0, 1, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        plain = copy.deepcopy(model).optimize_for_inference(prepacked_weights=False)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids, mask).logits, plain(input_ids, mask).logits)


def test_training_mode_frees_the_cache(tiny_config):
    input_ids, mask = _padded_batch()
    model = FastMiniForMaskedLM(tiny_config()).eval().optimize_for_inference()
    with torch.no_grad():
        model(input_ids, mask)
    assert len(model.fastmini.encoder.shared_layer.prepacked) > 0
    model.train()
    assert model.fastmini.encoder.shared_layer.prepacked is not None  # still switched on ...
    assert len(model.fastmini.encoder.shared_layer.prepacked) == 0  # ... but empty


def test_a_fused_step_on_a_copy_sharing_the_weights_storage_makes_the_cache_stale(tiny_config, randomize):
    """A trainer copy loaded with assign=True shares the served model's weight storage; its fused AdamW writes it
    without bumping the served tensors' version counters: only the process-wide step count sees it."""
    input_ids, mask = _padded_batch()
    served = randomize(FastMiniModel(tiny_config()), std=0.1).eval().optimize_for_inference()
    with torch.no_grad():
        served(input_ids, mask)  # fills the cache
    trainer = FastMiniModel(tiny_config()).train()
    trainer.load_state_dict(served.state_dict(), assign=True)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-2, fused=True)
    trainer(input_ids, mask).last_hidden_state.sum().backward()
    optimizer.step()
    plain = copy.deepcopy(served).optimize_for_inference(prepacked_weights=False)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids, mask).last_hidden_state, plain(input_ids, mask).last_hidden_state)


def test_weights_made_under_inference_mode_take_the_plain_ops(tiny_config, randomize):
    """Inference tensors have no version counter: the cache could not see them change."""
    input_ids, mask = _padded_batch()
    with torch.inference_mode():
        model = randomize(FastMiniModel(tiny_config()), std=0.1).eval()
    assert model.encoder.shared_layer.ffn_intermediate.weight.is_inference()
    with torch.no_grad():
        plain = model(input_ids, mask).last_hidden_state
        model.optimize_for_inference()
        torch.testing.assert_close(model(input_ids, mask).last_hidden_state, plain)  # it crashed here
    assert len(model.encoder.shared_layer.prepacked) == 0
    with torch.inference_mode():
        model.encoder.shared_layer.ffn_intermediate.weight.mul_(2.0)  # a change no version counter records
        torch.testing.assert_close(
            model(input_ids, mask).last_hidden_state,
            copy.deepcopy(model).optimize_for_inference(prepacked_weights=False)(input_ids, mask).last_hidden_state,
        )


@pytest.mark.parametrize("moved", ["bf16", "fp64"])
def test_a_dtype_change_frees_the_packed_copies(tiny_config, moved):
    input_ids, mask = _padded_batch()
    model = FastMiniModel(tiny_config()).eval().optimize_for_inference()
    with torch.no_grad():
        model(input_ids, mask)
    assert len(model.encoder.shared_layer.prepacked) > 0
    model.to(torch.bfloat16 if moved == "bf16" else torch.float64)
    with torch.no_grad():
        model(input_ids, mask)
    assert model.encoder.shared_layer.prepacked is not None and len(model.encoder.shared_layer.prepacked) == 0
