"""Named-entity data: the two-column TSV format, and sub-word label alignment.

The format (BioBERT's NER files, e.g. NCBI-disease): one ``token TAB tag`` per line, a blank
line between sentences, ``train``, ``dev``/``validation`` and ``test`` files. Tags are BIO(ES)
tags with a type (``B-Disease``) or without one (BioBERT's bare ``B`` / ``I`` / ``O``). CoNLL's
``-DOCSTART-`` lines end a sentence and are skipped. A malformed line is a DataError naming
the file and the line number.

Alignment: a word split into several sub-tokens gives every sub-token its label ("all", the
MiniALBERT recipe) or only the first one ("first", the others get -100 and no loss); special
tokens always get -100. Evaluation reads each word's prediction at its first sub-token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastmini.data.corpus import DataError, read_text_file

IGNORE_INDEX = -100  # CrossEntropyLoss's ignore_index: no loss, no gradient
ALIGNMENTS = ("all", "first")
NER_SUFFIXES = (".tsv", ".txt", ".conll", ".iob", ".bio")
TAG_PATTERN = re.compile(r"^(O|[BIES](-\S+)?)$")
DOCUMENT_START = "-DOCSTART-"


def read_ner_file(path: Path) -> list[dict[str, Any]]:
    """Sentences of a two-column file: ``{"tokens": [...], "tags": [...], "where": "file, line N"}``."""
    path = Path(path)
    text = read_text_file(path)
    sentences: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 0

    def close() -> None:
        if tokens:
            sentences.append({"tokens": list(tokens), "tags": list(tags), "where": f"{path}, line {first_line}"})
            tokens.clear()
            tags.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            close()
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if fields and fields[0] == DOCUMENT_START:
            close()
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise DataError(
                f"{path}, line {number}: expected two columns, 'token<TAB>tag', got {line.strip()!r} "
                f"({len([f for f in fields if f])} column(s))"
            )
        if not TAG_PATTERN.match(fields[1]):
            raise DataError(
                f"{path}, line {number}: '{fields[1]}' is not a BIO tag (expected O, B-TYPE, I-TYPE, or bare B / I)"
            )
        if not tokens:
            first_line = number
        tokens.append(fields[0])
        tags.append(fields[1])
    close()
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


def label_list(tag_sequences: Sequence[Sequence[str]]) -> list[str]:
    """A stable label map for a set of tags: "O" first, then by entity type and B, I, E, S order."""
    order = {"B": 0, "I": 1, "E": 2, "S": 3}
    tags = {tag for tags in tag_sequences for tag in tags}
    others = sorted(tags - {"O"}, key=lambda tag: (tag[2:], order.get(tag[0], 9), tag))
    return (["O"] if "O" in tags else []) + others


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], alignment: str = "all") -> list[int]:
    """One label per sub-token from one label per word (see the module docstring)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got '{alignment}'")
    labels = []
    previous = None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous or alignment == "all":
            labels.append(word_labels[word])
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


def first_subtoken_positions(word_ids: Sequence[int | None], num_words: int) -> list[int | None]:
    """For every word, the position of its first sub-token; None for a word cut off by truncation
    (or one the tokenizer turned into nothing)."""
    positions: list[int | None] = [None] * num_words
    for position, word in enumerate(word_ids):
        if word is not None and positions[word] is None:
            positions[word] = position
    return positions
