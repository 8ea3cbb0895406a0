"""``python -m fastmini.finetune`` on ``datasets`` sources, offline: GLUE by name and NER rows of word and tag lists.

``datasets.load_dataset`` is replaced by a stand-in hub that serves in-memory ``datasets.Dataset`` objects with
the real schemas (GLUE's columns, ClassLabel names, hidden test labels of -1, MNLI's matched / mismatched splits;
conll2003's ``tokens`` / ``ner_tags`` with ``Sequence(ClassLabel)`` tags and ``-DOCSTART-`` rows) and raises as
datasets does for an unknown dataset or split. Local parquet / jsonl NER files are written by the tests.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmini.data.corpus import DataError
from fastmini.data.ner import dataset_sentences, read_ner_records, sentences_of
from fastmini.finetune import metrics as metric_functions
from fastmini.finetune.__main__ import main
from fastmini.finetune.testing import classification_examples, make_tiny_model, ner_sentences
from fastmini.training.testing import cli_error

# An optional dependency (the trainers' `datasets` sources): without it this module is skipped, and the
# rest of a run (e.g. `pytest -m gpu tests/` on a machine without it) still collects.
datasets = pytest.importorskip("datasets")

CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # conll2003's order
# The test data's entity types (fastmini.finetune.testing) as conll2003 types.
AS_CONLL = {"O": "O", "B-ANIMAL": "B-PER", "I-ANIMAL": "I-PER", "B-FOOD": "B-LOC"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"))


class Hub:
    """A stand-in for the Hugging Face hub: ``datasets.load_dataset(name, config, split=...)`` from memory."""

    def __init__(self):
        self.datasets: dict[tuple[str, str | None], dict[str, datasets.Dataset]] = {}
        self.requests: list[tuple[str, str | None, str]] = []

    def load_dataset(self, path, name=None, *, split=None, cache_dir=None, **kwargs):
        self.requests.append((path, name, split))
        if (path, name) not in self.datasets:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
        splits = self.datasets[path, name]
        if split not in splits:  # datasets' own message
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return splits[split]

    def splits_asked(self) -> list[str]:
        return [split for _, _, split in self.requests]


@pytest.fixture
def hub(monkeypatch) -> Hub:
    stand_in = Hub()
    monkeypatch.setattr(datasets, "load_dataset", stand_in.load_dataset)
    return stand_in


def base_args(model: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--output-dir", str(output), "--lr", "5e-3", "--seed", "1", "--batch-size", "8",
            "--no-progress", "--threads", "1", *extra]  # fmt: skip


def metrics_of(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


def predictions_of(output: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (output / f"predictions_{split}.jsonl").read_text().splitlines()]


def error_of(argv: list[str], capsys) -> str:
    return cli_error(main, argv, capsys)


# ---- GLUE by name ------------------------------------------------------------------------------------

# nyu-mll/glue's schemas: text columns, label names (None: STS-B's float scores), validation and test splits.
GLUE = {
    "cola": (("sentence",), ["unacceptable", "acceptable"], ("validation",), ("test",)),
    "sst2": (("sentence",), ["negative", "positive"], ("validation",), ("test",)),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ("validation",), ("test",)),
    "stsb": (("sentence1", "sentence2"), None, ("validation",), ("test",)),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ("validation",), ("test",)),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"],
             ("validation_matched", "validation_mismatched"), ("test_matched", "test_mismatched")),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ("validation",), ("test",)),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ("validation",), ("test",)),
}  # fmt: skip
# The official metrics of each task (the GLUE benchmark's), written out here rather than read from fastmini.
OFFICIAL = {"cola": {"matthews_correlation"}, "sst2": {"accuracy"}, "mrpc": {"f1", "accuracy"},
            "stsb": {"pearson", "spearman"}, "qqp": {"f1", "accuracy"}, "mnli": {"accuracy"}, "qnli": {"accuracy"},
            "rte": {"accuracy"}}  # fmt: skip
SELECTION = {"cola": "matthews_correlation", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}  # the rest: accuracy


def glue_split(task: str, count: int, seed: int, hidden: bool) -> datasets.Dataset:
    """One split with GLUE's features; labels follow a sentiment word (easy), -1 when ``hidden`` (test splits)."""
    columns, names, _, _ = GLUE[task]
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    features = datasets.Features(
        {**{c: datasets.Value("string") for c in columns}, "label": label, "idx": datasets.Value("int32")}
    )
    rows = classification_examples(count, seed, pair=len(columns) == 2)
    texts = [[r["premise"], r["hypothesis"]] if len(columns) == 2 else [r["text"]] for r in rows]
    positive = [r["label"] == "pos" for r in rows]
    if names is None:
        labels = [(3.5 if p else 0.5) + 0.25 * (i % 3) for i, p in enumerate(positive)]
    else:
        labels = [(len(names) - 1 if p else 0) if task in ("mnli", "qnli", "rte") else int(p) for p in positive]
    if hidden:
        labels = [-1.0 if names is None else -1] * count
    data = {c: [t[k] for t in texts] for k, c in enumerate(columns)}
    return datasets.Dataset.from_dict({**data, "label": labels, "idx": list(range(count))}, features=features)


def add_glue(hub: Hub, task: str) -> None:
    _, _, validation, test = GLUE[task]
    splits = {"train": glue_split(task, 32, 1, False)}
    splits.update({split: glue_split(task, 16, 2 + k, False) for k, split in enumerate(validation)})
    splits.update({split: glue_split(task, 8, 5 + k, True) for k, split in enumerate(test)})
    hub.datasets["nyu-mll/glue", task] = splits


@pytest.mark.parametrize("task", list(GLUE))
def test_glue_task_by_name_reports_its_official_metrics_on_every_validation_split(task, hub, model_dir, tmp_path):
    add_glue(hub, task)
    _, names, validation_splits, test_splits = GLUE[task]
    output = tmp_path / "out"
    assert main(base_args(model_dir, output, "--task", task, "--epochs", "2")) == 0
    assert {(name, config) for name, config, _ in hub.requests} == {("nyu-mll/glue", task)}
    assert set(hub.splits_asked()) == {"train", *validation_splits, *test_splits}

    metrics = metrics_of(output)
    assert metrics["selection_metric"] == SELECTION.get(task, "accuracy")
    assert metrics["selection_split"] == validation_splits[0]
    assert metrics["label_names"] == names
    assert metrics["examples"] == {"train": 32, **{s: 16 for s in validation_splits}, **{s: 8 for s in test_splits}}
    chosen = metrics["modes"]["full"]["chosen"]
    assert set(chosen["validation"]) == set(validation_splits)  # MNLI: matched and mismatched both evaluated
    for split in validation_splits:
        scores = chosen["validation"][split]
        assert set(scores) == OFFICIAL[task]
        # STS-B: a barely trained model predicts nearly the same score everywhere, and the file's 6 digits then
        # move the correlations in the third decimal.
        tolerance = 1e-2 if names is None else 1e-6
        assert scores == pytest.approx(recomputed(task, names, predictions_of(output, split)), abs=tolerance)
    assert chosen["test"] is None  # every test label is -1 (hidden): predictions only, no test metrics
    for split in test_splits:
        rows = predictions_of(output, split)
        assert len(rows) == 8 and all(row["label"] is None for row in rows)


def recomputed(task: str, names: list[str] | None, rows: list[dict]) -> dict[str, float]:
    """The official metrics of a predictions file, computed again from its gold labels and predictions."""
    if names is None:
        return metric_functions.glue_metrics(task, [r["label"] for r in rows], [r["prediction"] for r in rows])
    index = {name: i for i, name in enumerate(names)}
    gold = [index[r["label"]] for r in rows]
    return metric_functions.glue_metrics(task, gold, [index[r["prediction"]] for r in rows])


def test_glue_labels_of_minus_one_are_hidden_only_in_test_splits(hub, model_dir, tmp_path, capsys):
    add_glue(hub, "sst2")
    hidden = glue_split("sst2", 16, 2, hidden=True)
    hub.datasets["nyu-mll/glue", "sst2"]["validation"] = hidden
    line = error_of(base_args(model_dir, tmp_path / "out", "--task", "sst2", "--epochs", "1"), capsys)
    assert "dataset 'nyu-mll/glue' (sst2), split 'validation', row 0: no label in column 'label'" in line


def rotten_tomatoes_split(count: int, seed: int, multilabel: bool = False) -> datasets.Dataset:
    """rotten_tomatoes' schema (text, ClassLabel neg/pos); ``multilabel``: go_emotions' (a list of ClassLabels)."""
    names = ["neg", "pos"]
    label = datasets.Sequence(datasets.ClassLabel(names=names)) if multilabel else datasets.ClassLabel(names=names)
    rows = classification_examples(count, seed)
    labels = [int(r["label"] == "pos") for r in rows]
    features = datasets.Features({"text": datasets.Value("string"), "label": label})
    return datasets.Dataset.from_dict(
        {"text": [r["text"] for r in rows], "label": [[x] for x in labels] if multilabel else labels},
        features=features,
    )


@pytest.mark.parametrize("task", ["classification", "multilabel"])
def test_a_datasets_name_with_class_labels_trains_on_their_names(task, hub, model_dir, tmp_path):
    """Outside GLUE the label map comes from the data: a ClassLabel's integers stand for its names."""
    multilabel = task == "multilabel"
    hub.datasets["rotten_tomatoes", None] = {
        "train": rotten_tomatoes_split(32, 1, multilabel),
        "validation": rotten_tomatoes_split(16, 2, multilabel),
    }
    output = tmp_path / "out"
    assert main(base_args(model_dir, output, "--data", "rotten_tomatoes", "--task", task, "--epochs", "1")) == 0
    assert metrics_of(output)["label_names"] == ["neg", "pos"]
    rows = predictions_of(output, "validation")
    gold = [r["label"] for r in rotten_tomatoes_split(16, 2).to_list()]
    assert [row["label"] for row in rows] == [[["neg", "pos"][g]] if multilabel else ["neg", "pos"][g] for g in gold]


# ---- NER from a datasets name -----------------------------------------------------------------------


def conll_split(count: int, seed: int, names: list[str] | None = None, columns=("tokens", "ner_tags")):
    """conll2003's layout: id, tokens, pos_tags and ner_tags, tags as ClassLabel integers (``names``) or, with
    ``names`` None, as strings; a -DOCSTART- row and an empty row first, as conll2003's splits have."""
    sentences = [[("-DOCSTART-", "O")], [], *ner_sentences(count, seed)]
    words = [[w for w, _ in s] for s in sentences]
    tags = [[AS_CONLL[t] for _, t in s] for s in sentences]
    tag_feature = datasets.Value("string") if names is None else datasets.ClassLabel(names=names)
    if names is not None:
        tags = [[names.index(t) for t in row] for row in tags]
    tokens_column, tags_column = columns
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            tokens_column: datasets.Sequence(datasets.Value("string")),
            "pos_tags": datasets.Sequence(datasets.ClassLabel(names=["NN", "VB", "DT"])),
            tags_column: datasets.Sequence(tag_feature),
        }
    )
    pos = [[0] * len(row) for row in words]
    data = {"id": [str(i) for i in range(len(words))], tokens_column: words, "pos_tags": pos, tags_column: tags}
    return datasets.Dataset.from_dict(data, features=features)


def add_conll(hub: Hub, name: str = "conll2003", validation: str = "validation", test: bool = True, **options):
    splits = {"train": conll_split(64, 1, CONLL_TAGS, **options), validation: conll_split(24, 2, CONLL_TAGS, **options)}
    if test:
        splits["test"] = conll_split(8, 3, CONLL_TAGS, **options)
    hub.datasets[name, None] = splits


# Every tag conll2003 declares, by name, in the stable order of the two-column files' label maps (O first, then by
# type, B before I), though the data use only PER and LOC: a tag the dataset defines keeps its output.
CONLL_LABEL_MAP = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_ner_from_a_datasets_name_with_classlabel_tags(hub, model_dir, tmp_path):
    from transformers import AutoModelForTokenClassification

    add_conll(hub)
    output = tmp_path / "out"
    argv = base_args(model_dir, output, "--task", "ner", "--data", "conll2003", "--epochs", "6", "--schedule", "linear")
    assert main(argv) == 0
    assert set(hub.requests) == {("conll2003", None, "train"), ("conll2003", None, "validation"),
                                 ("conll2003", None, "test")}  # fmt: skip
    metrics = metrics_of(output)
    assert metrics["label_names"] == CONLL_LABEL_MAP
    model = AutoModelForTokenClassification.from_pretrained(output)
    assert [model.config.id2label[i] for i in range(model.config.num_labels)] == CONLL_LABEL_MAP
    assert metrics["examples"] == {"train": 64, "validation": 24, "test": 8}  # -DOCSTART- and empty rows skipped
    chosen = metrics["modes"]["full"]["chosen"]
    scores = chosen["validation"]["validation"]
    assert set(scores) == {"f1", "precision", "recall", "accuracy"} and scores["f1"] >= 0.6, scores
    assert set(chosen["test"]["test"]) == set(scores)  # conll2003's test split is labelled
    rows = predictions_of(output, "validation")
    assert rows[0]["label"] == [AS_CONLL[t] for _, t in ner_sentences(24, 2)[0]]  # tags by name, not integers
    assert all(set(row["prediction"]) <= set(CONLL_LABEL_MAP) for row in rows)
    gold, guess = [row["label"] for row in rows], [row["prediction"] for row in rows]
    assert metric_functions.entity_scores(gold, guess)["f1"] == pytest.approx(scores["f1"], abs=1e-5)


def test_ner_from_a_datasets_name_with_a_dev_split_string_tags_and_other_columns(hub, model_dir, tmp_path):
    hub.datasets["someone/tagged", "v2"] = {
        "train": conll_split(32, 1, None, columns=("words", "labels")),
        "dev": conll_split(16, 2, None, columns=("words", "labels")),
    }
    output = tmp_path / "out"
    argv = base_args(model_dir, output, "--task", "ner", "--data", "someone/tagged", "--data-config", "v2",
                     "--text-column", "words", "--label-column", "labels", "--epochs", "1")  # fmt: skip
    assert main(argv) == 0
    assert hub.splits_asked() == ["train", "validation", "dev", "test"]  # validation, else dev; test is optional
    metrics = metrics_of(output)
    assert metrics["label_names"] == ["O", "B-LOC", "B-PER", "I-PER"]  # string tags: those the training data hold
    assert metrics["examples"] == {"train": 32, "validation": 16}
    assert "f1" in metrics["modes"]["full"]["chosen"]["validation"]["validation"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.remove_columns("ner_tags"),
            "dataset 'conll2003', split 'validation': no column 'ner_tags' (asked for as the tags column of "
            "--task ner); its columns are: id, tokens, pos_tags",
        ),
        (
            lambda s: s.map(
                lambda row, i: {"ner_tags": row["ner_tags"][:-1] if i == 3 else row["ner_tags"]}, with_indices=True
            ),
            "dataset 'conll2003', split 'validation', row 3: {words} words in column 'tokens' but {tags} tags in "
            "column 'ner_tags'",
        ),
        (
            lambda s: s.cast_column("ner_tags", datasets.Sequence(datasets.Value("int64"))),
            "dataset 'conll2003', split 'validation', row 2: column 'ner_tags' holds integer tags (0) but no tag names",
        ),
    ],
    ids=["missing column", "lengths differ", "integers without names"],
)
def test_bad_ner_datasets_name_the_dataset_split_row_and_column(change, message, hub, model_dir, tmp_path, capsys):
    add_conll(hub)
    validation = hub.datasets["conll2003", None]["validation"]
    hub.datasets["conll2003", None]["validation"] = change(validation)
    words = len(validation[3]["tokens"])
    line = error_of(base_args(model_dir, tmp_path / "out", "--task", "ner", "--data", "conll2003"), capsys)
    assert message.format(words=words, tags=words - 1) in line
    assert not (tmp_path / "out").exists()


def test_ner_datasets_errors_for_columns_and_splits(hub, model_dir, tmp_path, capsys):
    add_conll(hub, validation="valid", test=False)
    argv = base_args(model_dir, tmp_path / "out", "--task", "ner", "--data", "conll2003")
    line = error_of([*argv, "--label-column", "pos_tags"], capsys)
    assert "split 'train': column 'pos_tags' declares the tag name 'NN', which is not a BIO tag" in line
    line = error_of([*argv, "--text-column", "id"], capsys)
    assert "split 'train', row 0: column 'id' holds str, expected a list of words" in line
    line = error_of([*argv, "--text-pair-column", "pos_tags"], capsys)
    assert "--task ner reads one list of words per row" in line
    line = error_of([*argv, "--label-column", "tokens"], capsys)
    assert "--label-column must differ from --text-column ('tokens')" in line
    line = error_of(base_args(model_dir, tmp_path / "out", "--task", "ner", "--data", "nobody/nothing"), capsys)
    assert "'nobody/nothing' is not a local file or directory, and datasets could not load it" in line
    hub.datasets["conll2003", None].pop("valid")
    line = error_of(argv, capsys)
    assert "split 'validation'): Unknown split" in line and "(no split 'dev', 'valid' either)" in line


def test_ner_rows_read_by_themselves():
    dataset = conll_split(3, 1, None)
    sentences, declared = dataset_sentences(dataset, "here", "tokens", "ner_tags")
    assert declared is None and len(sentences) == 3 and sentences[0]["where"] == "here, row 2"
    assert sentences[0]["tags"] == [AS_CONLL[t] for _, t in ner_sentences(3, 1)[0]]
    bad = datasets.Dataset.from_dict({"tokens": [["a", "cat"]], "ner_tags": [["O", "PER"]]})
    with pytest.raises(DataError, match=r"here, row 0: 'PER' in column 'ner_tags' is not a BIO tag"):
        dataset_sentences(bad, "here", "tokens", "ner_tags")
    unlabelled = datasets.Dataset.from_dict({"tokens": [["a", "cat"]]})
    with pytest.raises(DataError, match="no column 'ner_tags'"):
        dataset_sentences(unlabelled, "here", "tokens", "ner_tags")
    sentences, _ = dataset_sentences(unlabelled, "here", "tokens", "ner_tags", tags_required=False)
    assert sentences == [{"tokens": ["a", "cat"], "tags": None, "where": "here, row 0"}]
    # datasets itself refuses ClassLabel integers out of range; a parquet file's metadata may not
    with pytest.raises(DataError, match=r"row 0: tag 2 in column 'ner_tags' is outside its ClassLabel's 0..1"):
        sentences_of([("here, row 0", {"tokens": ["a"], "ner_tags": [2]})], "here", "tokens", "ner_tags", ["O", "B-X"])


# ---- NER from local parquet / jsonl files -----------------------------------------------------------


def test_ner_from_local_parquet_files_keeps_classlabel_names(model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, count, seed in (("train", 48, 1), ("validation", 16, 2), ("test", 8, 3)):
        conll_split(count, seed, CONLL_TAGS).to_parquet(data / f"{split}.parquet")
    output = tmp_path / "out"
    assert main(base_args(model_dir, output, "--task", "ner", "--data", str(data), "--epochs", "2")) == 0
    metrics = metrics_of(output)
    assert metrics["label_names"] == CONLL_LABEL_MAP  # the names the parquet files' features carry
    assert metrics["examples"] == {"train": 48, "validation": 16, "test": 8}
    chosen = metrics["modes"]["full"]["chosen"]
    assert {"f1", "precision", "recall"} <= set(chosen["validation"]["validation"]) and chosen["test"] is not None


def test_ner_from_local_jsonl_files_with_string_tags_and_an_unlabelled_test_file(model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, count, seed in (("train", 48, 1), ("dev", 16, 2), ("test", 8, 3)):
        rows = [{"tokens": [w for w, _ in s], "ner_tags": [t for _, t in s]} for s in ner_sentences(count, seed)]
        if split == "test":
            rows = [{"tokens": row["tokens"]} for row in rows]  # no tags: predictions only
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    assert main(base_args(model_dir, output, "--task", "ner", "--data", str(data), "--epochs", "2")) == 0
    metrics = metrics_of(output)
    assert metrics["label_names"] == ["O", "B-ANIMAL", "I-ANIMAL", "B-FOOD"]
    chosen = metrics["modes"]["full"]["chosen"]
    assert "f1" in chosen["validation"]["validation"] and chosen["test"] is None
    rows = predictions_of(output, "test")
    assert len(rows) == 8 and all(row["label"] is None and len(row["prediction"]) == len(row["tokens"]) for row in rows)


def test_a_partly_labelled_ner_test_file_gives_unlabelled_sentences_for_its_rows_without_tags(tmp_path):
    """As a classification test file: rows with null or absent tags are predicted, the rest scored (with a
    warning, warn_if_partly_labelled); in a training or dev file the same rows are errors."""
    path = tmp_path / "test.jsonl"
    rows = [{"tokens": ["a", "cat"], "ner_tags": ["O", "B-ANIMAL"]}, {"tokens": ["a", "dog"], "ner_tags": None},
            {"tokens": ["bread"]}]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sentences, _ = read_ner_records(path, "tokens", "ner_tags", tags_required=False)
    assert [sentence["tags"] for sentence in sentences] == [["O", "B-ANIMAL"], None, None]
    with pytest.raises(DataError, match=r"test.jsonl, line 2: column 'ner_tags' holds NoneType, expected a list"):
        read_ner_records(path, "tokens", "ner_tags")
    path.write_text(json.dumps({"tokens": ["a", "cat"], "ner_tags": [" O ", "B-ANIMAL\t"]}) + "\n")
    assert read_ner_records(path, "tokens", "ner_tags")[0][0]["tags"] == ["O", "B-ANIMAL"]  # stripped as in .tsv


def test_bad_local_ner_rows_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"tokens": ["a", "cat"], "ner_tags": ["O", "B-ANIMAL"]}\n{"tokens": ["a"], "ner_tags": []}\n')
    with pytest.raises(DataError, match=r"train.jsonl, line 2: 1 words in column 'tokens' but 0 tags"):
        read_ner_records(path, "tokens", "ner_tags")
    path.write_text('{"tokens": ["a", "cat"], "tags": ["O", "B-ANIMAL"]}\n')
    with pytest.raises(DataError, match=r"train.jsonl: no column 'ner_tags' .* its columns are: tokens, tags"):
        read_ner_records(path, "tokens", "ner_tags")
    import pyarrow
    import pyarrow.parquet

    plain = tmp_path / "train.parquet"  # written without datasets: integer tags carry no names
    pyarrow.parquet.write_table(pyarrow.table({"tokens": [["a", "cat"]], "ner_tags": [[0, 1]]}), plain)
    with pytest.raises(DataError, match=r"train.parquet, row 0: column 'ner_tags' holds integer tags \(0\) but no"):
        read_ner_records(plain, "tokens", "ner_tags")
    broken = tmp_path / "dev.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="dev.parquet: not a readable parquet file"):
        read_ner_records(broken, "tokens", "ner_tags")


def test_ner_column_defaults_are_conll2003s_and_documented():
    from fastmini.finetune.config import build_parser, resolve

    config, _ = resolve(["--task", "ner", "--data", "x"])
    assert (config.text_column, config.label_column) == ("tokens", "ner_tags")
    config, _ = resolve(["--task", "ner", "--data", "x", "--text-column", "words", "--label-column", "labels"])
    assert (config.text_column, config.label_column) == ("words", "labels")
    assert resolve(["--data", "x"])[0].text_column == "text"  # other tasks keep theirs
    text = " ".join(build_parser().format_help().split())
    assert "by default 'tokens'" in text and "by default 'ner_tags'" in text and "Sequence(ClassLabel)" in text
