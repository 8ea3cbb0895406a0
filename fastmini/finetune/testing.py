"""Tiny, fully offline fine-tuning fixtures: a random fastmini model with a word-level tokenizer, and
small synthetic data sets for every task kind, written in the formats the CLI reads.

Used by the test suite; handy for a smoke run anywhere:
``make_tiny_model(d / "model")``, ``write_task_data(d / "data", "classification")``, then
``python -m fastmini.finetune --model d/model --data d/data --lr 5e-3``.
The data are easy on purpose (a sentiment word decides the class, entity words are tagged), so
that a few epochs of a model with hidden size 36 learn them.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FILLER = ("the", "a", "film", "movie", "was", "is", "very", "quite", "and", "plot", "story", "acting", "it")
POSITIVE = ("good", "great", "fine")
NEGATIVE = ("bad", "awful", "dull")
ANIMALS = ("cat", "dog", "horse")
FOODS = ("apple", "bread", "cheese")
# "cats" -> cat ##s, "dogs" -> dog ##s: words that become two sub-tokens, for the alignment cases.
SUBWORDS = ("##s",)
WORDS = FILLER + POSITIVE + NEGATIVE + ANIMALS + FOODS + ("big", "small", "in", "town") + SUBWORDS


def tiny_vocabulary() -> dict[str, int]:
    tokens = [*SPECIAL_TOKENS, *WORDS]
    tokens += [f"w{i}" for i in range(99 - len(tokens))]
    return {token: index for index, token in enumerate(tokens)}


def make_tiny_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=tiny_vocabulary(), do_lower_case=True)


def make_tiny_model(
    directory: str | Path, adapters: bool = True, seed: int = 0, recursions: int = 2, dropout: float = 0.1
) -> Path:
    """Save a random FastMiniForMaskedLM (vocab 99, E 16, H 36, 6 heads, I 37, r 4) and its tokenizer."""
    from fastmini.models import FastMiniConfig, FastMiniForMaskedLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = FastMiniConfig(
        vocab_size=99,
        embedding_size=16,
        hidden_size=36,
        num_attention_heads=6,
        intermediate_size=37,
        num_hidden_layers=recursions,
        max_position_embeddings=64,
        use_adapter=adapters,
        reduction_factor=4,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        FastMiniForMaskedLM(config).save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(directory)
    return directory


def _sentence(generator: random.Random, words: tuple[str, ...], length: int) -> list[str]:
    return [generator.choice(words) for _ in range(length)]


def classification_examples(count: int, seed: int, pair: bool = False) -> list[dict]:
    """label "pos" when the (second, for pairs) text holds a positive word, else "neg"."""
    generator = random.Random(seed)
    rows = []
    for index in range(count):
        positive = index % 2 == 0
        words = _sentence(generator, FILLER, generator.randint(3, 7))
        words.insert(generator.randrange(len(words) + 1), generator.choice(POSITIVE if positive else NEGATIVE))
        row = {"label": "pos" if positive else "neg"}
        if pair:
            row["premise"] = " ".join(_sentence(generator, FILLER, 4))
            row["hypothesis"] = " ".join(words)
        else:
            row["text"] = " ".join(words)
        rows.append(row)
    return rows


def regression_examples(count: int, seed: int) -> list[dict]:
    """score = number of positive words (0-3)."""
    generator = random.Random(seed)
    rows = []
    for index in range(count):
        score = index % 4
        words = _sentence(generator, FILLER, generator.randint(3, 6)) + [generator.choice(POSITIVE)] * score
        generator.shuffle(words)
        rows.append({"text": " ".join(words), "score": float(score)})
    return rows


def multilabel_examples(count: int, seed: int) -> list[dict]:
    """labels: "animal" when animal words occur, "food" when food words occur (both, one, or none)."""
    generator = random.Random(seed)
    rows = []
    for index in range(count):
        words = _sentence(generator, FILLER, generator.randint(3, 6))
        labels = []
        if index % 4 in (1, 3):
            words += [generator.choice(ANIMALS), generator.choice(ANIMALS)]
            labels.append("animal")
        if index % 4 in (2, 3):
            words += [generator.choice(FOODS), generator.choice(FOODS)]
            labels.append("food")
        generator.shuffle(words)
        rows.append({"text": " ".join(words), "labels": labels})
    return rows


def ner_sentences(count: int, seed: int) -> list[list[tuple[str, str]]]:
    """Animal mentions tagged ANIMAL ("big cat" is B I; "cats" is one word of two sub-tokens), food FOOD."""
    generator = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [(w, "O") for w in _sentence(generator, FILLER, generator.randint(2, 5))]
        for _ in range(generator.randint(1, 2)):
            choice = generator.random()
            if choice < 0.4:
                mention = [("big", "B-ANIMAL"), (generator.choice(ANIMALS), "I-ANIMAL")]
            elif choice < 0.7:
                mention = [(generator.choice(ANIMALS) + generator.choice(("", "s")), "B-ANIMAL")]
            else:
                mention = [(generator.choice(FOODS), "B-FOOD")]
            position = generator.randrange(len(words) + 1)
            words[position:position] = mention
        sentences.append(words)
    return sentences


def write_table(path: Path, rows: list[dict]) -> Path:
    """rows as .csv / .tsv / .json / .jsonl by the suffix of ``path`` (lists as JSON or ','-joined)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        flat = [{k: ",".join(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(flat[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(flat)
    return path


def write_ner(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("".join(f"{w}\t{t}\n" for w, t in s) for s in sentences))
    return path


def write_task_data(
    directory: str | Path, kind: str, suffix: str = ".csv", train: int = 64, dev: int = 24, test: int = 0
) -> Path:
    """train / dev (and test) files of one task kind: classification, pair, regression, multilabel or ner."""
    directory = Path(directory)
    if kind == "ner":
        for name, count, seed in (("train", train, 1), ("dev", dev, 2), ("test", test, 3)):
            if count:
                write_ner(directory / f"{name}.tsv", ner_sentences(count, seed))
        return directory
    make = {
        "classification": classification_examples,
        "pair": lambda count, seed: classification_examples(count, seed, pair=True),
        "regression": regression_examples,
        "multilabel": multilabel_examples,
    }[kind]
    for name, count, seed in (("train", train, 1), ("dev", dev, 2), ("test", test, 3)):
        if count:
            write_table(directory / f"{name}{suffix}", make(count, seed))
    return directory
