"""Building a student from a teacher config and another model's embeddings (SPEC.md, Model 7)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from fastmini import FastMiniConfig, FastMiniForMaskedLM, copy_embeddings


def small_bert(hidden: int = 36) -> BertModel:
    return BertModel(
        BertConfig(
            vocab_size=99,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=6,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )


def test_from_teacher_takes_widths_and_vocab():
    teacher = BertConfig(
        vocab_size=99, hidden_size=36, num_attention_heads=6, intermediate_size=48, num_hidden_layers=12
    )
    config = FastMiniConfig.from_teacher(
        teacher, num_recursions=6, embedding_size=16, use_adapter=True, reduction_factor=4
    )
    assert (config.vocab_size, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        99,
        36,
        6,
        48,
    )
    assert (config.num_hidden_layers, config.embedding_size, config.reduction_factor, config.use_adapter) == (
        6,
        16,
        4,
        True,
    )
    assert config.num_recursions == 6
    with pytest.raises(ValueError, match="divisible by reduction_factor"):
        FastMiniConfig.from_teacher(teacher, reduction_factor=5)


def test_copy_embeddings_from_a_small_bert():
    source = small_bert(hidden=36)
    with torch.no_grad():  # every tensor unlike a fresh model's (a fresh LayerNorm is ones and zeros)
        for parameter in source.embeddings.parameters():
            parameter.normal_()
    config = FastMiniConfig(
        vocab_size=99,
        embedding_size=36,
        hidden_size=36,
        num_attention_heads=6,
        intermediate_size=48,
        reduction_factor=4,
        max_position_embeddings=64,
    )
    student = FastMiniForMaskedLM(config)
    copy_embeddings(student, source)
    ours, theirs = student.fastmini.embeddings, source.embeddings
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert torch.equal(getattr(ours, table).weight, getattr(theirs, table).weight), table
    assert torch.equal(ours.norm.weight, theirs.LayerNorm.weight) and torch.equal(ours.norm.bias, theirs.LayerNorm.bias)


def test_copy_embeddings_checks_shapes():
    student = FastMiniForMaskedLM(
        FastMiniConfig(
            vocab_size=99,
            embedding_size=16,
            hidden_size=36,
            num_attention_heads=6,
            reduction_factor=4,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(
        ValueError, match=r"word_embeddings of BertModel has shape \(99, 36\), the student expects \(99, 16\)"
    ):
        copy_embeddings(student, small_bert(hidden=36))
    with pytest.raises(ValueError, match="no BERT-style embeddings"):
        copy_embeddings(student, torch.nn.Linear(2, 2))
