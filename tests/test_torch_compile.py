"""Whole models under ``torch.compile``: the eager outputs, losses and gradients.

Two ways users compile: as is (unpadding on: a graph break where the mask is read, the rest
compiled), and with ``set_unpadding(False)`` for one graph (``fullgraph=True``; what
``mode="reduce-overhead"`` needs). The padded layout must be invisible: outputs on real tokens,
zeros at padding and losses equal the eager, unpadded model, labels at padded positions included
(padding never counts, in either layout). Most cases compile with ``aot_eager`` (dynamo's tracing
and AOT autograd, no code generation: what can break in fastmini's code); two go through inductor,
the backend users get by default.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastmini import (
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
)
from fastmini.ops import Packing

MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(5, vocab_size, MASK.shape, generator=generator), "attention_mask": MASK}


def labels_for(model_class, vocab_size: int) -> torch.Tensor:
    """Labels everywhere, padded positions included: they must not count in either layout."""
    generator = torch.Generator().manual_seed(6)
    if model_class is FastMiniForSequenceClassification:
        return torch.tensor([0, 1, 1])
    classes = vocab_size if model_class is FastMiniForMaskedLM else 3
    return torch.randint(0, classes, MASK.shape, generator=generator)


def real(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[MASK.bool()]


@pytest.mark.parametrize(
    "model_class", [FastMiniForMaskedLM, FastMiniForSequenceClassification, FastMiniForTokenClassification]
)
def test_heads_compile_to_one_graph_with_the_eager_outputs_losses_and_gradients(
    model_class, tiny_config, randomize, monkeypatch
):
    # Training mode without dropout: both runs must compute the same function. The automatic backend choice, as
    # users have it (torch on the CPU), is traced too.
    monkeypatch.delenv("FASTMINI_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = tiny_config(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = randomize(model_class(config), 0.2).train()
    batch = {**inputs(model.config.vocab_size), "labels": labels_for(model_class, model.config.vocab_size)}

    eager = model(**batch)
    eager.loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.set_unpadding(False)  # the padded layout: no mask-dependent shape, one graph
    with warnings.catch_warnings(record=True) as caught:  # dynamo warned of a cached function in the dispatch
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**batch)
    assert not [str(w.message) for w in caught if "ynamo" in str(w.message)]
    compiled.loss.backward()

    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    if model_class is FastMiniForSequenceClassification:
        torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(real(compiled.logits), real(eager.logits), rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(compiled.logits[~MASK.bool()]) == 0  # zeros at padding, as eager
    assert eager_grads
    for name, parameter in model.named_parameters():
        if name in eager_grads:
            torch.testing.assert_close(parameter.grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("unpadding", [True, False], ids=["unpadded", "padded-fullgraph"])
def test_the_encoder_through_inductor_equals_eager(unpadding, tiny_config, randomize):
    model = randomize(FastMiniModel(tiny_config()), 0.2).eval()
    batch = inputs(model.config.vocab_size)
    with torch.no_grad():
        eager = model(**batch, output_hidden_states=True)
        compiled_model = torch.compile(model.set_unpadding(unpadding), fullgraph=not unpadding)
        compiled = compiled_model(**batch, output_hidden_states=True)
    torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled.hidden_states, eager.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_encoder_given_its_packing_traces_as_one_graph(tiny_config, randomize):
    """What the distiller (and --compile-student) hands the encoder: the batch's packing, attention maps asked
    for, training with backward. Nothing on that path may break the graph (fullgraph=True raises if it does)."""
    model = randomize(FastMiniModel(tiny_config()), 0.2).train()
    batch = inputs(model.config.vocab_size)
    packing = Packing.from_attention_mask(batch["attention_mask"])

    def encode(input_ids):
        encoded = model.encode(input_ids, None, None, output_attentions=True, packing=packing)
        return encoded.sequence.square().sum() + sum(m.square().sum() for m in encoded.attentions)

    torch.manual_seed(0)
    eager = encode(batch["input_ids"])
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch.manual_seed(0)
    compiled = torch.compile(encode, backend="aot_eager", fullgraph=True)(batch["input_ids"])
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("output_attentions", [False, True], ids=["context", "with-maps"])
def test_the_unpadded_model_breaks_its_graph_only_where_it_reads_the_mask(tiny_config, randomize, output_attentions):
    """The one break set_unpadding documents: the mask's nonzero. Two once added a break per recursion: a
    cached_property on the packing (Python 3.11's takes a lock dynamo cannot enter), and on the CPU the choice
    to attend sequence by sequence, which reads the lengths on the host (eager only now)."""
    import torch._dynamo

    model = randomize(FastMiniModel(tiny_config())).eval()
    batch = inputs(model.config.vocab_size)
    mostly_padding = torch.zeros_like(batch["attention_mask"])
    mostly_padding[:, :2] = 1  # 2 of 7 real: eagerly, the CPU would attend one sequence at a time
    explained = torch._dynamo.explain(
        lambda ids, mask: model(ids, mask, output_attentions=output_attentions).last_hidden_state
    )(batch["input_ids"], mostly_padding)
    places = [(reason.user_stack[-1].filename, reason.user_stack[-1].name) for reason in explained.break_reasons]
    assert places and all(f.endswith("packing.py") and name == "from_attention_mask" for f, name in places), [
        str(reason.reason).splitlines()[0] for reason in explained.break_reasons
    ]


def test_set_unpadding_switches_the_layout_of_every_head(tiny_config):
    model = FastMiniForTokenClassification(tiny_config(num_labels=3)).eval()
    batch = inputs(model.config.vocab_size)
    encoded = model.fastmini.encode(**batch)
    assert encoded.packing is not None and encoded.sequence.shape[0] == int(MASK.sum())  # the default
    assert model.set_unpadding(False) is model
    encoded = model.fastmini.encode(**batch)
    assert encoded.packing is None and encoded.sequence.shape[:2] == MASK.shape
    assert model.fastmini.encode(**batch, unpad=True).packing is not None  # an explicit argument wins


def test_torch_export_of_the_padded_layout_with_dynamic_shapes(tiny_config, randomize):
    """torch.export (the route to ONNX and AOTInductor) traces the padded layout; the exported program
    serves other batch sizes and lengths."""
    model = randomize(FastMiniModel(tiny_config()), 0.2).eval().set_unpadding(False)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=model.config.max_position_embeddings)
    dynamic = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    sample = inputs(model.config.vocab_size)
    program = torch.export.export(model, (), kwargs=sample, dynamic_shapes=dynamic)
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(5, model.config.vocab_size, (4, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[3, :2] = 0
    got = program.module()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    with torch.no_grad():
        expected = model.set_unpadding(True)(input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
