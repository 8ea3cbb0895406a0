"""What each ``--task`` is: its kind, columns, label names, metrics, splits and recipe; label maps.

Kinds: ``classification`` (one label per text or text pair), ``regression`` (one number),
``multilabel`` (any number of label names per text) and ``ner`` (one BIO tag per word). The
GLUE tasks carry their ``datasets`` name, columns, label names, official metrics and SPEC.md's
recipe (small tasks: batch 16 for 5 epochs; large ones, here SST-2, QQP, MNLI and QNLI with
67K-393K training pairs: batch 32 for 3 epochs). Local data uses the generic kinds by name.

Label maps are stable: GLUE's label names in their published order; otherwise the sorted
label values of the training data (numbers numerically, names alphabetically; NER: "O" first,
then by entity type). A validation or test label that the map lacks is a DataError naming
the row, since the model has no output for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any

from fastmini.data.corpus import DataError
from fastmini.data.ner import TAGS_COLUMN, TOKENS_COLUMN, label_list

KINDS = ("classification", "regression", "multilabel", "ner")
GLUE_DATASET = "nyu-mll/glue"
SMALL_RECIPE = {"batch_size": 16, "epochs": 5}
LARGE_RECIPE = {"batch_size": 32, "epochs": 3}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    metrics: tuple[str, ...]  # reported on the validation set; the first one selects runs
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None  # a fixed label map (GLUE)
    dataset: str | None = None  # a datasets name (GLUE)
    dataset_config: str | None = None
    validation_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    recipe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskSpec {self.name}: kind must be one of {KINDS}, got '{self.kind}'")

    @property
    def is_glue(self) -> bool:
        return self.dataset == GLUE_DATASET

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def problem_type(self) -> str | None:
        return {
            "classification": "single_label_classification",
            "regression": "regression",
            "multilabel": "multi_label_classification",
        }.get(self.kind)


def _glue(name: str, kind: str, metrics, text: str, pair: str | None, labels, large: bool = False, **extra):
    return TaskSpec(
        name=name,
        kind=kind,
        metrics=metrics,
        text_column=text,
        text_pair_column=pair,
        label_names=labels,
        dataset=GLUE_DATASET,
        dataset_config=name,
        recipe={**(LARGE_RECIPE if large else SMALL_RECIPE), "text_column": text, "text_pair_column": pair},
        **extra,
    )


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", "classification", ("matthews_correlation",), "sentence", None,
                  ("unacceptable", "acceptable")),
    "sst2": _glue("sst2", "classification", ("accuracy",), "sentence", None, ("negative", "positive"), large=True),
    "mrpc": _glue("mrpc", "classification", ("f1", "accuracy"), "sentence1", "sentence2",
                  ("not_equivalent", "equivalent")),
    "stsb": _glue("stsb", "regression", ("pearson", "spearman"), "sentence1", "sentence2", None),
    "qqp": _glue("qqp", "classification", ("f1", "accuracy"), "question1", "question2",
                 ("not_duplicate", "duplicate"), large=True),
    "mnli": _glue("mnli", "classification", ("accuracy",), "premise", "hypothesis",
                  ("entailment", "neutral", "contradiction"), large=True,
                  validation_splits=("validation_matched", "validation_mismatched"),
                  test_splits=("test_matched", "test_mismatched")),
    "qnli": _glue("qnli", "classification", ("accuracy",), "question", "sentence", ("entailment", "not_entailment"),
                  large=True),
    "rte": _glue("rte", "classification", ("accuracy",), "sentence1", "sentence2", ("entailment", "not_entailment")),
}  # fmt: skip

GENERIC_TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec("classification", "classification", ("accuracy", "f1", "matthews_correlation")),
    "regression": TaskSpec("regression", "regression", ("pearson", "spearman", "mse")),
    "multilabel": TaskSpec("multilabel", "multilabel", ("f1_micro", "f1_macro", "exact_match")),
    # SPEC.md's NER recipe: lr 5e-5, batch 16, 5 epochs, cosine schedule; conll2003's column names for rows of
    # word and tag lists (a datasets name, parquet / json / jsonl files).
    "ner": TaskSpec("ner", "ner", ("f1", "precision", "recall", "accuracy"), text_column=TOKENS_COLUMN,
                    label_column=TAGS_COLUMN,
                    recipe={"lr": [5e-5], "batch_size": 16, "epochs": 5, "schedule": "cosine",
                            "text_column": TOKENS_COLUMN, "label_column": TAGS_COLUMN}),
}  # fmt: skip

TASKS = {**GLUE_TASKS, **GENERIC_TASKS}
# Metrics where lower is better; every other metric is maximised.
LOWER_IS_BETTER = frozenset({"mse"})


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(
            f"--task {name}: unknown task; expected a GLUE task ({', '.join(GLUE_TASKS)}) or one of "
            f"{', '.join(GENERIC_TASKS)} for local data"
        )
    return TASKS[name]


# ----------------------------------------------------------------------------------- labels
def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# A number written plainly: what a label of 1, 1.0 or "1.50" is, as opposed to a code ("007", "1_0", "1e0", "nan").
_PLAIN_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")


def _canonical_number(number: Decimal) -> str:
    with localcontext() as context:  # every digit kept: the default 28 would round long codes into one class
        context.prec = max(context.prec, len(number.as_tuple().digits))
        name = format(number.normalize(), "f")
    return "0" if name == "-0" else name


def _name(value: Any) -> str:
    """The label name of a class value: one number, however written (1, 1.0, "1" and "1.00" are the class "1"; 1.5
    and "1.50" the class "1.5"); any other text as written, stripped ("007" stays "007", "1e0" stays "1e0")."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _canonical_number(Decimal(repr(value))) if math.isfinite(value) else repr(value)
    text = str(value).strip()
    return _canonical_number(Decimal(text)) if _PLAIN_DECIMAL.fullmatch(text) else text


def _is_class_value(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_label_value(spec: TaskSpec, value: Any, where: str) -> None:
    """A class label is a name or a number (a multi-label one: a list of them, or names in a string): a JSON
    true, list or object would otherwise become a class named "True" or "['pos']"."""
    if spec.kind == "classification" and not _is_class_value(value):
        raise DataError(f"{where}: label {value!r} is a {type(value).__name__}; a class label is a name or a number")
    if spec.kind == "multilabel" and not (
        _is_class_value(value) or (isinstance(value, list) and all(_is_class_value(item) for item in value))
    ):
        raise DataError(
            f"{where}: label {value!r} is not a list of names or numbers, nor names joined in a string (multi-label)"
        )


def split_multilabel(value: Any, separator: str) -> list[str]:
    """Label names of a multi-label value: a JSON list, or a string cut at ``separator``."""
    if isinstance(value, list):
        return [_name(item) for item in value]
    return [_name(piece) for piece in str(value).split(separator) if piece.strip()]  # "1.0" is class "1" too


def build_label_names(spec: TaskSpec, train_labels: list[Any], separator: str = ",") -> list[str] | None:
    """The label map (index -> name) of a task; None for regression."""
    if spec.kind == "regression":
        return None
    if spec.label_names is not None:
        return list(spec.label_names)
    if spec.kind == "ner":
        return label_list(train_labels)
    if spec.kind == "multilabel":
        names = {name for value in train_labels for name in split_multilabel(value, separator)}
    else:
        names = {_name(value) for value in train_labels}
    if all(_PLAIN_DECIMAL.fullmatch(name) for name in names):  # numbers in numeric order ("nan" is no number here)
        return sorted(names, key=Decimal)
    return sorted(names)


class LabelMap:
    """Encodes raw labels of one task into model targets, with row-naming errors for unknown ones."""

    def __init__(self, spec: TaskSpec, names: list[str] | None, separator: str = ","):
        self.spec = spec
        self.names = names
        self.separator = separator
        self.index = {name: i for i, name in enumerate(names or [])}

    @property
    def num_labels(self) -> int:
        return 1 if self.names is None else len(self.names)

    def _unknown(self, value: Any, where: str) -> DataError:
        shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
        return DataError(
            f"{where}: label '{value}' is not in the label map built from the training data ({shown}); the model has "
            "no output for it"
        )

    def encode(self, value: Any, where: str, tag_wheres: Sequence[str] | None = None) -> Any:
        """A class index, a float (regression), a multi-hot list (multi-label) or a list of tag indices (NER).

        ``tag_wheres``: NER, where each tag is (its own line of a two-column file), for a message naming it."""
        kind = self.spec.kind
        if kind == "regression":
            number = _as_number(value)
            if number is None:
                raise DataError(f"{where}: label {value!r} is not a number (task {self.spec.name} is a regression)")
            try:
                number = float(number)
            except OverflowError:  # a JSON integer too large for a float
                number = math.inf
            if not math.isfinite(number):  # 'nan' / 'inf' parse as floats, but no loss or metric can use them
                raise DataError(
                    f"{where}: label {value!r} is not a finite number (task {self.spec.name} is a regression)"
                )
            return number
        if kind == "ner":
            for position, tag in enumerate(value):
                if tag not in self.index:
                    raise self._unknown(tag, tag_wheres[position] if tag_wheres else where)
            return [self.index[tag] for tag in value]
        if kind == "multilabel":
            row = [0.0] * len(self.names)
            for name in split_multilabel(value, self.separator):
                if name not in self.index:
                    raise self._unknown(name, where)
                row[self.index[name]] = 1.0
            return row
        number = _as_number(value)
        if self.spec.label_names is not None and number is not None and float(number).is_integer():
            if 0 <= number < len(self.names):  # datasets' ClassLabel integers, GLUE's 0 / 1 files
                return int(number)
            raise DataError(f"{where}: label {value} is outside 0..{len(self.names) - 1} for task {self.spec.name}")
        name = _name(value)
        if name not in self.index:
            raise self._unknown(value, where)
        return self.index[name]
