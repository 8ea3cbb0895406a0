"""fastmini models inside transformers' own machinery: pipelines and Trainer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertTokenizerFast,
    Trainer,
    TrainingArguments,
    pipeline,
)

from fastmini import FastMiniForMaskedLM, FastMiniForSequenceClassification, FastMiniForTokenClassification

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "good", "bad", "movie", "film", "was", "very"]


@pytest.fixture
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(99 - len(vocab))]
    return BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=True)


def save(model, tokenizer, directory):
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_fill_mask_pipeline(tiny_config, tokenizer, tmp_path):
    directory = save(FastMiniForMaskedLM(tiny_config()), tokenizer, tmp_path)
    fill = pipeline("fill-mask", model=directory, device="cpu")
    assert isinstance(fill.model, FastMiniForMaskedLM)
    predictions = fill("the cat [MASK] on the mat", top_k=3)
    assert len(predictions) == 3
    assert all(0.0 <= p["score"] <= 1.0 and p["token_str"] for p in predictions)


def test_text_classification_pipeline(tiny_config, tokenizer, tmp_path):
    config = tiny_config(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    directory = save(FastMiniForSequenceClassification(config), tokenizer, tmp_path)
    classify = pipeline("text-classification", model=directory, device="cpu")
    results = classify(["a very good film", "a bad movie"])
    assert [r["label"] in ("NEGATIVE", "POSITIVE") for r in results] == [True, True]


def test_token_classification_pipeline(tiny_config, tokenizer, tmp_path):
    labels = ["O", "B-ANIMAL", "I-ANIMAL"]
    config = tiny_config(num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    directory = save(FastMiniForTokenClassification(config), tokenizer, tmp_path)
    tag = pipeline("token-classification", model=directory, device="cpu")
    entities = tag("the dog sat on the mat")
    assert all(e["entity"] in labels for e in entities)
    assert isinstance(AutoModelForTokenClassification.from_pretrained(directory), FastMiniForTokenClassification)


class _Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        texts = ["a very good film", "a bad movie", "the film was good", "the movie was very bad"] * 4
        self.items = [
            {**tokenizer(text, padding="max_length", max_length=8), "labels": int("good" in text)} for text in texts
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return {k: torch.tensor(v) for k, v in self.items[index].items()}


@pytest.mark.parametrize("adapter_tuning", [False, True], ids=["full", "adapters"])
def test_trainer_trains_and_saves(adapter_tuning, tiny_config, tokenizer, tmp_path):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2, hidden_dropout_prob=0.0))
    if adapter_tuning:
        model.train_adapters_only()
    frozen_before = model.fastmini.encoder.shared_layer.query.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_train_epochs=3,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_Sentences(tokenizer))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and result.training_loss > 0
    assert sum(losses[-4:]) < sum(losses[:4])
    query = model.fastmini.encoder.shared_layer.query.weight
    assert torch.equal(query, frozen_before) == adapter_tuning
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.classifier.weight, model.classifier.weight.cpu())


def test_masked_lm_auto_class_after_import(tiny_config, tmp_path):
    FastMiniForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path), FastMiniForMaskedLM)
