"""Model behaviour beyond parity: outputs asked for, dropout, losses, inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmini import (
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
)
from fastmini.ops import attention as attention_op


def test_output_counts(tiny_config, batch):
    model = FastMiniModel(tiny_config(num_hidden_layers=4)).eval()
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5  # projected embeddings + one per recursion
    assert len(out.attentions) == 4
    assert out.attentions[0].shape == (2, 6, 7, 7)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert out.hidden_states[0].shape[-1] == 36  # after the E -> H projector
    plain = model(**batch)
    assert plain.hidden_states is None and plain.attentions is None


def test_probabilities_are_materialised_only_when_asked(tiny_config, batch, monkeypatch):
    calls = []
    original = attention_op.self_attention_ref
    monkeypatch.setattr(attention_op, "self_attention_ref", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = FastMiniModel(tiny_config()).eval()
    model(**batch)
    assert calls == []
    model(**batch, output_attentions=True)
    assert len(calls) == model.config.num_hidden_layers


def test_padding_keys_get_no_attention(tiny_config, batch):
    out = FastMiniModel(tiny_config()).eval()(**batch, output_attentions=True)
    for probabilities in out.attentions:
        assert torch.all(probabilities[1, :, :, 4:] == 0)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 6, 7))


def test_padding_does_not_change_real_tokens(tiny_config, batch):
    model = FastMiniModel(tiny_config()).eval()
    full = model(**batch).last_hidden_state
    alone = model(**{k: v[1:, :4] for k, v in batch.items()}).last_hidden_state
    torch.testing.assert_close(full[1:, :4], alone, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training(tiny_config, batch):
    model = FastMiniModel(tiny_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))
    model.train()
    torch.manual_seed(0)
    a = model(**batch).last_hidden_state
    b = model(**batch).last_hidden_state
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_token_types_and_positions_matter(tiny_config, batch):
    model = FastMiniModel(tiny_config()).eval()
    base = model(**batch).last_hidden_state
    assert not torch.allclose(
        base,
        model(**{**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])}).last_hidden_state,
    )
    shifted = torch.arange(1, 8).expand(2, 7)
    assert not torch.allclose(base, model(**batch, position_ids=shifted).last_hidden_state)
    default = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(base, model(**batch, position_ids=default).last_hidden_state)


def test_inputs_embeds_equals_input_ids(tiny_config, batch):
    model = FastMiniModel(tiny_config()).eval()
    embeds = model.embeddings.word_embeddings(batch["input_ids"])
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    torch.testing.assert_close(model(inputs_embeds=embeds, **rest).last_hidden_state, model(**batch).last_hidden_state)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(inputs_embeds=embeds, **batch)
    hidden_wide = torch.zeros(*batch["input_ids"].shape, model.config.hidden_size)  # BERT's habit: E = H
    with pytest.raises(ValueError, match=r"inputs_embeds must be embedding_size \(16\) wide.*got 36"):
        model(inputs_embeds=hidden_wide, **rest)


def test_bad_shapes_are_named(tiny_config, batch):
    model = FastMiniModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="attention_mask must have the"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"][:, :5])
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "model_class",
    [FastMiniModel, FastMiniForMaskedLM, FastMiniForSequenceClassification, FastMiniForTokenClassification],
)
def test_head_mask_none_is_taken_and_a_mask_refused(model_class, tiny_config, batch):
    """transformers' ALBERT takes head_mask (5 ignores it): code that passes None runs unchanged."""
    model = model_class(tiny_config()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, head_mask=None)[0], model(**batch)[0], rtol=0, atol=0)
        with pytest.raises(ValueError, match="head_mask is not supported"):
            model(**batch, head_mask=torch.ones(2, 2))


def test_return_dict_false_gives_tuples(tiny_config, batch):
    model = FastMiniForMaskedLM(tiny_config()).eval()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss, logits = model(**batch, labels=labels, return_dict=False)
    expected = model(**batch, labels=labels)
    torch.testing.assert_close(logits, expected.logits)
    assert loss.shape == () and loss > 0
    torch.testing.assert_close(loss, expected.loss)


def test_masked_lm_loss_ignores_unlabelled_positions(tiny_config, batch):
    model = FastMiniForMaskedLM(tiny_config()).eval()
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 2], labels[1, 1] = 5, 7
    out = model(**batch, labels=labels)
    expected = F.cross_entropy(out.logits[[0, 1], [2, 1]], torch.tensor([5, 7]))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "num_labels, labels, problem_type",
    [
        (1, torch.tensor([0.5, -1.0]), "regression"),
        (3, torch.tensor([2, 0]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), "multi_label_classification"),
    ],
)
def test_sequence_classification_losses(num_labels, labels, problem_type, tiny_config, batch):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=num_labels)).eval()
    out = model(**batch, labels=labels)
    assert model.config.problem_type == problem_type
    logits = out.logits
    expected = {
        "regression": lambda: F.mse_loss(logits.squeeze(), labels),
        "single_label_classification": lambda: F.cross_entropy(logits, labels),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels),
    }[problem_type]()
    torch.testing.assert_close(out.loss, expected)
    # MiniALBERT classifies from the first token's final hidden state
    hidden = model.fastmini(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(logits, model.classifier(hidden))


def test_multi_label_soft_targets_keep_their_precision_beside_16_bit_logits(tiny_config, batch):
    """A bf16 model's multi-label loss takes soft targets as given (0.3, not bf16's 0.30078), in fp32."""
    model = FastMiniForSequenceClassification(tiny_config(num_labels=3)).eval().to(torch.bfloat16)
    labels = torch.tensor([[0.3, 0.0, 1.0], [0.7, 0.1, 0.0]])
    out = model(**batch, labels=labels)
    assert model.config.problem_type == "multi_label_classification"
    expected = F.binary_cross_entropy_with_logits(out.logits.float(), labels)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)


def test_token_classification_loss(tiny_config, batch):
    model = FastMiniForTokenClassification(tiny_config(num_labels=4)).eval()
    labels = torch.randint(0, 4, (2, 7)).masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, 7, 4)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.view(-1, 4), labels.view(-1)))


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("model_class", [FastMiniForTokenClassification, FastMiniForMaskedLM])
def test_token_labels_may_come_flattened_as_albert_takes_them(model_class, unpad, tiny_config, batch):
    model = model_class(tiny_config(num_labels=4)).eval().set_unpadding(unpad)
    labels = torch.randint(0, 4, (2, 7)).masked_fill(batch["attention_mask"] == 0, -100)
    grid = model(**batch, labels=labels).loss
    torch.testing.assert_close(model(**batch, labels=labels.view(-1)).loss, grid)
    with pytest.raises(ValueError, match=r"labels must be \(batch, sequence\) = \(2, 7\).*got shape \(2, 6\)"):
        model(**batch, labels=labels[:, :6])


@pytest.mark.parametrize("unpad", [True, False])
def test_an_input_of_length_zero_is_refused_where_a_first_token_is_read(unpad, tiny_config, batch):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=3)).eval().set_unpadding(unpad)
    with pytest.raises(ValueError, match="sequence length 0"):
        model(batch["input_ids"][:, :0], batch["attention_mask"][:, :0])


def test_gradients_reach_every_parameter(tiny_config, batch):
    model = FastMiniForMaskedLM(tiny_config()).train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        if name.endswith("position_embeddings.weight") or name.endswith("token_type_embeddings.weight"):
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded-layout"])
@pytest.mark.parametrize("head_variant", ["minialbert", "albert"])
def test_classification_reads_the_first_real_token_with_left_padding(tiny_config, batch, unpad, head_variant):
    """Left padding (padding_side="left") classifies like right padding: position 0 is padding there."""
    model = FastMiniForSequenceClassification(tiny_config(num_labels=3, head_variant=head_variant)).eval()
    model.set_unpadding(unpad)
    right = batch["attention_mask"]
    order = torch.argsort(right, dim=1, stable=True)  # each row's padding first, then its tokens in order
    left = {name: value.gather(1, order) for name, value in batch.items()}
    positions = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)  # the tokens keep their positions
    with torch.no_grad():
        expected = model(**batch)
        actual = model(**left, position_ids=positions)
        torch.testing.assert_close(actual.logits, expected.logits)
        base = model.fastmini
        torch.testing.assert_close(
            base(**left, position_ids=positions).pooler_output if head_variant == "albert" else actual.logits,
            base(**batch).pooler_output if head_variant == "albert" else expected.logits,
        )


def test_a_row_without_real_tokens_classifies_from_zeros(tiny_config, batch):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=3)).eval()
    mask = batch["attention_mask"].clone()
    mask[1] = 0
    with torch.no_grad():
        logits = model(batch["input_ids"], mask).logits
    torch.testing.assert_close(logits[1], model.classifier.bias)


def test_unbatched_input_is_refused_with_a_hint(tiny_config, batch):
    model = FastMiniModel(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"input_ids must be batched.*input_ids\[None\]"):
        model(batch["input_ids"][0])
