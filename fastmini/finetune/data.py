"""A task's splits, its label map, and the examples encoded for the model.

Sources (``--data``): none (a GLUE task's own ``datasets`` split, or the embedded movie-review
sentences), a local directory of ``train`` / ``validation`` or ``dev`` / ``test`` files, or a
``datasets`` name (its ``validation`` split, else ``dev`` or ``valid``; ``test`` if it has one).
NER reads two-column files, or rows holding a list of words and a list of tags (a ``datasets``
name, local .parquet / .json / .jsonl files; columns --text-column / --label-column, by default
``tokens`` / ``ner_tags``). Validation labels are required; test files may lack labels (then they
only get predictions). A test split where only some rows have labels gets a warning naming it and
the count, and its test metrics cover its labelled rows only. Labels outside the training label
map stop the run with the row named. Multi-label data: an empty label cell is the empty set of labels.

``Encoded`` is what the training loop and the evaluator read: token ids per example, the model
targets (class index, number, multi-hot row, or one label per sub-token), and for NER the
position of every word's first sub-token (where its prediction is read). ``batch`` pads on
the fly, to the longest example of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmini.data.corpus import DataError
from fastmini.data.labelled import (
    LABELLED_SUFFIXES,
    SPLIT_STEMS,
    Columns,
    dataset_examples,
    dataset_source,
    open_dataset_split,
    polarity_split,
    read_labelled_file,
    split_files,
)
from fastmini.data.ner import (
    IGNORE_INDEX,
    NER_SUFFIXES,
    RECORD_SUFFIXES,
    align_labels,
    dataset_sentences,
    first_subtoken_positions,
    label_list,
    read_ner_file,
    read_ner_records,
)
from fastmini.files import looks_like_local_path
from fastmini.finetune.config import FinetuneConfig
from fastmini.finetune.tasks import LabelMap, TaskSpec, build_label_names, check_label_value

log = logging.getLogger("fastmini.finetune")


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[dict[str, Any]]
    validation: dict[str, list[dict[str, Any]]]  # split name -> labelled examples
    test: dict[str, list[dict[str, Any]]]  # split name -> examples, labels optional
    labels: LabelMap
    source: str  # in words, for logs and metrics.json

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), **{k: len(v) for k, v in {**self.validation, **self.test}.items()}}


def columns_of(config: FinetuneConfig) -> Columns:
    return Columns(config.text_column, config.text_pair_column, config.label_column)


def load_task_data(config: FinetuneConfig, spec: TaskSpec) -> TaskData:
    train, validation, test, label_names, source = _read_splits(config, spec)
    if config.max_train_examples:
        train = train[: config.max_train_examples]
    if config.max_eval_examples:
        validation = {k: v[: config.max_eval_examples] for k, v in validation.items()}
        test = {k: v[: config.max_eval_examples] for k, v in test.items()}
    for examples in (train, *validation.values(), *test.values()):
        for example in examples:
            if example.get("label") is not None:
                check_label_value(spec, example["label"], example["where"])
    train_labels = [e["tags"] if spec.kind == "ner" else e["label"] for e in train]
    names = build_label_names(spec, train_labels, config.label_separator) if label_names is None else label_names
    if spec.kind in ("classification", "multilabel", "ner") and names is not None and len(names) < 2:
        raise DataError(
            f"{source}: the training data has only the label(s) {names}; {spec.kind} needs at least two different ones"
        )
    labels = LabelMap(spec, names, config.label_separator)
    for examples in (train, *validation.values(), *test.values()):  # every label is checked before training
        for example in examples:
            value = example["tags"] if spec.kind == "ner" else example["label"]
            if value is not None:
                example["target"] = labels.encode(value, example["where"], example.get("tag_wheres"))
    return TaskData(spec, train, validation, test, labels, source)


def _read_splits(config: FinetuneConfig, spec: TaskSpec):
    """(train, validation, test, fixed label names or None, source description)."""
    if config.data is None:
        if spec.is_glue:
            return _datasets_splits(spec.dataset, spec.dataset_config, config, spec)
        if spec.kind != "classification":
            raise DataError(
                f"--task {spec.name} needs --data (the embedded default, gensim's movie-review sentences, is a "
                "classification task)"
            )
        train, dev = polarity_split()
        return train, {"validation": dev}, {}, None, "gensim's 200 movie-review sentences (fixed 160 / 40 split)"
    path = Path(config.data).expanduser()
    if path.is_dir():
        return (*_local_splits(path, config, spec), str(path))
    if path.exists():
        raise DataError(
            f"--data {config.data}: expected a directory holding train.* and validation.* (or dev.*) files, got a file"
        )
    if looks_like_local_path(config.data):
        raise DataError(f"--data {config.data}: no such directory")
    return _datasets_splits(config.data, config.data_config, config, spec)


def _local_splits(directory: Path, config: FinetuneConfig, spec: TaskSpec):
    """(train, validation, test, label names or None) of a directory of split files."""
    suffixes = NER_SUFFIXES + RECORD_SUFFIXES if spec.kind == "ner" else LABELLED_SUFFIXES
    files = split_files(directory, suffixes)
    required = ("train", "validation")
    for needed in required:
        if needed not in files:
            *first, last = (f"{stem}.*" for stem in SPLIT_STEMS[needed])
            names = f"{', '.join(first)} or {last}" if first else last
            stems = ", ".join(stem for split in required for stem in SPLIT_STEMS[split])
            raise DataError(
                f"--data {directory}: no {names} file (expected {'/'.join(s.lstrip('.') for s in suffixes)} files "
                f"named {stems}, and optionally test)"
            )

    def read(split: str, labels_required: bool):
        path = files[split]
        if spec.kind != "ner":
            multilabel = spec.kind == "multilabel"
            columns = columns_of(config)
            return read_labelled_file(path, columns, labels_required, empty_label_is_a_value=multilabel), None
        if path.suffix.lower() in RECORD_SUFFIXES:
            return read_ner_records(path, config.text_column, config.label_column, tags_required=labels_required)
        return read_ner_file(path, tags_required=labels_required), None

    train, declared = read("train", True)
    validation = {"validation": read("validation", True)[0]}
    test = {}
    if "test" in files:
        test["test"] = warn_if_partly_labelled(read("test", False)[0], str(files["test"]), spec)
    return train, validation, test, _ner_label_names(spec, train, declared)


def warn_if_partly_labelled(examples: list[dict[str, Any]], source: str, spec: TaskSpec) -> list[dict[str, Any]]:
    """``examples``, after one warning when some of them (not none, not all) lack a label: their test metrics
    then cover the labelled ones only, which a forgotten label cell should not change unnoticed."""
    key = "tags" if spec.kind == "ner" else "label"
    missing = sum(example[key] is None for example in examples)
    if 0 < missing < len(examples):
        log.warning(
            "%s: %d of %d rows have no label; test metrics cover the %d labelled rows only",
            source,
            missing,
            len(examples),
            len(examples) - missing,
        )
    return examples


def _ner_label_names(spec: TaskSpec, train: list[dict[str, Any]], declared: list[str] | None) -> list[str] | None:
    """NER: the training tags and every tag name the training split declares (a ClassLabel's), in label_list's
    stable order, so that a tag the dataset defines but the training split lacks still has an output."""
    if spec.kind != "ner" or declared is None:
        return None
    return label_list([*(example["tags"] for example in train), declared])


def _datasets_splits(name: str, dataset_config: str | None, config: FinetuneConfig, spec: TaskSpec):
    def opened(split: str):
        return open_dataset_split(name, dataset_config, split, config.cache_dir)

    def read(split: str, dataset, labels_required: bool):
        source = dataset_source(name, dataset_config, split)
        if spec.kind == "ner":
            return dataset_sentences(
                dataset, source, config.text_column, config.label_column, tags_required=labels_required
            )
        return dataset_examples(
            dataset, source, columns_of(config), labels_required=labels_required,
            labels_by_name=spec.label_names is None,
        )  # fmt: skip

    train, label_names = read("train", opened("train"), True)
    validation = {}
    for split in spec.validation_splits:
        found, dataset = _open_first(opened, _split_names(split, spec))
        validation[split] = read(found, dataset, True)[0]
    test = {}
    for split in spec.test_splits:
        try:
            dataset = opened(split)
        except DataError:
            continue  # a dataset without a test split: validation only
        test[split] = warn_if_partly_labelled(
            read(split, dataset, False)[0], dataset_source(name, dataset_config, split), spec
        )
    if spec.label_names is not None:
        label_names = list(spec.label_names)
    if spec.kind == "ner":
        label_names = _ner_label_names(spec, train, label_names)
    elif spec.kind != "classification":
        label_names = None
    source = f"dataset '{name}'" + (f" ({dataset_config})" if dataset_config else "")
    return train, validation, test, label_names, source


def _split_names(split: str, spec: TaskSpec) -> tuple[str, ...]:
    """The split names to try for one validation split: GLUE's own, else validation, dev or valid (as files)."""
    if spec.is_glue or split != "validation":
        return (split,)
    return SPLIT_STEMS["validation"]


def _open_first(opened, names: tuple[str, ...]):
    """(name, dataset) of the first split of ``names`` that loads; the first one's error when none does."""
    errors = []
    for name in names:
        try:
            return name, opened(name)
        except DataError as error:
            errors.append(error)
    if len(names) == 1:
        raise errors[0]
    tried = ", ".join(f"'{name}'" for name in names[1:])
    raise DataError(f"{errors[0]} (no split {tried} either)") from errors[0]


# ------------------------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    """Tokenised examples of one split (see the module docstring)."""

    kind: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    targets: list[Any] | None  # None: unlabelled (a test file without labels)
    word_positions: list[list[int | None]] | None  # NER only
    pad_token_id: int
    cut_rows: frozenset[int] = frozenset()  # examples longer than max_length, cut to it (NER: that lost words)

    @property
    def cut(self) -> int:
        return len(self.cut_rows)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int], seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Padded tensors for ``indices`` (``seeds``, one per index, are unused: nothing here is random)."""
        longest = max(len(self.input_ids[i]) for i in indices)
        size = len(indices)
        input_ids = torch.full((size, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((size, longest), dtype=torch.long)
        token_type_ids = torch.zeros((size, longest), dtype=torch.long)
        for row, index in enumerate(indices):
            ids = self.input_ids[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            if self.token_type_ids is not None:
                token_type_ids[row, : len(ids)] = torch.tensor(self.token_type_ids[index])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if self.targets is not None:
            batch["labels"] = self._labels(indices, longest)
        return batch

    def _labels(self, indices: list[int], longest: int) -> torch.Tensor:
        targets = [self.targets[i] for i in indices]
        if self.kind == "ner":
            labels = torch.full((len(indices), longest), IGNORE_INDEX, dtype=torch.long)
            for row, target in enumerate(targets):
                labels[row, : len(target)] = torch.tensor(target)
            return labels
        if self.kind == "classification":
            return torch.tensor(targets, dtype=torch.long)
        return torch.tensor(targets, dtype=torch.float32)  # regression: (B,), multi-label: (B, K)


def encode(
    tokenizer,
    examples: list[dict[str, Any]],
    kind: str,
    max_length: int,
    alignment: str = "all",
    continuation: list[int] | None = None,
) -> Encoded:
    """Tokenise ``examples`` (targets included when every example has one; a split where only some have one is
    predicted without targets, and its metrics are computed on the labelled examples by the caller).

    ``continuation``: NER, the label of a word's later sub-tokens per label (``ner.continuation_labels``)."""
    labelled = all("target" in example for example in examples)
    if kind == "ner":
        return _encode_words(tokenizer, examples, max_length, alignment, labelled, continuation)
    texts = [e["text"] for e in examples]
    pairs = [e["text_pair"] for e in examples] if examples and examples[0]["text_pair"] is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    # Only examples that reached max_length can have been cut: those are tokenised again, whole, to tell.
    full = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) >= max_length]
    whole = []
    if full:
        pair_texts = [pairs[i] for i in full] if pairs else None
        whole = tokenizer([texts[i] for i in full], pair_texts, verbose=False)["input_ids"]  # no "too long" warning
    return Encoded(
        kind=kind,
        input_ids=encoded["input_ids"],
        token_type_ids=encoded.get("token_type_ids"),
        targets=[e["target"] for e in examples] if labelled else None,
        word_positions=None,
        pad_token_id=_pad_id(tokenizer),
        cut_rows=frozenset(row for row, ids in zip(full, whole, strict=True) if len(ids) > max_length),
    )


def _encode_words(tokenizer, examples, max_length: int, alignment: str, labelled: bool, continuation) -> Encoded:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "NER needs a fast tokenizer (one with tokenizer.json) to map sub-tokens to words; "
            f"{type(tokenizer).__name__} is not one"
        )
    encoded = tokenizer(
        [e["tokens"] for e in examples], is_split_into_words=True, truncation=True, max_length=max_length
    )
    targets, positions = [], []
    for index, example in enumerate(examples):
        word_ids = encoded.word_ids(index)
        positions.append(first_subtoken_positions(word_ids, len(example["tokens"])))
        if labelled:
            targets.append(align_labels(word_ids, example["target"], alignment, continuation))
    return Encoded(
        kind="ner",
        input_ids=encoded["input_ids"],
        token_type_ids=encoded.get("token_type_ids"),
        targets=targets if labelled else None,
        word_positions=positions,
        pad_token_id=_pad_id(tokenizer),
        cut_rows=frozenset(
            # the encoding is full and the last word went unread (a word the tokenizer turns into nothing, a soft
            # hyphen, has no position either, anywhere)
            row
            for row, (ids, sentence) in enumerate(zip(encoded["input_ids"], positions, strict=True))
            if len(ids) >= max_length and sentence and sentence[-1] is None
        ),
    )


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
