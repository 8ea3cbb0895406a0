"""The teacher's matched-layer maps (fastmini.distill.teacher_attention) against transformers' eager teacher."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from fastmini.distill.distiller import Batch, teacher_forward
from fastmini.distill.models import Teacher
from fastmini.distill.teacher_attention import ATTENTION_NAME, matched_maps, supports_matched_maps

LENGTHS = (9, 5, 2)  # one full row, two padded ones
LAYERS = 4


@pytest.fixture(scope="module")
def teacher_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        attn_implementation="eager",
    )  # fmt: skip
    return BertForMaskedLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, 100, mask.shape, generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def eager_forward(encoder, inputs):
    with torch.inference_mode():
        return encoder(**inputs, output_attentions=True, output_hidden_states=True)


def captured_forward(encoder, inputs, layers):
    with torch.inference_mode(), matched_maps(encoder, layers) as maps:
        output = encoder(**inputs, output_hidden_states=True)
    return output, maps.collected()


def sdpa_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::scaled_dot_product_attention")


def test_the_bert_teacher_supports_matched_maps(teacher_model):
    assert supports_matched_maps(teacher_model.bert)


def test_matched_maps_and_states_are_the_eager_teachers(teacher_model, inputs):
    encoder = teacher_model.bert
    reference = eager_forward(encoder, inputs)
    output, maps = captured_forward(encoder, inputs, (2, 4))
    assert len(maps) == 2
    for got, layer in zip(maps, (2, 4), strict=True):
        torch.testing.assert_close(got, reference.attentions[layer - 1], rtol=0, atol=1e-6)
    for got, expected in zip(output.hidden_states, reference.hidden_states, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_layer_matched_twice_fills_both_slots(teacher_model, inputs):
    """An explicit layer map may repeat a layer (more recursions than teacher layers)."""
    reference = eager_forward(teacher_model.bert, inputs)
    _, maps = captured_forward(teacher_model.bert, inputs, (1, 1, 3, 3))
    assert maps[0] is maps[1] and maps[2] is maps[3]
    torch.testing.assert_close(maps[0], reference.attentions[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(maps[3], reference.attentions[2], rtol=0, atol=1e-6)


def test_every_layer_matched_is_bit_for_bit_the_eager_teacher(teacher_model, inputs):
    """In a matched layer the formula is transformers' eager one, op for op."""
    encoder = teacher_model.bert
    reference = eager_forward(encoder, inputs)
    output, maps = captured_forward(encoder, inputs, tuple(range(1, LAYERS + 1)))
    assert all(torch.equal(got, expected) for got, expected in zip(maps, reference.attentions, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(output.hidden_states, reference.hidden_states, strict=True))


def test_unmatched_layers_attend_through_sdpa(teacher_model, inputs):
    encoder = teacher_model.bert
    assert sdpa_calls(lambda: captured_forward(encoder, inputs, (2, 4))) == LAYERS - 2
    assert sdpa_calls(lambda: captured_forward(encoder, inputs, ())) == LAYERS
    assert sdpa_calls(lambda: eager_forward(encoder, inputs)) == 0


def test_the_capture_restores_the_attention_implementation(teacher_model, inputs):
    encoder = teacher_model.bert
    with pytest.raises(ValueError, match="inside"), matched_maps(encoder, (1,)):
        assert encoder.config._attn_implementation == ATTENTION_NAME
        raise ValueError("inside")
    assert encoder.config._attn_implementation == "eager"
    assert len(eager_forward(encoder, inputs).attentions) == LAYERS  # the eager path is whole again


def test_one_capture_at_a_time(teacher_model):
    encoder = teacher_model.bert
    with matched_maps(encoder, (1,)), pytest.raises(RuntimeError, match="one capture at a time"):
        with matched_maps(encoder, (2,)):
            pass
    assert encoder.config._attn_implementation == "eager"


def test_teacher_forward_gives_the_same_maps_with_or_without_the_capture(teacher_model, inputs, monkeypatch):
    teacher = Teacher(teacher_model.bert, teacher_model.cls, teacher_model.config, "test")
    labels = inputs["input_ids"].masked_fill(torch.rand(inputs["input_ids"].shape) < 0.5, -100)
    batch = Batch(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], labels)
    captured = teacher_forward(teacher, batch, (2, 4), True, True, True)
    # A teacher whose attention does not go through transformers' interface: every layer eager, maps recorded.
    monkeypatch.setattr(teacher_model.bert, "_supports_attention_backend", False, raising=False)
    assert not supports_matched_maps(teacher_model.bert)
    recorded = teacher_forward(teacher, batch, (2, 4), True, True, True)
    for got, expected in zip(captured.attentions, recorded.attentions, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for got, expected in zip(captured.hidden, recorded.hidden, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(captured.masked_logits, recorded.masked_logits, rtol=0, atol=1e-5)


def _other_encoder(family: str):
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    if family == "roberta":
        config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                               intermediate_size=64, attn_implementation="eager")  # fmt: skip
        return RobertaModel(config).eval()
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=64,
                              attn_implementation="eager")  # fmt: skip
    return DistilBertModel(config).eval()


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_encoder_families_capture_the_same_maps(family, inputs, monkeypatch):
    """Teachers other than BERT (any encoder on transformers' attention interface): captured == recorded."""
    encoder = _other_encoder(family)
    assert supports_matched_maps(encoder)
    teacher = Teacher(encoder, None, encoder.config, family)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    batch = Batch(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], labels)
    captured = teacher_forward(teacher, batch, (2, 4), True, True, False)
    monkeypatch.setattr(encoder, "_supports_attention_backend", False, raising=False)
    recorded = teacher_forward(teacher, batch, (2, 4), True, True, False)
    for got, expected in zip(captured.attentions + captured.hidden, recorded.attentions + recorded.hidden, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
