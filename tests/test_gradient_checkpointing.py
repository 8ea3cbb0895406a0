"""Activation checkpointing through transformers' switch: one recursion at a time, same gradients.

With checkpointing on, backward recomputes each recursion from its input; the dropout masks must
come back identical (torch.utils.checkpoint restores the RNG states, and the fused dropout's seed is
drawn from torch's CPU generator), so loss and every gradient equal the run without it.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from fastmini import FastMiniForSequenceClassification
from fastmini.training.memory import enable_activation_checkpointing


def loss_and_grads(model, batch, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout draws in both runs (CPU and CUDA generators)
    loss = model(**batch, labels=torch.tensor([0, 1], device=batch["input_ids"].device)).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def saved_bytes(model, batch) -> int:
    """Bytes of activations autograd keeps for backward during one training forward (distinct
    storages, parameters not counted)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch, labels=torch.tensor([0, 1]))
    return sum(kept.values())


def make_model(tiny_config, randomize, **overrides):
    config = tiny_config(num_labels=2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, **overrides)
    return randomize(FastMiniForSequenceClassification(config), 0.2).train()


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_loss_and_gradients_with_dropout(
    device, use_reentrant, backend, tiny_config, randomize, batch, monkeypatch, triton_launches
):
    monkeypatch.setenv("FASTMINI_BACKEND", backend)
    model = make_model(tiny_config, randomize).to(device)
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    n = model.config.num_hidden_layers
    # Per recursion two add-and-norms, one Linear+GELU, two adapters; no kernel under backend "torch"
    per_pass = {"add_layer_norm": 2 * n, "linear_gelu": n, "adapter_bottleneck": 2 * n}
    if backend == "torch":
        per_pass = dict.fromkeys(per_pass, 0)
    expected_loss, expected = loss_and_grads(model, batch)
    assert triton_launches == per_pass
    enable_activation_checkpointing(model, use_reentrant)
    assert model.fastmini.encoder.gradient_checkpointing
    loss, grads = loss_and_grads(model, batch)
    # backward recomputed every recursion (through the kernels too): a second forward's launches
    assert triton_launches == {op: 3 * count for op, count in per_pass.items()}
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == expected.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_backward_keeps_less(tiny_config, randomize, batch):
    model = make_model(tiny_config, randomize, num_hidden_layers=6)
    plain = saved_bytes(model, batch)
    enable_activation_checkpointing(model, use_reentrant=False)
    checkpointed = saved_bytes(model, batch)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_adapter_tuning_with_checkpointing(tiny_config, randomize, batch):
    """Frozen embeddings and shared layer: the adapters still get their gradients (reentrant
    checkpointing would drop them if no input required grad; transformers' switch makes the
    embeddings' output require it)."""
    model = make_model(tiny_config, randomize)
    model.train_adapters_only()
    _, expected = loss_and_grads(model, batch)
    enable_activation_checkpointing(model, use_reentrant=True)
    _, grads = loss_and_grads(model, batch)
    adapters = [name for name in expected if "adapters" in name]
    assert adapters and grads.keys() == expected.keys()
    assert not any("shared_layer" in name or "embeddings" in name for name in grads)
    for name in adapters:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_inference_is_not_checkpointed(tiny_config, randomize, batch):
    model = make_model(tiny_config, randomize).eval()
    enable_activation_checkpointing(model, use_reentrant=False)
    calls = []
    encoder = model.fastmini.encoder
    original = encoder._gradient_checkpointing_func
    encoder._gradient_checkpointing_func = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert len(calls) == model.config.num_hidden_layers  # training only, once per recursion


def test_every_n_layers_counts_recursions(tiny_config, randomize, batch):
    """transformers' every_n_layers (activation_checkpointing_enable from transformers 5.23, before it
    gradient_checkpointing_enable): with 5 recursions and n = 2, recursions 0, 2 and 4 are checkpointed; the
    gradients stay the same."""
    model = make_model(tiny_config, randomize, num_hidden_layers=5)
    switch = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    if "every_n_layers" not in inspect.signature(switch).parameters:
        pytest.skip("this transformers has no every_n_layers")
    _, expected = loss_and_grads(model, batch)
    switch({"use_reentrant": False}, every_n_layers=2)
    encoder = model.fastmini.encoder
    checkpointed = []
    original = encoder._gradient_checkpointing_func

    def counting(function, h, index, *rest, **options):
        checkpointed.append(index)
        return original(function, h, index, *rest, **options)

    encoder._gradient_checkpointing_func = counting
    _, grads = loss_and_grads(model, batch)
    assert checkpointed == [0, 2, 4]
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    model.gradient_checkpointing_disable()
    assert encoder.checkpoint_every == 1 and not encoder.gradient_checkpointing
    with pytest.raises(ValueError, match="every_n_layers must be an int >= 1"):
        switch({"use_reentrant": False}, every_n_layers=0)  # not a ZeroDivisionError at the first forward
