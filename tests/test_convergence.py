"""A tiny model trained through the Triton kernels follows the torch reference step by step.

Both runs start from the same weights and see the same batches; dropout is off so that the
two paths compute the same function. Under TRITON_INTERPRET=1 the kernels run on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastmini import FastMiniForMaskedLM, FastMiniForSequenceClassification

STEPS = 20


def train(model, batches, monkeypatch, backend: str) -> list[float]:
    monkeypatch.setenv("FASTMINI_BACKEND", backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def launches_per_step(config, head_gelu: bool) -> dict[str, int]:
    """Forward launches of each Triton kernel in one training step: per recursion two add-and-norms, one
    Linear+GELU and (with adapters) two adapters; the MLM head's transform adds one Linear+GELU. Backward
    launches no forward kernel (no activation checkpointing here)."""
    n = config.num_hidden_layers
    return {
        "add_layer_norm": STEPS * 2 * n,
        "linear_gelu": STEPS * (n + head_gelu),
        "adapter_bottleneck": STEPS * 2 * n if config.use_adapter else 0,
    }


def masked_lm_batches(generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    batches = []
    for _ in range(STEPS):
        input_ids = torch.randint(5, 99, (4, 9), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[2:, 6:] = 0
        labels = input_ids.masked_fill(torch.rand(4, 9, generator=generator) > 0.3, -100)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


@pytest.mark.parametrize("use_adapter", [True, False], ids=["adapters", "no-adapters"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_masked_lm_losses_match(use_adapter, hidden_act, tiny_config, monkeypatch, triton_launches):
    config = tiny_config(
        use_adapter=use_adapter, hidden_act=hidden_act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    reference = FastMiniForMaskedLM(config)
    fused = copy.deepcopy(reference)
    batches = masked_lm_batches(torch.Generator().manual_seed(0))
    expected = train(reference, batches, monkeypatch, "torch")
    assert triton_launches == dict.fromkeys(triton_launches, 0)
    actual = train(fused, batches, monkeypatch, "triton")
    assert triton_launches == launches_per_step(config, head_gelu=True)  # every fused op ran as a kernel
    assert expected[-1] < expected[0]  # the run learns something, so the comparison means something
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fused.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_adapter_tuning_losses_match(tiny_config, monkeypatch, triton_launches):
    config = tiny_config(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    reference = FastMiniForSequenceClassification(config)
    reference.train_adapters_only()
    fused = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    # Four batches seen STEPS // 4 times: random labels cannot be learnt across fresh batches, but the
    # adapters can fit these four, which shows as each batch's loss falling from the first pass to the last.
    batches = [
        {
            "input_ids": torch.randint(5, 99, (4, 9), generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(4)
    ] * (STEPS // 4)
    expected = train(reference, batches, monkeypatch, "torch")
    assert triton_launches == dict.fromkeys(triton_launches, 0)
    actual = train(fused, batches, monkeypatch, "triton")
    assert config.use_adapter and triton_launches == launches_per_step(config, head_gelu=False)
    # the adapters learn something, so the comparison means something
    assert all(last < first for first, last in zip(expected[:4], expected[-4:], strict=True)), expected
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-4, atol=1e-5)
