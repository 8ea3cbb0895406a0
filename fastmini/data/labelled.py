"""Labelled sentences (and sentence pairs) for fine-tuning, from local files or a ``datasets`` name.

An example is a dict with ``text``, ``text_pair`` (None for single sentences), ``label`` (the
value as the source holds it: a string, a number, a list of names for multi-label data, or
None where a test file has no labels) and ``where`` (file and row, for messages).
- local .csv / .tsv (a header row; TSV cells are never quoted, as in GLUE's files), .jsonl (one
  object per line) and .json (an array of objects, or JSON lines) files whose columns the caller names;
- a directory holding ``train.*``, ``validation.*`` or ``dev.*`` and optionally ``test.*``;
- a ``datasets`` name (with config and split; GLUE tasks come this way when online);
- the offline default: the 200 labelled movie-review sentences that gensim ships.
This file only reads: label maps and their checks belong to the fine-tuner. Every failure is
one DataError naming the file (and row) and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from fastmini.data.gensim_samples import gensim_test_file
from fastmini.data.tables import DataError, csv_rows, json_records, read_text_file

LABELLED_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")
# Stems of the split files in a data directory, first match wins.
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "valid"), "test": ("test",)}

POLARITY_NAME = "pang_lee_polarity.cor"
POLARITY_LABELS = ("neg", "pos")  # the file's __label__ prefixes, in label-map order
POLARITY_DEV_EVERY = 5  # the fixed split: every fifth sentence of each class (20 + 20) is the dev set


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second text and the label."""

    text: str = "text"
    text_pair: str | None = None
    label: str | None = "label"  # None: the examples have no labels


def split_files(directory: Path, suffixes: tuple[str, ...] = LABELLED_SUFFIXES) -> dict[str, Path]:
    """{"train": ..., "validation": ..., "test": ...} for the split files present in ``directory``.

    A split with two candidate files (train.csv and train.jsonl, or validation.csv and dev.csv) is ambiguous
    and an error."""
    directory = Path(directory)
    found: dict[str, Path] = {}
    for split, stems in SPLIT_STEMS.items():
        candidates = sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and p.stem in stems and (p.suffix.lower() in suffixes or not p.suffix)
        )
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise DataError(f"{directory}: several {split} files ({names}); keep one")
        if candidates:
            found[split] = candidates[0]
    return found


def read_labelled_file(
    path: Path,
    columns: Columns,
    labels_required: bool = True,
    *,
    empty_label_is_a_value: bool = False,
    keep_empty_rows: bool = False,
) -> list[dict[str, Any]]:
    """The examples of one .csv/.tsv/.json/.jsonl file (by suffix).

    ``empty_label_is_a_value``: an empty label cell is a label (multi-label data: the empty set of names), not a
    missing one. ``keep_empty_rows``: a CSV row of empty cells is an example too (prediction keeps one output per
    input row) instead of being skipped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LABELLED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected {', '.join(LABELLED_SUFFIXES)})")
    text = read_text_file(path)
    if suffix in (".csv", ".tsv"):
        names, rows = csv_rows(path, text, "\t" if suffix == ".tsv" else ",", keep_empty_rows)
    else:
        names, rows = json_records(path, text)
    check_columns(str(path), names, columns, labels_required)
    examples = _examples(rows, columns, labels_required, empty_label_is_a_value, keep_empty_rows)
    if not examples:
        raise DataError(f"{path}: no examples (only a header or empty records)")
    return examples


def _examples(
    rows: list[tuple[str, dict[str, Any]]],
    columns: Columns,
    labels_required: bool,
    empty_label_is_a_value: bool,
    keep_empty_rows: bool = False,
) -> list[dict[str, Any]]:
    examples = []
    for where, record in rows:
        for role, name in (("text", columns.text), ("text pair", columns.text_pair)):
            if name is not None and name not in record:
                raise DataError(f"{where}: no '{name}' field (the {role} column)")
        label = record.get(columns.label)
        # None: no such field, or a CSV row shorter than its header.
        # A blank cell ("", or spaces only) is no label, not a class named "".
        if label is None or (isinstance(label, str) and not label.strip() and not empty_label_is_a_value):
            if labels_required:
                raise DataError(f"{where}: no label in column '{columns.label}'")
            label = None
        examples.append(_example(record, columns, label, where, null_text_is_empty=keep_empty_rows))
    return examples


def _example(
    record: dict[str, Any], columns: Columns, label: Any, where: str, null_text_is_empty: bool = False
) -> dict[str, Any]:
    """``null_text_is_empty``: a JSON null text is an empty example, as an empty CSV cell is (prediction keeps
    one output per input record); elsewhere it is an error."""

    def text(column: str) -> str:
        value = record[column]
        return "" if value is None and null_text_is_empty else _text(value, where, column)

    pair = text(columns.text_pair) if columns.text_pair else None
    return {"text": text(columns.text), "text_pair": pair, "label": label, "where": where}


def without_text(example: dict[str, Any]) -> bool:
    """Whether an example (a labelled one, or a tagger's {"tokens": ...}) has nothing for a model to read: an empty
    line, cell or sentence."""
    if "tokens" in example:
        return not example["tokens"]
    return not example["text"].strip() and not (example.get("text_pair") or "").strip()


def check_columns(source: str, names: list[str], columns: Columns, labels_required: bool) -> None:
    """One DataError for the first named column the source lacks."""
    wanted = [("text", columns.text), ("text pair", columns.text_pair)]
    if labels_required:
        wanted.append(("label", columns.label))
    for role, name in wanted:
        if name is not None and name not in names:
            raise DataError(
                f"{source}: no column '{name}' (asked for as the {role} column); its columns are: "
                f"{', '.join(map(str, names)) or 'none'}"
            )


def _text(value: Any, where: str, column: str) -> str:
    if value is None:
        raise DataError(f"{where}: empty '{column}'")
    if isinstance(value, (dict, list, bool)):
        raise DataError(f"{where}: '{column}' holds {type(value).__name__}, expected text")
    return str(value)


def open_dataset_split(name: str, config: str | None, split: str, cache_dir: str | None = None):
    """One split of a ``datasets`` name, as a ``datasets.Dataset``; a DataError when it cannot be loaded."""
    import datasets

    from fastmini.training.cli import use_cache_if_hub_unreachable

    use_cache_if_hub_unreachable()
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as error:  # datasets raises many kinds (offline, not found, bad config, bad split)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"'{name}' is not a local file or directory, and datasets could not load it "
            f"(config {config!r}, split '{split}'): {first_line}"
        ) from error


def dataset_source(name: str, config: str | None, split: str) -> str:
    """How messages name one split of a ``datasets`` name."""
    return f"dataset '{name}'" + (f" ({config})" if config else "") + f", split '{split}'"


def dataset_examples(
    dataset, source: str, columns: Columns, *, labels_required: bool = True, labels_by_name: bool = False
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """(examples, the label names of a ClassLabel column or None) of a loaded ``datasets.Dataset``.

    -1 is GLUE's placeholder for its hidden test labels: a ClassLabel row of -1 has no label, and neither
    has any row of a split whose labels are optional (a test split) and all -1 (STS-B's test scores).
    ``labels_by_name``: a ClassLabel's integers (or a multi-label list of them) become its names, for a task
    whose label map comes from the data (not GLUE's fixed names, which take the integers as indices).
    ``dataset`` comes from ``open_dataset_split``; ``source`` (``dataset_source``) names it in messages."""
    check_columns(source, list(dataset.column_names), columns, labels_required)
    label_names = class_label_names(dataset.features.get(columns.label))
    wanted = [c for c in (columns.text, columns.text_pair, columns.label) if c and c in dataset.column_names]
    records = dataset.select_columns(wanted).to_list()
    # Only where labels are optional (test splits): a validation split is read as it is.
    hidden = not labels_required and bool(records) and all(_is_placeholder(r.get(columns.label)) for r in records)
    examples = []
    for index, record in enumerate(records):
        where = f"{source}, row {index}"
        label = record.get(columns.label)
        if hidden or (label_names is not None and _is_placeholder(label)):
            label = None
        if label is None and labels_required:
            raise DataError(f"{where}: no label in column '{columns.label}'")
        if labels_by_name and label_names is not None and label is not None:
            label = _class_names(label, label_names, where)
        examples.append(_example(record, columns, label, where))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples, label_names


def class_label_names(feature) -> list[str] | None:
    """The names of a ClassLabel feature, or of the ClassLabel inside a list feature (a multi-label column)."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)  # datasets.Sequence / datasets.List
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _class_names(label: Any, names: list[str], where: str) -> Any:
    """A ClassLabel integer as its name (a list of them as a list of names)."""
    if isinstance(label, list):
        return [_class_names(item, names, where) for item in label]
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return names[label]
    raise DataError(f"{where}: label {label!r} is not one of the column's {len(names)} classes (0..{len(names) - 1})")


def _is_placeholder(label: Any) -> bool:
    return isinstance(label, (int, float)) and not isinstance(label, bool) and label == -1


def polarity_path() -> Path:
    return gensim_test_file(POLARITY_NAME, "movie-review sentences")


def polarity_examples(path: Path | None = None) -> list[dict[str, Any]]:
    """gensim's 200 movie-review sentences: ``__label__pos|neg`` then the sentence, one per line.

    The file is Windows-1252 (a few em dashes and accented letters), not UTF-8."""
    path = path or polarity_path()
    examples = []
    for number, line in enumerate(path.read_bytes().decode("cp1252").splitlines(), start=1):
        if not line.strip():
            continue
        prefix, _, text = line.partition(" ")
        label = prefix.removeprefix("__label__")
        if not prefix.startswith("__label__") or label not in POLARITY_LABELS:
            raise DataError(f"{path}, line {number}: expected '__label__pos' or '__label__neg' first")
        examples.append(
            {"text": " ".join(text.split()), "text_pair": None, "label": label, "where": f"{path}, line {number}"}
        )
    return examples


def polarity_split(path: Path | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, dev): the fixed split of the embedded default, every fifth sentence of each class to dev
    (160 / 40, balanced). The file lists one class after the other; both splits alternate them, so that
    the first N examples (--max-train-examples) hold both classes."""
    examples = polarity_examples(path)
    train: list[list[dict[str, Any]]] = []
    dev: list[list[dict[str, Any]]] = []
    for label in POLARITY_LABELS:
        of_class = [e for e in examples if e["label"] == label]
        train.append([e for i, e in enumerate(of_class) if i % POLARITY_DEV_EVERY != POLARITY_DEV_EVERY - 1])
        dev.append([e for i, e in enumerate(of_class) if i % POLARITY_DEV_EVERY == POLARITY_DEV_EVERY - 1])
    return _alternate(train), _alternate(dev)


def _alternate(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [example for row in zip_longest(*groups) for example in row if example is not None]
