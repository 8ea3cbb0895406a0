"""Fine-tuning data: labelled files with named columns, the NER format, sub-word alignment, label maps."""

from __future__ import annotations

import json

import pytest
import torch

from fastmini.data.corpus import DataError
from fastmini.data.labelled import Columns, polarity_split, read_labelled_file, split_files
from fastmini.data.ner import (
    IGNORE_INDEX,
    align_labels,
    continuation_labels,
    first_subtoken_positions,
    label_list,
    read_ner_file,
)
from fastmini.finetune.config import FinetuneConfig
from fastmini.finetune.data import encode, load_task_data
from fastmini.finetune.tasks import LabelMap, build_label_names, task_spec
from fastmini.finetune.testing import make_tiny_tokenizer, write_table

ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad, dull film", "label": "neg"}]


# ---- labelled files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_every_format_reads_the_same_examples(tmp_path, suffix):
    path = write_table(tmp_path / f"train{suffix}", ROWS)
    examples = read_labelled_file(path, Columns())
    assert [(e["text"], e["text_pair"], e["label"]) for e in examples] == [
        ("good film", None, "pos"), ("bad, dull film", None, "neg")
    ]  # fmt: skip
    assert str(path) in examples[1]["where"]


def test_sentence_pairs_and_other_column_names(tmp_path):
    path = write_table(tmp_path / "dev.tsv", [{"s1": "a", "s2": "b", "gold": 1}, {"s1": "c", "s2": "d", "gold": 0}])
    examples = read_labelled_file(path, Columns("s1", "s2", "gold"))
    assert [(e["text"], e["text_pair"], e["label"]) for e in examples] == [("a", "b", "1"), ("c", "d", "0")]


def test_tsv_cells_are_not_quoted_as_in_glue(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\n"the film" is bad\t0\nit\'s "fine\t1\n')
    examples = read_labelled_file(path, Columns("sentence"))
    assert [(e["text"], e["label"]) for e in examples] == [('"the film" is bad', "0"), ("it's \"fine", "1")]


@pytest.fixture
def default_csv_field_limit():
    """The csv module's own limit per field, as a fresh process has it (another test may have raised it)."""
    import csv

    limit = csv.field_size_limit(131072)
    yield
    csv.field_size_limit(limit)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_cell_longer_than_the_csv_modules_default_limit_is_text(tmp_path, suffix, default_csv_field_limit):
    review = "a long and good film " * 10_000  # 210,000 characters, past csv's 131,072
    path = write_table(tmp_path / f"train{suffix}", [{"text": review, "label": "pos"}, *ROWS])
    examples = read_labelled_file(path, Columns())
    expected = [(review, "pos"), ("good film", "pos"), ("bad, dull film", "neg")]
    assert [(e["text"], e["label"]) for e in examples] == expected


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_unknown_column_names_the_file_and_the_columns_it_has(tmp_path, suffix):
    path = write_table(tmp_path / f"train{suffix}", ROWS)
    with pytest.raises(DataError) as raised:
        read_labelled_file(path, Columns(text="sentence"))
    message = str(raised.value)
    assert str(path) in message and "no column 'sentence'" in message and "text, label" in message
    with pytest.raises(DataError, match="no column 'gold' .*label column"):
        read_labelled_file(path, Columns(label="gold"))
    assert read_labelled_file(path, Columns(label="gold"), labels_required=False)[0]["label"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,text,label\nfirst,second,1\n", "the header names column\\(s\\) 'text' more than once"),
        ('text,label\n"unterminated,1\nsecond,0\n', "malformed CSV"),  # not a field swallowing the file
    ],
)
def test_tables_that_would_be_read_wrong_are_refused(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_labelled_file(path, Columns("text", None, "label"))


def test_empty_files_and_rows_without_labels(tmp_path):
    empty = tmp_path / "train.csv"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="the file is empty"):
        read_labelled_file(empty, Columns())
    header_only = tmp_path / "dev.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no examples"):
        read_labelled_file(header_only, Columns())
    unlabelled = tmp_path / "x.csv"
    unlabelled.write_text("text,label\ngood,pos\nbad,\n")
    with pytest.raises(DataError, match=r"x.csv, line 3: no label in column 'label'"):
        read_labelled_file(unlabelled, Columns())
    blank = tmp_path / "w.csv"
    blank.write_text("text,label\ngood,pos\nbad,   \n")  # spaces only: no label either (it was a class named "")
    with pytest.raises(DataError, match=r"w.csv, line 3: no label in column 'label'"):
        read_labelled_file(blank, Columns())
    repeated = tmp_path / "k.jsonl"
    repeated.write_text('{"text": "a", "label": "pos", "label": "neg"}\n')  # json.loads kept the last silently
    with pytest.raises(DataError, match=r"k.jsonl, line 1: an object names the key 'label' twice"):
        read_labelled_file(repeated, Columns())
    ragged = tmp_path / "r.csv"
    ragged.write_text("text,label\ngood,pos,extra\n")
    with pytest.raises(DataError, match="line 2: 3 cells, the header has 2"):
        read_labelled_file(ragged, Columns())
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_labelled_file(broken, Columns())


def test_an_empty_multilabel_cell_is_the_empty_label_set(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text('text,labels\na cat,animal\nthe film,\ncat and bread,"animal,food"\nbread,food\n')
    (data / "dev.csv").write_text("text,labels\nthe plot,\na dog,animal\n")
    config = FinetuneConfig(task="multilabel", data=str(data), label_column="labels")
    task = load_task_data(config, task_spec("multilabel"))
    assert task.labels.names == ["animal", "food"]
    assert [e["target"] for e in task.train] == [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    assert [e["target"] for e in task.validation["validation"]] == [[0.0, 0.0], [1.0, 0.0]]
    # a row shorter than the header has no label cell at all: still missing
    (data / "dev.csv").write_text("text,labels\nthe plot\n")
    with pytest.raises(DataError, match=r"dev.csv, line 2: no label in column 'labels'"):
        load_task_data(config, task_spec("multilabel"))
    # single-label data: an empty cell is still a missing label
    with pytest.raises(DataError, match=r"train.csv, line 3: no label"):
        read_labelled_file(data / "train.csv", Columns(label="labels"))


def test_lines_end_at_newlines_only(tmp_path):
    odd = "a\u2028b\u0085c\x0cd\u2029e"  # line and paragraph separators, NEL, form feed: text, not line ends
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"text": odd, "label": "pos"}, ensure_ascii=False) + '\n{"text": "b", "label": 1}\n')
    assert [e["text"] for e in read_labelled_file(jsonl, Columns())] == [odd, "b"]
    csv_file = tmp_path / "x.csv"
    csv_file.write_bytes(f'text,label\r\n{odd},pos\r\n"two\nlines",neg\r\nlast,pos\r\n'.encode())
    examples = read_labelled_file(csv_file, Columns())
    assert [(e["text"], e["label"]) for e in examples] == [(odd, "pos"), ("two\nlines", "neg"), ("last", "pos")]
    assert examples[2]["where"].endswith("line 5")  # the quoted line break counts as a line
    ner = tmp_path / "x.tsv"
    ner.write_text(f"{odd}\tO\ncat\tB-ANIMAL\n\nbread\tB-FOOD\n")
    sentences = read_ner_file(ner)
    assert [s["tokens"] for s in sentences] == [[odd, "cat"], ["bread"]] and sentences[1]["where"].endswith("line 4")


def test_split_files_of_a_data_directory(tmp_path):
    for name in ("train.csv", "dev.csv", "test.csv", "notes.txt"):
        (tmp_path / name).write_text("text,label\na,b\n")
    found = split_files(tmp_path)
    assert {split: path.name for split, path in found.items()} == {
        "train": "train.csv", "validation": "dev.csv", "test": "test.csv"
    }  # fmt: skip
    (tmp_path / "validation.csv").write_text("text,label\na,b\n")  # beside dev.csv: which one is meant?
    with pytest.raises(DataError, match=r"several validation files \(dev.csv, validation.csv\)"):
        split_files(tmp_path)
    (tmp_path / "validation.csv").unlink()
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="several train files"):
        split_files(tmp_path)


def test_the_embedded_movie_review_split():
    train, dev = polarity_split()
    assert (len(train), len(dev)) == (160, 40)
    assert sorted(e["label"] for e in dev) == ["neg"] * 20 + ["pos"] * 20
    assert [e["label"] for e in train[:4]] == ["neg", "pos", "neg", "pos"]  # the first N hold both classes
    assert not {e["text"] for e in train} & {e["text"] for e in dev}
    assert any("—" in e["text"] for e in train + dev)  # Windows-1252 em dashes decoded, not mojibake
    assert polarity_split()[1] == dev  # fixed: the same every time


# ---- NER files ---------------------------------------------------------------------------------------


def test_ner_file_sentences_and_docstart(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("-DOCSTART-\tO\n\nThe\tO\nbig\tB-ANIMAL\ncat\tI-ANIMAL\n\n\nAPC2\tB\nis\tO\n")
    sentences = read_ner_file(path)
    assert [s["tokens"] for s in sentences] == [["The", "big", "cat"], ["APC2", "is"]]
    assert [s["tags"] for s in sentences] == [["O", "B-ANIMAL", "I-ANIMAL"], ["B", "O"]]
    assert sentences[1]["where"].endswith("line 8")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("The\tO\ncat\tB-ANIMAL\textra\n", r"line 2: expected two columns, 'token<TAB>tag'"),
        ("The\tO\n\ncat\n", r"line 3: expected two columns"),
        ("The\tO\ncat\tANIMAL\n", r"line 2: 'ANIMAL' is not a BIO tag"),
        ("The\tO\ncat\tB_ANIMAL\n", r"line 2: 'B_ANIMAL' is not a BIO tag"),
        ("\n\n", "the file is empty"),
        ("-DOCSTART-\tO\n\n", "no sentences"),
    ],
)
def test_malformed_ner_lines_are_named_by_line_number(tmp_path, content, message):
    path = tmp_path / "dev.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as raised:
        read_ner_file(path)
    assert str(path) in str(raised.value)


def test_a_trailing_tab_separates_nothing(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("John\tB-PER\t\nran\tO \n")
    assert read_ner_file(path)[0]["tags"] == ["B-PER", "O"]


def test_unlabelled_ner_files_hold_one_token_per_line(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("-DOCSTART-\n\nThe\nbig\ncat\n\nbread\n")
    with pytest.raises(DataError, match=r"line 3: expected two columns, 'token<TAB>tag', got 'The'"):
        read_ner_file(path)  # training and validation files need their tags
    sentences = read_ner_file(path, tags_required=False)
    assert [(s["tokens"], s["tags"]) for s in sentences] == [(["The", "big", "cat"], None), (["bread"], None)]
    # mixing both kinds is refused at the first line that differs
    path.write_text("The\nbig\tO\n")
    with pytest.raises(DataError, match=r"test.tsv, line 2: 2 column\(s\), but line 1 has 1"):
        read_ner_file(path, tags_required=False)
    path.write_text("The\tO\n\nbig\n")
    with pytest.raises(DataError, match=r"test.tsv, line 3: 1 column\(s\), but line 1 has 2"):
        read_ner_file(path, tags_required=False)
    path.write_text("The\tO\nbig\tB-ANIMAL\n")  # a labelled test file keeps its tags
    assert read_ner_file(path, tags_required=False)[0]["tags"] == ["O", "B-ANIMAL"]


def test_an_unknown_ner_tag_is_named_at_its_own_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("a\tO\ncat\tB-ANIMAL\n\nbig\tB-ANIMAL\ndog\tI-ANIMAL\n")
    (data / "dev.tsv").write_text("a\tO\ncat\tB-ANIMAL\n\nthe\tO\nbig\tO\ntoy\tB-TOY\n")
    with pytest.raises(DataError, match=r"dev.tsv, line 6: label 'B-TOY' is not in the label map"):
        load_task_data(FinetuneConfig(task="ner", data=str(data)), task_spec("ner"))


def test_ner_label_map_is_stable():
    names = label_list([["I-FOOD", "O", "B-ANIMAL"], ["I-ANIMAL", "B-FOOD"]])
    assert names == ["O", "B-ANIMAL", "I-ANIMAL", "B-FOOD", "I-FOOD"]
    assert label_list([["B-FOOD", "I-ANIMAL", "B-ANIMAL", "O", "I-FOOD"]]) == names  # order of appearance: irrelevant


# ---- sub-word alignment --------------------------------------------------------------------------


def test_alignment_every_subtoken_or_first_only():
    word_ids = [None, 0, 1, 1, 1, 2, None]
    word_labels = [3, 1, 2]
    assert align_labels(word_ids, word_labels, "all") == [IGNORE_INDEX, 3, 1, 1, 1, 2, IGNORE_INDEX]
    assert align_labels(word_ids, word_labels, "first") == [IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX, 2,
                                                            IGNORE_INDEX]  # fmt: skip
    # the same word id after a special token (a sentence pair) starts again
    assert align_labels([None, 0, None, 0, 0], [5], "first") == [IGNORE_INDEX, 5, IGNORE_INDEX, 5, IGNORE_INDEX]
    with pytest.raises(ValueError, match="alignment"):
        align_labels(word_ids, word_labels, "last")
    assert first_subtoken_positions(word_ids, 4) == [1, 2, 5, None]  # word 3 was cut off


def test_later_subtokens_of_a_beginning_keep_it_or_are_inside_the_entity():
    """ "all" (the MiniALBERT recipe, SPEC.md): every piece gets the word's label, B-X included; "inside"
    (transformers' run_ner): a B-X word's later pieces get I-X."""
    names = ["O", "B-ANIMAL", "I-ANIMAL", "B-FOOD", "B", "I"]  # no I-FOOD: B-FOOD stays B-FOOD
    continuation = continuation_labels(names)
    assert continuation == [0, 2, 2, 3, 5, 5]
    word_ids = [None, 0, 0, 1, 1, 2, 2, None]  # dog ##s, bread ##s, a bare-B word in two pieces
    assert align_labels(word_ids, [1, 3, 4], "all", continuation) == [IGNORE_INDEX, 1, 1, 3, 3, 4, 4, IGNORE_INDEX]
    assert align_labels(word_ids, [1, 3, 4], "inside", continuation) == [IGNORE_INDEX, 1, 2, 3, 3, 4, 5,
                                                                         IGNORE_INDEX]  # fmt: skip
    assert align_labels(word_ids, [1, 3, 4], "first", continuation) == [IGNORE_INDEX, 1, IGNORE_INDEX, 3,
                                                                        IGNORE_INDEX, 4, IGNORE_INDEX,
                                                                        IGNORE_INDEX]  # fmt: skip
    with pytest.raises(ValueError, match="'inside' needs the continuation labels"):
        align_labels(word_ids, [1, 3, 4], "inside")
    tokenizer = make_tiny_tokenizer()
    labels = LabelMap(task_spec("ner"), ["O", "B-ANIMAL", "I-ANIMAL"])
    example = {"tokens": ["dogs", "in", "town"], "where": "x"}
    example["target"] = labels.encode(["B-ANIMAL", "O", "O"], "x")
    for alignment, piece_label in (("all", 1), ("inside", 2)):
        encoded = encode(tokenizer, [example], "ner", 32, alignment, continuation_labels(labels.names))
        tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids[0])
        assert list(zip(tokens, encoded.targets[0], strict=True))[1:3] == [("dog", 1), ("##s", piece_label)]


def test_alignment_through_a_real_tokenizer():
    tokenizer = make_tiny_tokenizer()
    spec = task_spec("ner")
    labels = LabelMap(spec, ["O", "B-ANIMAL", "I-ANIMAL"])
    example = {"tokens": ["big", "cats", "in", "town"], "tags": ["B-ANIMAL", "I-ANIMAL", "O", "O"], "where": "x"}
    example["target"] = labels.encode(example["tags"], "x")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(example["tokens"], is_split_into_words=True)["input_ids"])
    assert tokens == ["[CLS]", "big", "cat", "##s", "in", "town", "[SEP]"]
    every = encode(tokenizer, [example], "ner", 32, "all")
    first = encode(tokenizer, [example], "ner", 32, "first")
    assert every.targets[0] == [IGNORE_INDEX, 1, 2, 2, 0, 0, IGNORE_INDEX]
    assert first.targets[0] == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0, 0, IGNORE_INDEX]
    assert every.word_positions[0] == [1, 2, 4, 5]
    cut = encode(tokenizer, [example], "ner", 5, "all")  # [CLS] big cat ##s [SEP]: "in" and "town" are cut off
    assert cut.word_positions[0] == [1, 2, None, None] and cut.targets[0] == [IGNORE_INDEX, 1, 2, 2, IGNORE_INDEX]
    assert (cut.cut, every.cut) == (1, 0)  # sentences that lost words, which the job reports
    batch = every.batch([0])
    assert batch["labels"].tolist() == [every.targets[0]] and batch["attention_mask"].all()


def test_examples_cut_to_max_length_are_counted_exactly():
    """Reaching max_length is not being cut: only longer examples count (a pair counts as one example)."""
    tokenizer = make_tiny_tokenizer()

    def example(text, pair=None):
        return {"text": text, "text_pair": pair, "target": 0, "where": "x"}

    singles = [example("good film"), example("good film and good bread")]
    assert [len(ids) for ids in encode(tokenizer, singles, "classification", 16).input_ids] == [4, 7]
    assert encode(tokenizer, singles, "classification", 7).cut == 0
    assert encode(tokenizer, singles, "classification", 4).cut == 1  # "good film" fits exactly
    assert encode(tokenizer, singles, "classification", 3).cut == 2
    pairs = [example("good", "bad film and bread"), example("good", "bad")]  # 8 and 5 tokens
    assert encode(tokenizer, pairs, "classification", 7).cut == 1
    assert encode(tokenizer, pairs, "classification", 8).cut == 0


def test_batches_pad_inputs_and_labels():
    tokenizer = make_tiny_tokenizer()
    spec = task_spec("ner")
    labels = LabelMap(spec, ["O", "B-FOOD"])
    examples = [{"tokens": words, "where": str(i)} for i, words in enumerate((["apple"], ["a", "bread", "and"]))]
    for example, tags in zip(examples, (["B-FOOD"], ["O", "B-FOOD", "O"]), strict=True):
        example["target"] = labels.encode(tags, example["where"])
    batch = encode(tokenizer, examples, "ner", 16).batch([0, 1])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX, 0, 1, 0, IGNORE_INDEX]]  # fmt: skip
    assert batch["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 2


# ---- label maps ------------------------------------------------------------------------------------


def test_label_maps_are_sorted_and_stable():
    classification = task_spec("classification")
    assert build_label_names(classification, ["pos", "neg", "pos"]) == ["neg", "pos"]
    assert build_label_names(classification, ["10", 2, "1", 2.0]) == [
        "1",
        "2",
        "10",
    ]  # numerically, one class per value
    assert build_label_names(classification, ["1.5", "1.50", 1.5, "0"]) == ["0", "1.5"]  # one number, however written
    assert build_label_names(classification, ["007", "010", "1_0", "1e0"]) == ["007", "010", "1_0", "1e0"]  # codes
    long_codes = ["123456789012345678901234567891", "123456789012345678901234567892"]  # past Decimal's 28 digits
    assert build_label_names(classification, long_codes) == long_codes
    assert build_label_names(task_spec("multilabel"), [["b", "a"], "c,a", []]) == ["a", "b", "c"]
    assert build_label_names(task_spec("rte"), ["whatever"]) == ["entailment", "not_entailment"]
    assert build_label_names(task_spec("regression"), [1.0]) is None


def test_json_labels_that_are_no_names_or_numbers_name_the_row(tmp_path):
    """true, ["pos"] or {"a": 1} in a single-label JSON column would become classes named "True", "['pos']"."""
    data = tmp_path / "data"
    data.mkdir()
    good = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    for bad, kind in ((True, "bool"), (["pos"], "list"), ({"a": 1}, "dict")):
        (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [*good, {"text": "c", "label": bad}]))
        (data / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in good))
        config = FinetuneConfig(task="classification", data=str(data))
        with pytest.raises(DataError, match=rf"train.jsonl, line 3: label .* is a {kind}; a class label is a name"):
            load_task_data(config, task_spec("classification"))
    rows = [{"text": "a", "labels": ["x", 1]}, {"text": "b", "labels": "y"}, {"text": "c", "labels": [["x"]]}]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "dev.jsonl").write_text(json.dumps(rows[0]))
    config = FinetuneConfig(task="multilabel", data=str(data), label_column="labels")
    with pytest.raises(DataError, match=r"train.jsonl, line 3: label \[\['x'\]\] is not a list of names"):
        load_task_data(config, task_spec("multilabel"))


def test_labels_missing_from_the_map_name_the_row():
    labels = LabelMap(task_spec("classification"), ["neg", "pos"])
    assert labels.encode("pos", "x") == 1 and labels.encode(" neg ", "x") == 0
    with pytest.raises(DataError, match=r"dev.csv, line 7: label 'maybe' is not in the label map .*neg, pos"):
        labels.encode("maybe", "dev.csv, line 7")
    glue = LabelMap(task_spec("mrpc"), list(task_spec("mrpc").label_names))
    assert glue.encode(1, "x") == 1 and glue.encode("0", "x") == 0 and glue.encode("equivalent", "x") == 1
    with pytest.raises(DataError, match="outside 0..1"):
        glue.encode(2, "row 3")
    regression = LabelMap(task_spec("regression"), None)
    with pytest.raises(DataError, match="not a number"):
        regression.encode("high", "row 1")
    assert regression.encode(" 2.5 ", "x") == 2.5 and regression.encode(3, "x") == 3.0
    for value in ("nan", "inf", "-Infinity", float("nan"), float("inf"), 10**400):
        with pytest.raises(DataError, match=r"dev.csv, line 4: label .* is not a finite number"):
            regression.encode(value, "dev.csv, line 4")
    multi = LabelMap(task_spec("multilabel"), ["animal", "food"])
    assert multi.encode(["food"], "x") == [0.0, 1.0] and multi.encode("animal, food", "x") == [1.0, 1.0]
    numbered = LabelMap(task_spec("multilabel"), build_label_names(task_spec("multilabel"), [["a", 1]]))
    assert numbered.encode("1.0,a", "x") == numbered.encode([1, "a"], "x") == [1.0, 1.0]  # 1, 1.0, "1": one class
    with pytest.raises(DataError, match="label 'toy'"):
        multi.encode("toy", "row 2")
    ner = LabelMap(task_spec("ner"), ["O", "B-ANIMAL"])
    with pytest.raises(DataError, match="label 'B-FOOD'"):
        ner.encode(["O", "B-FOOD"], "test.tsv, line 12")


def test_targets_become_tensors_of_the_right_type(tmp_path):
    tokenizer = make_tiny_tokenizer()
    for kind, target, dtype in (("classification", 1, torch.long), ("regression", 2.5, torch.float32),
                                ("multilabel", [1.0, 0.0], torch.float32)):  # fmt: skip
        example = {"text": "good film", "text_pair": None, "target": target, "where": "x"}
        labels = encode(tokenizer, [example], kind, 16).batch([0])["labels"]
        assert labels.dtype == dtype and labels.tolist() == [target]
    pair = {"text": "good film", "text_pair": "bad", "target": 0, "where": "x"}
    batch = encode(tokenizer, [pair], "classification", 16).batch([0])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    unlabelled = encode(tokenizer, [{"text": "good", "text_pair": None, "where": "x"}], "classification", 16)
    assert unlabelled.targets is None and "labels" not in unlabelled.batch([0])
    assert json.dumps(batch["input_ids"].tolist())  # plain ints


def test_predicting_leaves_a_model_in_eval_untouched_and_puts_one_in_train_back(tiny_config):
    """Threads may share a model in eval(): switching its mode back and forth under them raced (dropout ran in
    another thread's forward); a model in train() is evaluated in eval() and handed back in train()."""
    from fastmini import FastMiniForSequenceClassification
    from fastmini.finetune.inference import predict_logits

    tokenizer = make_tiny_tokenizer()
    examples = [{"text": text, "text_pair": None, "where": text} for text in ("the cat", "a dog")]
    encoded = encode(tokenizer, examples, "classification", 16)
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2, vocab_size=tokenizer.vocab_size)).eval()
    switches = []
    model.train = lambda mode=True: switches.append(mode)  # noqa: E731  (a spy on every mode switch)
    predict_logits(model, encoded, 2, torch.device("cpu"))
    assert switches == []
    del model.train
    model.train()
    logits = predict_logits(model, encoded, 2, torch.device("cpu"))
    assert model.training and len(logits) == 2


def test_regression_predictions_are_not_rounded_by_bf16_autocast(tiny_config, randomize):
    """A regression head's output is its prediction: under bf16 autocast close predictions merged (24 distinct
    values became 2 in a review, a dev Pearson of -0.39 became 0); they are computed in fp32. A classifier's logits
    still come from autocast."""
    from fastmini import FastMiniForSequenceClassification
    from fastmini.finetune.inference import predict_logits

    tokenizer = make_tiny_tokenizer()
    examples = [{"text": f"the cat {word}", "text_pair": None, "where": word} for word in ("sat", "ran", "a", "dog")]
    encoded = encode(tokenizer, examples, "regression", 16)
    # no problem_type, as an STS-B model fine-tuned elsewhere has: predict reads num_labels == 1 as regression
    config = tiny_config(num_labels=1, vocab_size=tokenizer.vocab_size)
    regression = randomize(FastMiniForSequenceClassification(config), 0.2).eval()
    cpu = torch.device("cpu")
    fp32 = torch.stack(predict_logits(regression, encoded, 2, cpu))
    assert torch.equal(torch.stack(predict_logits(regression, encoded, 2, cpu, torch.bfloat16)), fp32)
    classifier_config = tiny_config(num_labels=2, vocab_size=tokenizer.vocab_size)
    classifier = randomize(FastMiniForSequenceClassification(classifier_config), 0.2).eval()
    classified = encode(tokenizer, examples, "classification", 16)
    rounded = torch.stack(predict_logits(classifier, classified, 2, cpu, torch.bfloat16))
    assert torch.equal(rounded, rounded.bfloat16().float())  # autocast's bf16, as before
