"""Plain ALBERT checkpoints (transformers' own classes) load and give transformers' outputs."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    AlbertForQuestionAnswering,
    AlbertForSequenceClassification,
    AlbertForTokenClassification,
    AlbertModel,
)

from fastmini import (
    CheckpointError,
    FastMiniConfig,
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
)

RTOL = 1e-5
PAIRS = {
    "model": (AlbertModel, FastMiniModel, "last_hidden_state"),
    "masked_lm": (AlbertForMaskedLM, FastMiniForMaskedLM, "logits"),
    "sequence_classification": (AlbertForSequenceClassification, FastMiniForSequenceClassification, "logits"),
    "token_classification": (AlbertForTokenClassification, FastMiniForTokenClassification, "logits"),
}


def albert_config(**overrides) -> AlbertConfig:
    fields = dict(
        vocab_size=99,
        embedding_size=16,
        hidden_size=36,
        num_attention_heads=6,
        intermediate_size=37,
        num_hidden_layers=3,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return AlbertConfig(**{**fields, **overrides})


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu"])
@pytest.mark.parametrize("embedding_size", [16, 36], ids=["E!=H", "E==H"])
def test_albert_checkpoint_parity(kind, hidden_act, embedding_size, randomize, batch, tmp_path):
    albert_class, fastmini_class, output_name = PAIRS[kind]
    albert = randomize(albert_class(albert_config(hidden_act=hidden_act, embedding_size=embedding_size))).eval()
    if kind == "masked_lm":
        albert.tie_weights()  # randomize() broke the tie; transformers' checkpoints are tied
    albert.save_pretrained(tmp_path)
    model = fastmini_class.from_pretrained(tmp_path)
    assert model.config.head_variant == "albert"
    assert model.config.use_embedding_projection  # ALBERT always projects E -> H
    with torch.no_grad():
        expected = albert(**batch, output_hidden_states=True, output_attentions=True)
        ours = model(**batch, output_hidden_states=True, output_attentions=True)
    real = batch["attention_mask"].bool()  # fastmini computes nothing at padded positions

    def at_real_tokens(tensor):
        return tensor[real] if tensor.dim() == 3 else tensor

    assert relative_error(at_real_tokens(ours[output_name]), at_real_tokens(expected[output_name])) <= RTOL
    for a, b in zip(ours.hidden_states, expected.hidden_states, strict=True):
        assert relative_error(a[real], b[real]) <= RTOL
    for a, b in zip(ours.attentions, expected.attentions, strict=True):
        # (B, A, S, S): the query rows of real tokens, every key column
        assert relative_error(a.transpose(1, 2)[real], b.transpose(1, 2)[real]) <= RTOL
    if kind == "model":
        assert relative_error(ours.pooler_output, expected.pooler_output) <= RTOL


def test_training_mode_draws_albert_s_dropouts(tmp_path):
    """AlbertLayer drops out its attention output but not its FFN output (it builds a dropout it never calls); the
    MiniALBERT layer drops out both (SPEC.md). With one seed, a converted checkpoint in training mode gives
    transformers' outputs: the same dropout calls in the same order (no padding: the same tensors drawn)."""
    config = albert_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    albert = AlbertModel(config).train()
    albert.save_pretrained(tmp_path)
    model = FastMiniModel.from_pretrained(tmp_path).train()
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    outputs = []
    for module in (albert, model):
        torch.manual_seed(5)
        outputs.append(module(input_ids=input_ids).last_hidden_state)
    assert relative_error(outputs[1], outputs[0]) <= RTOL


def test_explicit_position_ids_may_describe_a_sequence_longer_than_the_table(randomize, tmp_path):
    """Only the default ids (0 .. S-1) need S <= max_position_embeddings; given ids are looked up as ALBERT does."""
    albert = randomize(AlbertModel(albert_config(max_position_embeddings=8))).eval()
    albert.save_pretrained(tmp_path)
    model = FastMiniModel.from_pretrained(tmp_path)
    input_ids = torch.randint(1, 99, (2, 10))
    position_ids = torch.arange(10).expand(2, 10) % 8
    with torch.no_grad():
        expected = albert(input_ids, position_ids=position_ids).last_hidden_state
        ours = model(input_ids, position_ids=position_ids).last_hidden_state
    assert relative_error(ours, expected) <= RTOL
    with pytest.raises(ValueError, match=r"sequence length 10 exceeds max_position_embeddings \(8\)"):
        model(input_ids)


def test_albert_masked_lm_decoder_is_tied(tmp_path):
    AlbertForMaskedLM(albert_config()).save_pretrained(tmp_path)
    model = FastMiniForMaskedLM.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.decoder.weight.data_ptr() == model.fastmini.embeddings.word_embeddings.weight.data_ptr()


def test_output_choices_of_an_albert_config_are_kept(batch, tmp_path):
    """A checkpoint saved asking for hidden states (or tuples) gives them as transformers' own loader would."""
    AlbertModel(albert_config(output_hidden_states=True, output_attentions=True)).save_pretrained(tmp_path)
    albert, model = AlbertModel.from_pretrained(tmp_path), FastMiniModel.from_pretrained(tmp_path)
    with torch.no_grad():
        expected, ours = albert(**batch), model(**batch)
    assert len(ours.hidden_states) == len(expected.hidden_states) == 4
    # transformers' model loads with SDPA, which returns no maps; fastmini gives them, as eager ALBERT would
    assert len(ours.attentions) == model.config.num_hidden_layers == 3
    AlbertModel(albert_config(return_dict=False)).save_pretrained(tmp_path / "tuples")
    with torch.no_grad():
        assert isinstance(FastMiniModel.from_pretrained(tmp_path / "tuples")(**batch), tuple)


@pytest.mark.parametrize("field", ["num_hidden_groups", "inner_group_num"])
def test_unsupported_albert_variants_are_refused(field, tmp_path):
    AlbertModel(albert_config(**{field: 3})).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=field):
        FastMiniModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("hidden_act, approximation", [("gelu_python", "none"), ("gelu_fast", "tanh")])
def test_gelu_spellings_of_the_supported_variants(hidden_act, approximation, randomize, batch, tmp_path):
    """transformers' "gelu_python" (erf) and "gelu_fast" (tanh) are the GELUs fastmini runs."""
    from transformers.activations import ACT2FN

    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(ACT2FN[hidden_act](x), torch.nn.functional.gelu(x, approximate=approximation))
    albert = randomize(AlbertModel(albert_config(hidden_act=hidden_act))).eval()
    albert.save_pretrained(tmp_path)
    model = FastMiniModel.from_pretrained(tmp_path)
    assert model.config.gelu_approximation == approximation
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, ours = albert(**batch), model(**batch)
    assert relative_error(ours.last_hidden_state[real], expected.last_hidden_state[real]) <= RTOL


def test_question_answering_checkpoint_loads_its_encoder(randomize, batch, tmp_path):
    """fastmini has no QA head: qa_outputs is dropped as the other unused ALBERT heads are."""
    albert = randomize(AlbertForQuestionAnswering(albert_config())).eval()
    albert.save_pretrained(tmp_path)
    model = FastMiniModel.from_pretrained(tmp_path)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, ours = albert.albert(**batch), model(**batch)
    assert relative_error(ours.last_hidden_state[real], expected.last_hidden_state[real]) <= RTOL


def test_config_from_pretrained_converts_an_albert_directory(randomize, batch, tmp_path):
    """FastMiniConfig.from_pretrained(<ALBERT dir>) passed back as config= loads the same model."""
    albert = randomize(AlbertForSequenceClassification(albert_config(num_labels=3))).eval()
    albert.save_pretrained(tmp_path)
    config = FastMiniConfig.from_pretrained(tmp_path)
    assert config.head_variant == "albert" and config.tie_word_embeddings and config.num_labels == 3
    model = FastMiniForSequenceClassification.from_pretrained(tmp_path, config=config)
    with torch.no_grad():
        assert relative_error(model(**batch).logits, albert(**batch).logits) <= RTOL
