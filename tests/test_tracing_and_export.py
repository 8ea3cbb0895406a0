"""Graph recorders on a model as users get it (unpadding on): torch.jit.trace, torch.export, the ONNX exporters.

A recorder keeps one graph for every later input, so a model that unpads would bake the example's mask
into it (the "no padding" branch of an all-real example, or its count of real tokens). While a graph is
recorded the model takes the padded layout, whose shapes do not depend on the mask's values: the
recorded graph must honour other masks, batch sizes and lengths like the eager model does.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastmini import FastMiniForSequenceClassification, FastMiniModel


def padded_batch(vocab_size: int, shape=(4, 11), seed: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, shape, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, shape[1] // 2 :] = 0  # padded on the right
    attention_mask[-1, :2] = 0  # and on the left
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def unpadded_example(vocab_size: int) -> dict[str, torch.Tensor]:
    """One tokenised sentence, what users trace with: its mask is all ones."""
    input_ids = torch.randint(5, vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def eager_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def classifier(tiny_config, randomize):
    return randomize(FastMiniForSequenceClassification(tiny_config(num_labels=3)), 0.2).eval()


def test_jit_trace_of_an_unpadded_example_honours_the_masks_of_later_batches(classifier):
    example, batch = unpadded_example(classifier.config.vocab_size), padded_batch(classifier.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(classifier, (example["input_ids"], example["attention_mask"]), strict=False)
    got = traced(batch["input_ids"], batch["attention_mask"])["logits"]
    torch.testing.assert_close(got, eager_logits(classifier, batch), rtol=1e-5, atol=1e-5)
    assert classifier.fastmini.unpadding  # the eager model still unpads


def test_jit_trace_of_a_prepacked_model_runs_the_plain_ops(classifier):
    """oneDNN's fused linear (optimize_for_inference) cannot be recorded by the tracer."""
    batch = padded_batch(classifier.config.vocab_size)
    expected = eager_logits(classifier, batch)
    classifier.optimize_for_inference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(classifier, (batch["input_ids"], batch["attention_mask"]), strict=False)
    torch.testing.assert_close(traced(batch["input_ids"], batch["attention_mask"])["logits"], expected)


def test_torch_export_of_a_default_model_serves_other_masks_batches_and_lengths(classifier):
    vocab_size = classifier.config.vocab_size
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=classifier.config.max_position_embeddings)
    dynamic = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    program = torch.export.export(classifier, (), kwargs=padded_batch(vocab_size, (3, 9), 5), dynamic_shapes=dynamic)
    for shape in ((4, 11), (2, 5)):
        other = padded_batch(vocab_size, shape)
        got = program.module()(**other).logits
        torch.testing.assert_close(got, eager_logits(classifier, other), rtol=1e-5, atol=1e-5)


def test_legacy_onnx_export_with_dynamic_axes(tiny_config, randomize, tmp_path):
    """The TorchScript-based exporter (dynamo=False), which tools such as optimum still use: the LayerNorms'
    width must be a constant of the graph, not read from a dynamic input's shape."""
    pytest.importorskip("onnx")  # the dev extra has it (make test); a plain install does not
    onnxruntime = pytest.importorskip("onnxruntime")
    model = randomize(FastMiniModel(tiny_config(return_dict=False)), 0.2).eval()
    example = padded_batch(model.config.vocab_size, (3, 9), 5)
    path = tmp_path / "model.onnx"
    axes = {0: "batch", 1: "length"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example["input_ids"], example["attention_mask"]),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes},
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = padded_batch(model.config.vocab_size, (4, 11))
    (got,) = session.run(["last_hidden_state"], {name: tensor.numpy() for name, tensor in other.items()})
    with torch.no_grad():
        expected = model(**other)[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


def test_a_recorded_graph_holds_plain_torch_ops_where_triton_would_be_chosen(classifier, monkeypatch):
    """Automatic choice picks the Triton kernels here (the interpreter on the CPU, verified kernels on a GPU):
    a recorded graph takes the torch ops instead, so that the ONNX exporters, AOTInductor and processes
    without fastmini can run it."""
    from fastmini.ops import resolve_backend
    from fastmini.ops.adapter_bottleneck import _BACKENDS

    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    batch = padded_batch(classifier.config.vocab_size, (3, 9), 5)
    assert resolve_backend("adapter_bottleneck", batch["input_ids"].float(), None, _BACKENDS) == "triton"
    program = torch.export.export(classifier, (), kwargs=batch)
    custom = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [target for target in custom if "fastmini" in target], custom
    other = padded_batch(classifier.config.vocab_size, (3, 9), 11)
    monkeypatch.setenv("FASTMINI_BACKEND", "torch")
    torch.testing.assert_close(program.module()(**other).logits, eager_logits(classifier, other), rtol=1e-5, atol=1e-5)


def test_onnx_export_of_a_default_model_runs_in_onnxruntime(classifier, tmp_path):
    """torch.onnx.export's default (dynamo) exporter on a model as users get it: other masks, batch sizes and
    lengths through onnxruntime equal the eager model."""
    pytest.importorskip("onnxscript")  # the dynamo exporter's
    onnxruntime = pytest.importorskip("onnxruntime")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=classifier.config.max_position_embeddings)
    dynamic = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    path = tmp_path / "classifier.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            classifier,
            (),
            str(path),
            kwargs=padded_batch(classifier.config.vocab_size, (3, 9), 5),
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    for shape in ((4, 11), (2, 5)):
        other = padded_batch(classifier.config.vocab_size, shape)
        outputs = dict(zip(names, session.run(None, {k: v.numpy() for k, v in other.items()}), strict=True))
        logits = torch.from_numpy(outputs.get("logits", next(iter(outputs.values()))))
        torch.testing.assert_close(logits, eager_logits(classifier, other), rtol=1e-4, atol=1e-5)
