"""Tiny, fully offline distillation fixtures: a random BERT teacher, its tokenizer, a corpus.

Used by the test suite; handy for a smoke run of the CLI on any machine:
``make_tiny_teacher(dir)`` then ``python -m fastmini.distill --teacher dir --data dir/corpus.txt``.
Sizes follow transformers' tester configs (vocab 99, hidden 36).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_vocabulary(size: int = 99) -> dict[str, int]:
    words = [f"w{i}" for i in range(size - len(SPECIAL_TOKENS))]
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *words))}


def tiny_corpus(documents: int = 24, seed: int = 0, vocab_size: int = 99) -> list[str]:
    """Documents of 20-120 words of the tiny vocabulary, with a little structure to learn."""
    generator = random.Random(seed)
    words = vocab_size - len(SPECIAL_TOKENS)
    texts = []
    for _ in range(documents):
        length = generator.randint(20, 120)
        start = generator.randrange(words)
        texts.append(" ".join(f"w{(start + 3 * i + generator.randint(0, 2)) % words}" for i in range(length)))
    return texts


def make_tiny_teacher(
    directory: str | Path,
    masked_lm: bool = True,
    layers: int = 4,
    hidden: int = 36,
    heads: int = 6,
    vocab_size: int = 99,
    seed: int = 0,
) -> Path:
    """Save a random BERT (BertForMaskedLM or BertModel) + WordPiece tokenizer + corpus.txt in ``directory``."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.2,  # large weights: peaked attention maps and distinct hidden states to learn
    )
    model = BertForMaskedLM(config) if masked_lm else BertModel(config, add_pooling_layer=False)
    model.save_pretrained(directory)
    BertTokenizer(vocab=tiny_vocabulary(vocab_size)).save_pretrained(directory)
    (directory / "corpus.txt").write_text("\n".join(tiny_corpus(vocab_size=vocab_size)) + "\n")
    return directory


def tiny_args(teacher: Path, output: Path, *extra: str) -> list[str]:
    """Command-line options of a short CPU run on ``make_tiny_teacher``'s teacher and corpus."""
    return [
        "--teacher", str(teacher), "--data", str(teacher / "corpus.txt"), "--output-dir", str(output),
        "--window-length", "32", "--window-stride", "8", "--recursions", "2", "--embedding-size", "16",
        "--reduction-factor", "4", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1",
        "--eval-documents", "3", "--eval-windows", "8", "--no-progress", "--threads", "1", *extra,
    ]  # fmt: skip
