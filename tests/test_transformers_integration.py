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


def probabilities(model, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model computed directly (not through a pipeline): token ids and softmax of the logits."""
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits[0]
    return inputs["input_ids"][0], logits.softmax(-1)


def test_fill_mask_pipeline(tiny_config, randomize, tokenizer, tmp_path):
    model = randomize(FastMiniForMaskedLM(tiny_config()))
    directory = save(model, tokenizer, tmp_path)
    fill = pipeline("fill-mask", model=directory, device="cpu")
    assert isinstance(fill.model, FastMiniForMaskedLM)
    text = "the cat [MASK] on the mat"
    predictions = fill(text, top_k=3)
    input_ids, probs = probabilities(model, tokenizer, text)
    top = probs[input_ids.tolist().index(tokenizer.mask_token_id)].topk(3)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert [p["token_str"] for p in predictions] == tokenizer.convert_ids_to_tokens(top.indices.tolist())
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert top.values[0] > 2 / tiny_config().vocab_size  # the random weights give the softmax some shape


def test_text_classification_pipeline(tiny_config, randomize, tokenizer, tmp_path):
    config = tiny_config(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = randomize(FastMiniForSequenceClassification(config))
    directory = save(model, tokenizer, tmp_path)
    classify = pipeline("text-classification", model=directory, device="cpu")
    texts = ["a very good film", "a bad movie"]
    results = classify(texts)
    assert len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        _, probs = probabilities(model, tokenizer, text)
        assert result["label"] == config.id2label[probs.argmax().item()]
        assert result["score"] == pytest.approx(probs.max().item(), abs=1e-5)
        assert result["score"] < 1 - 1e-3  # not saturated: the comparison sees the logits' values


def test_token_classification_pipeline(tiny_config, randomize, tokenizer, tmp_path):
    labels = ["O", "B-ANIMAL", "I-ANIMAL"]
    config = tiny_config(num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = randomize(FastMiniForTokenClassification(config))
    directory = save(model, tokenizer, tmp_path)
    tag = pipeline("token-classification", model=directory, device="cpu", ignore_labels=[])  # keep "O" too
    text = "the dog sat on the mat"
    entities = tag(text)
    input_ids, probs = probabilities(model, tokenizer, text)
    # one entity per word-piece token, [CLS] and [SEP] left out (every word here is one token)
    assert [e["index"] for e in entities] == list(range(1, len(input_ids) - 1))
    assert [e["word"] for e in entities] == text.split()
    assert [e["entity"] for e in entities] == [labels[i] for i in probs[1:-1].argmax(-1).tolist()]
    assert [e["score"] for e in entities] == pytest.approx(probs[1:-1].max(-1).values.tolist(), abs=1e-5)
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
