"""Named-entity data: the two-column TSV format, rows of word and tag lists, and sub-word label alignment.

The two-column format (BioBERT's NER files, e.g. NCBI-disease): one ``token TAB tag`` per line,
a blank line between sentences, ``train``, ``dev``/``validation`` and ``test`` files. Tags are
BIO(ES) tags with a type (``B-Disease``) or without one (BioBERT's bare ``B`` / ``I`` / ``O``).
CoNLL's ``-DOCSTART-`` lines end a sentence and are skipped. A malformed line is a DataError
naming the file and the line number. An unlabelled file (a test file, prediction input) may
hold one token per line and no tags.

Rows (a ``datasets`` split such as conll2003's, or local .parquet / .json / .jsonl files): one
sentence per row, a list of words in one column (``tokens``) and a list of tags of the same
length in another (``ner_tags``). Tags are names (``B-PER``) or integers of a
``Sequence(ClassLabel)`` feature, which are turned into its names, so that label maps are
always by name. Rows without words and conll2003's ``["-DOCSTART-"]`` rows are skipped, as
blank and ``-DOCSTART-`` lines are above. A bad row is a DataError naming the source, the row
and the column.

Alignment: a word split into several sub-tokens gives every sub-token its label ("all", the
MiniALBERT recipe, SPEC.md: a B-X word's pieces are all B-X, as the original's tokenize_adjust_labels
gives them), the same but I-X for a B-X word's later sub-tokens ("inside", transformers' run_ner
``b_to_i_label``: one word stays one entity), or only the first one ("first", the others get -100 and no
loss); special tokens always get -100. Evaluation reads each word's prediction at its first sub-token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastmini.data.masking import IGNORE_INDEX
from fastmini.data.tables import DataError, json_records, read_text_file, split_lines

ALIGNMENTS = ("all", "inside", "first")
NER_SUFFIXES = (".tsv", ".txt", ".conll", ".iob", ".bio")
RECORD_SUFFIXES = (".parquet", ".json", ".jsonl")  # one sentence per row, word and tag lists in columns
TOKENS_COLUMN = "tokens"  # conll2003's column names, the defaults of --text-column / --label-column for NER
TAGS_COLUMN = "ner_tags"
TAG_PATTERN = re.compile(r"^(O|[BIES](-\S+)?)$")
DOCUMENT_START = "-DOCSTART-"


def read_ner_file(path: Path, tags_required: bool = True) -> list[dict[str, Any]]:
    """Sentences of a two-column file: ``{"tokens": [...], "tags": [...], "where": "file, line N", "tag_wheres":
    ["file, line N", ...]}`` (each tag's own line, for messages about it).

    Without ``tags_required`` (a test file, or prediction input) the file may hold one token per line and no
    tags at all: its sentences have ``"tags": None``. One file is either labelled or not: a file mixing both
    kinds of lines is an error at the first line that differs."""
    path = Path(path)
    text = read_text_file(path)
    sentences: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    first_token_line = 0  # the first token line of the file: it decides whether the file has tags
    file_unlabelled = False

    def close() -> None:
        if tokens:
            labelled = len(tags) == len(tokens)
            sentences.append(
                {
                    "tokens": list(tokens),
                    "tags": list(tags) if labelled else None,
                    "where": f"{path}, line {lines[0]}",
                    "tag_wheres": [f"{path}, line {number}" for number in lines] if labelled else None,
                }
            )
            tokens.clear()
            tags.clear()
            lines.clear()

    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            close()
            continue
        line = line.rstrip()  # a trailing tab or space separates nothing
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if fields and fields[0] == DOCUMENT_START:
            close()
            continue
        unlabelled = len(fields) == 1 and not tags_required
        if not unlabelled and (len(fields) != 2 or not fields[0] or not fields[1]):
            expected = "'token<TAB>tag'" + ("" if tags_required else " (or 'token' alone in an unlabelled file)")
            raise DataError(
                f"{path}, line {number}: expected two columns, {expected}, got {line.strip()!r} "
                f"({len([f for f in fields if f])} column(s))"
            )
        if not first_token_line:
            first_token_line, file_unlabelled = number, unlabelled
        elif unlabelled != file_unlabelled:
            raise DataError(
                f"{path}, line {number}: {len(fields)} column(s), but line {first_token_line} has "
                f"{1 if file_unlabelled else 2}; a file holds either 'token<TAB>tag' lines or, unlabelled, "
                "'token' lines only"
            )
        if not unlabelled and not TAG_PATTERN.match(fields[1]):
            raise DataError(
                f"{path}, line {number}: '{fields[1]}' is not a BIO tag (expected O, B-TYPE, I-TYPE, or bare B / I)"
            )
        tokens.append(fields[0])
        lines.append(number)
        if not unlabelled:
            tags.append(fields[1])
    close()
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


# ------------------------------------------------------------------------------ rows of lists
def dataset_sentences(
    dataset, source: str, tokens_column: str, tags_column: str, *, tags_required: bool = True
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """(sentences, the tag names its tags column declares or None) of a loaded ``datasets.Dataset``.

    Without ``tags_required`` (a test split), a split that has no tags column gives unlabelled sentences."""
    has_tags = _check_record_columns(source, list(dataset.column_names), tokens_column, tags_column, tags_required)
    names = declared_tag_names(source, tags_column, dataset.features.get(tags_column)) if has_tags else None
    wanted = [tokens_column, tags_column] if has_tags else [tokens_column]
    records = [(f"{source}, row {index}", row) for index, row in enumerate(dataset.select_columns(wanted).to_list())]
    tags = tags_column if has_tags else None
    return sentences_of(records, source, tokens_column, tags, names, tags_required=tags_required), names


def read_ner_records(
    path: Path, tokens_column: str, tags_column: str, *, tags_required: bool = True
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """(sentences, declared tag names or None) of a local .parquet / .json / .jsonl file of word and tag lists.

    Parquet files that ``datasets`` wrote keep their features, ClassLabel names included."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected {', '.join(RECORD_SUFFIXES)})")
    if suffix == ".parquet":
        columns, records, features = _parquet_records(path)
    else:
        columns, records = json_records(path, read_text_file(path))
        features = {}
    has_tags = _check_record_columns(str(path), columns, tokens_column, tags_column, tags_required)
    names = declared_tag_names(str(path), tags_column, features.get(tags_column)) if has_tags else None
    tags = tags_column if has_tags else None
    return sentences_of(records, str(path), tokens_column, tags, names, tags_required=tags_required), names


def _parquet_records(path: Path):
    import datasets
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
        features = datasets.Features.from_arrow_schema(table.schema)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError and others for a damaged or foreign file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: not a readable parquet file ({first_line})") from error
    records = [(f"{path}, row {index}", row) for index, row in enumerate(table.to_pylist())]
    return list(table.column_names), records, features


def _check_record_columns(source: str, names: list[str], tokens_column: str, tags_column: str, tags_required) -> bool:
    """One DataError for a missing words (or, where required, tags) column; whether the tags column exists."""
    wanted = [("words", tokens_column)] + ([("tags", tags_column)] if tags_required else [])
    for role, name in wanted:
        if name not in names:
            raise DataError(
                f"{source}: no column '{name}' (asked for as the {role} column of --task ner); its columns are: "
                f"{', '.join(map(str, names)) or 'none'}"
            )
    return tags_column in names


def declared_tag_names(source: str, column: str, feature) -> list[str] | None:
    """The names of a ``Sequence(ClassLabel)`` tags column (datasets' List or Sequence), checked as BIO tags."""
    import datasets

    inner = getattr(feature, "feature", None)
    if not isinstance(inner, datasets.ClassLabel):
        return None
    names = list(inner.names)
    for name in names:
        if not TAG_PATTERN.match(name):
            raise DataError(
                f"{source}: column '{column}' declares the tag name '{name}', which is not a BIO tag "
                "(expected O, B-TYPE, I-TYPE, or bare B / I)"
            )
    return names


def sentences_of(
    records: list[tuple[str, dict[str, Any]]],
    source: str,
    tokens_column: str,
    tags_column: str | None,
    names: list[str] | None,
    tags_required: bool = True,
) -> list[dict[str, Any]]:
    """Sentences of ``(where, row)`` records; ``tags_column`` None: unlabelled (``"tags": None``). Without
    ``tags_required`` (a test split) a row whose tags are null or absent is an unlabelled sentence."""
    sentences = []
    for where, record in records:
        if not tags_required and tags_column is not None and record.get(tags_column) is None:
            sentence = _record_sentence(where, record, tokens_column, None, names)
        else:
            sentence = _record_sentence(where, record, tokens_column, tags_column, names)
        if sentence is not None:
            sentences.append(sentence)
    if not sentences:
        raise DataError(f"{source}: no sentences")
    return sentences


def _record_sentence(where: str, record: dict[str, Any], tokens_column: str, tags_column: str | None, names):
    tokens = _list_field(where, record, tokens_column, "words")
    raw_tags = None if tags_column is None else _list_field(where, record, tags_column, "tags")
    if raw_tags is not None and len(raw_tags) != len(tokens):
        raise DataError(
            f"{where}: {len(tokens)} words in column '{tokens_column}' but {len(raw_tags)} tags in column "
            f"'{tags_column}'; every word needs one tag"
        )
    if not tokens or tokens == [DOCUMENT_START]:
        return None
    for token in tokens:
        if not isinstance(token, str):
            raise DataError(f"{where}: column '{tokens_column}' holds {token!r}, expected words (strings)")
    tags = None if raw_tags is None else [_tag_name(where, tags_column, tag, names) for tag in raw_tags]
    return {"tokens": list(tokens), "tags": tags, "where": where}


def _list_field(where: str, record: dict[str, Any], column: str, role: str) -> list:
    if column not in record:
        raise DataError(f"{where}: no '{column}' field (the {role} column)")
    value = record[column]
    if not isinstance(value, list):
        raise DataError(f"{where}: column '{column}' holds {type(value).__name__}, expected a list of {role}")
    return value


def _tag_name(where: str, column: str, tag: Any, names: list[str] | None) -> str:
    """The name of one tag: a string as it is (a BIO tag), an integer through the column's ClassLabel names."""
    if isinstance(tag, str):
        tag = tag.strip()  # as the two-column reader strips its cells
        if not TAG_PATTERN.match(tag):
            raise DataError(
                f"{where}: '{tag}' in column '{column}' is not a BIO tag (expected O, B-TYPE, I-TYPE, or bare B / I)"
            )
        return tag
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise DataError(f"{where}: column '{column}' holds {tag!r}, expected tag names (B-PER) or ClassLabel integers")
    if names is None:
        raise DataError(
            f"{where}: column '{column}' holds integer tags ({tag}) but no tag names; store the names (O, B-PER, ...) "
            "or give the column a Sequence(ClassLabel) feature"
        )
    if not 0 <= tag < len(names):
        raise DataError(f"{where}: tag {tag} in column '{column}' is outside its ClassLabel's 0..{len(names) - 1}")
    return names[tag]


def label_list(tag_sequences: Sequence[Sequence[str]]) -> list[str]:
    """A stable label map for a set of tags: "O" first, then by entity type and B, I, E, S order."""
    order = {"B": 0, "I": 1, "E": 2, "S": 3}
    tags = {tag for tags in tag_sequences for tag in tags}
    others = sorted(tags - {"O"}, key=lambda tag: (tag[2:], order.get(tag[0], 9), tag))
    return (["O"] if "O" in tags else []) + others


def continuation_labels(names: Sequence[str]) -> list[int]:
    """For every label index, the label of a word's later sub-tokens: I-X for B-X (I for a bare B) when the label
    map has it, else the label itself (transformers' run_ner ``b_to_i_label``). Otherwise "dogs" = B-ANIMAL would
    teach "dog" B-ANIMAL, "##s" B-ANIMAL: two entities where the word holds one."""
    index = {name: i for i, name in enumerate(names)}
    return [index.get("I" + name[1:], i) if name[:1] == "B" else i for i, name in enumerate(names)]


def align_labels(
    word_ids: Sequence[int | None],
    word_labels: Sequence[int],
    alignment: str = "all",
    continuation: Sequence[int] | None = None,
) -> list[int]:
    """One label per sub-token from one label per word (see the module docstring); "inside" gives a word's later
    sub-tokens ``continuation[label]`` (``continuation_labels``: the inside label of a B- label)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got '{alignment}'")
    if alignment == "inside" and continuation is None:
        raise ValueError("alignment 'inside' needs the continuation labels (continuation_labels)")
    labels = []
    previous = None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_labels[word])
        elif alignment == "all":
            labels.append(word_labels[word])
        elif alignment == "inside":
            label = word_labels[word]
            labels.append(continuation[label] if label >= 0 else label)
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
