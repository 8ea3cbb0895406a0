"""A task's splits, its label map, and the examples encoded for the model.

Sources (``--data``): none (a GLUE task's own ``datasets`` split, or the embedded movie-review
sentences), a local directory of ``train`` / ``validation`` or ``dev`` / ``test`` files, or a
``datasets`` name. Validation labels are required; test files may lack labels (then they only
get predictions). Labels outside the training label map stop the run with the row named.

``Encoded`` is what the training loop and the evaluator read: token ids per example, the model
targets (class index, number, multi-hot row, or one label per sub-token), and for NER the
position of every word's first sub-token (where its prediction is read). ``batch`` pads on
the fly, to the longest example of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmini.data.corpus import DataError
from fastmini.data.labelled import Columns, load_dataset_split, polarity_split, read_labelled_file, split_files
from fastmini.data.ner import IGNORE_INDEX, NER_SUFFIXES, align_labels, first_subtoken_positions, read_ner_file
from fastmini.finetune.config import FinetuneConfig
from fastmini.finetune.tasks import LabelMap, TaskSpec, build_label_names


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
                example["target"] = labels.encode(value, example["where"])
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
        return (*_local_splits(path, config, spec), None, str(path))
    if path.exists():
        raise DataError(
            f"--data {config.data}: expected a directory holding train.* and validation.* (or dev.*) files, got a file"
        )
    if config.data.startswith((".", "/", "~")) or config.data.count("/") > 1:
        raise DataError(f"--data {config.data}: no such directory")
    if spec.kind == "ner":
        raise DataError(f"--data {config.data}: --task ner reads a directory of two-column files (token TAB tag)")
    return _datasets_splits(config.data, config.data_config, config, spec)


def _local_splits(directory: Path, config: FinetuneConfig, spec: TaskSpec):
    suffixes = NER_SUFFIXES if spec.kind == "ner" else (".csv", ".tsv", ".json", ".jsonl")
    files = split_files(directory, suffixes)
    for needed, names in (("train", "train.*"), ("validation", "validation.* or dev.*")):
        if needed not in files:
            raise DataError(
                f"--data {directory}: no {names} file (expected {'/'.join(s.lstrip('.') for s in suffixes)} files "
                f"named train, validation or dev, and optionally test)"
            )

    def read(split: str, labels_required: bool) -> list[dict[str, Any]]:
        if spec.kind == "ner":
            return read_ner_file(files[split])
        return read_labelled_file(files[split], columns_of(config), labels_required)

    test = {"test": read("test", False)} if "test" in files else {}
    return read("train", True), {"validation": read("validation", True)}, test


def _datasets_splits(name: str, dataset_config: str | None, config: FinetuneConfig, spec: TaskSpec):
    columns = columns_of(config)

    def load(split: str, labels_required: bool):
        return load_dataset_split(
            name, dataset_config, split, columns, labels_required=labels_required, cache_dir=config.cache_dir
        )

    train, label_names = load("train", True)
    validation = {split: load(split, True)[0] for split in spec.validation_splits}
    test = {}
    for split in spec.test_splits:
        try:
            test[split] = load(split, False)[0]
        except DataError:
            pass  # a dataset without a test split: validation only
    if spec.label_names is not None:
        label_names = list(spec.label_names)
    if spec.kind != "classification":
        label_names = None
    source = f"dataset '{name}'" + (f" ({dataset_config})" if dataset_config else "")
    return train, validation, test, label_names, source


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

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int], seed: int | None = None) -> dict[str, torch.Tensor]:
        """Padded tensors for ``indices`` (``seed`` is unused: nothing here is random)."""
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


def encode(tokenizer, examples: list[dict[str, Any]], kind: str, max_length: int, alignment: str = "all") -> Encoded:
    """Tokenise ``examples`` (targets included when every example has one)."""
    labelled = all("target" in example for example in examples)
    if kind == "ner":
        return _encode_words(tokenizer, examples, max_length, alignment, labelled)
    texts = [e["text"] for e in examples]
    pairs = [e["text_pair"] for e in examples] if examples and examples[0]["text_pair"] is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return Encoded(
        kind=kind,
        input_ids=encoded["input_ids"],
        token_type_ids=encoded.get("token_type_ids"),
        targets=[e["target"] for e in examples] if labelled else None,
        word_positions=None,
        pad_token_id=_pad_id(tokenizer),
    )


def _encode_words(tokenizer, examples, max_length: int, alignment: str, labelled: bool) -> Encoded:
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
            targets.append(align_labels(word_ids, example["target"], alignment))
    return Encoded(
        kind="ner",
        input_ids=encoded["input_ids"],
        token_type_ids=encoded.get("token_type_ids"),
        targets=targets if labelled else None,
        word_positions=positions,
        pad_token_id=_pad_id(tokenizer),
    )


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
