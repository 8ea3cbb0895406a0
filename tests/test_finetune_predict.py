"""``python -m fastmini.predict``, and fine-tuned outputs inside transformers' ``pipeline``."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmini import predict
from fastmini.finetune.__main__ import main as finetune
from fastmini.finetune.testing import make_tiny_model, write_table, write_task_data
from fastmini.predict import main
from fastmini.training.testing import cli_error

REPO = Path(__file__).resolve().parents[1]


def fine_tuned(root: Path, kind: str, *extra: str) -> Path:
    model = make_tiny_model(root / "model")
    data = write_task_data(root / "data", kind, ".jsonl" if kind == "multilabel" else ".csv", train=96)
    output = root / "out"
    with pytest.MonkeyPatch.context() as patch:  # module scope runs before conftest's backend fixture
        patch.setenv("FASTMINI_BACKEND", "torch")
        threads = torch.get_num_threads()
        assert finetune(["--model", str(model), "--data", str(data), "--output-dir", str(output), "--lr", "5e-3",
                         "--seed", "1", "--epochs", "8", "--batch-size", "8", "--no-progress", "--threads", "1",
                         *extra]) == 0  # fmt: skip
        torch.set_num_threads(threads)
    return output


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return fine_tuned(tmp_path_factory.mktemp("classifier"), "classification")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return fine_tuned(tmp_path_factory.mktemp("tagger"), "ner", "--task", "ner", "--schedule", "linear")


def read_jsonl(path: Path) -> list[dict]:
    # Not splitlines: records may hold U+2028 and other characters that it takes for line ends.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_text_file_predictions_match_the_trainers_own(classifier, tmp_path):
    reference = read_jsonl(classifier / "predictions_validation.jsonl")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(r["text"] for r in reference) + "\n\n")
    output = tmp_path / "predicted.jsonl"
    assert main(["--model", str(classifier), "--input", str(texts), "--output", str(output), "--batch-size", "5"]) == 0
    predicted = read_jsonl(output)
    assert [p["index"] for p in predicted] == list(range(len(reference) + 1))  # one per line, the blank one too
    assert predicted.pop() == {"index": len(reference), "text": "", "prediction": None}
    assert [p["prediction"] for p in predicted] == [r["prediction"] for r in reference]
    for p, r in zip(predicted, reference, strict=True):
        assert p["score"] == pytest.approx(r["score"], abs=1e-5) and p["text"] == r["text"]


def test_a_16_bit_model_predicts_in_fp32_weights_unless_bf16_is_asked_for(classifier, tmp_path):
    """--precision fp32 (and auto on a CPU) runs fp32 weights whatever dtype the model was saved in; bf16 is autocast
    over them (a bf16-saved model ran in bf16, an fp16 one in fp16 even under --precision bf16)."""
    from fastmini import FastMiniForSequenceClassification

    saved = tmp_path / "model"
    shutil.copytree(classifier, saved)
    FastMiniForSequenceClassification.from_pretrained(classifier).to(torch.float16).save_pretrained(saved)
    for precision, autocast in (("fp32", None), ("auto", None), ("bf16", torch.bfloat16)):
        predictor = predict.Predictor(str(saved), "cpu", precision)
        assert {p.dtype for p in predictor.model.parameters()} == {torch.float32}, precision
        assert predictor.autocast_dtype == autocast


def test_jsonl_and_csv_batches(classifier, tmp_path):
    rows = [{"id": 1, "review": "a very good film"}, {"id": 2, "review": "an awful and dull plot"}]
    for suffix in (".jsonl", ".csv"):
        source = write_table(tmp_path / f"batch{suffix}", rows)
        output = tmp_path / f"out{suffix}.jsonl"
        assert main(["--model", str(classifier), "--input", str(source), "--output", str(output),
                     "--text-column", "review"]) == 0  # fmt: skip
        predicted = read_jsonl(output)
        assert [p["text"] for p in predicted] == [r["review"] for r in rows]
        assert [p["prediction"] for p in predicted] == ["pos", "neg"]  # the synthetic task was learned


def test_pipelines_agree_with_predict(classifier, tagger, tmp_path, capsys):
    from transformers import pipeline

    texts = ["a very good film", "an awful and dull plot", "the story is fine"]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    assert main(["--model", str(classifier), "--input", str(tmp_path / "t.txt")]) == 0  # to stdout
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    classify = pipeline("text-classification", model=str(classifier), device="cpu")
    results = classify(texts)
    assert [r["label"] for r in results] == [p["prediction"] for p in predicted]
    assert [r["score"] for r in results] == pytest.approx([p["score"] for p in predicted], abs=1e-5)

    sentence = "the big cats and a bread"
    (tmp_path / "s.txt").write_text(sentence + "\n")
    assert main(["--model", str(tagger), "--input", str(tmp_path / "s.txt")]) == 0
    (tagged,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tag = pipeline("token-classification", model=str(tagger), device="cpu", ignore_labels=[])
    sub_tokens = tag(sentence)  # one result per sub-token, "O" included; a word's first has no "##"
    first_of_each_word = [t["entity"] for t in sub_tokens if not t["word"].startswith("##")]
    assert len(sub_tokens) > len(first_of_each_word)  # "cats" is two sub-tokens: the alignment is exercised
    assert first_of_each_word == tagged["tags"] and len(tagged["tags"]) == len(sentence.split())
    assert set(tagged["tags"]) - {"O"}  # the tagger learned something: not all "O"


def test_the_saved_tokenizer_truncates_to_the_models_positions(classifier, tmp_path):
    """The source tokenizer carries no limit of its own: pipelines' truncation=True must still cut to the
    model's positions rather than hand it a sequence it refuses."""
    from transformers import AutoTokenizer, pipeline

    positions = json.loads((classifier / "config.json").read_text())["max_position_embeddings"]
    assert AutoTokenizer.from_pretrained(classifier).model_max_length == positions
    (result,) = pipeline("text-classification", model=str(classifier), device="cpu")(
        "a very good film " * positions, truncation=True
    )
    assert result["label"] in ("pos", "neg")


def test_a_diverged_model_writes_null_not_nan(classifier, tmp_path):
    """NaN is not JSON: strict parsers (jq, JavaScript) refuse the bare NaN that json.dumps would write."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(classifier, broken, ignore=shutil.ignore_patterns("runs"))
    weights = load_file(str(broken / "model.safetensors"))
    weights["classifier.bias"] = torch.full_like(weights["classifier.bias"], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "t.txt").write_text("a very good film\n")
    output = tmp_path / "out.jsonl"
    assert main(["--model", str(broken), "--input", str(tmp_path / "t.txt"), "--output", str(output)]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    (record,) = [json.loads(line, parse_constant=refuse) for line in output.read_text().splitlines()]
    assert record["score"] is None


def test_a_tagger_whose_labels_are_not_bio_tags_gives_tags_and_no_entities(tmp_path, capsys):
    """A token classifier from elsewhere, labelled "PER"/"LOC": reading entities off its tags would invent
    them (type "ER" from "PER")."""
    from transformers import AlbertConfig, AlbertForTokenClassification

    from fastmini.finetune.testing import make_tiny_tokenizer

    names = {0: "O", 1: "PER", 2: "LOC"}
    config = AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=64, num_labels=3, id2label=names,
                          label2id={name: index for index, name in names.items()})  # fmt: skip
    model_dir = tmp_path / "albert-tagger"
    torch.manual_seed(0)
    AlbertForTokenClassification(config).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "s.txt").write_text("the big cat and a dog\n\n")
    output = tmp_path / "out.jsonl"
    assert main(["--model", str(model_dir), "--input", str(tmp_path / "s.txt"), "--output", str(output)]) == 0
    assert "are not BIO tags" in capsys.readouterr().err
    tagged, empty = read_jsonl(output)
    assert len(tagged["tags"]) == 6 and set(tagged["tags"]) <= set(names.values())
    assert tagged["entities"] is None and empty["entities"] is None


def test_tagger_predictions_and_entities(tagger, tmp_path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("the big cat is a film\ncats and bread\n")
    output = tmp_path / "tags.jsonl"
    assert main(["--model", str(tagger), "--input", str(sentences), "--output", str(output)]) == 0
    first, second = read_jsonl(output)
    assert first["tokens"] == ["the", "big", "cat", "is", "a", "film"] and len(first["tags"]) == 6
    assert len(second["tags"]) == 3  # "cats" is two sub-tokens, one word, one tag
    from fastmini.finetune.metrics import entities

    for record in (first, second):
        assert set(record["tags"]) <= {"O", "B-ANIMAL", "I-ANIMAL", "B-FOOD"}
        spans = [(e["type"], e["start"], e["end"] - 1) for e in record["entities"]]
        assert spans == entities(record["tags"])
        assert all(e["text"] == " ".join(record["tokens"][e["start"] : e["end"]]) for e in record["entities"])
    assert first["entities"], first  # the tagger learned something: "big cat" holds an entity
    jsonl = write_table(tmp_path / "words.jsonl", [{"tokens": ["a", "dog"]}, {"text": "apple pie"}])
    assert main(["--model", str(tagger), "--input", str(jsonl), "--output", str(output)]) == 0
    assert [r["tokens"] for r in read_jsonl(output)] == [["a", "dog"], ["apple", "pie"]]
    for name in ("test.tsv", "test.txt"):  # .txt as the fine-tuner reads it: two columns when it has tabs
        conll = tmp_path / name
        conll.write_text("the\tO\ncat\tB-ANIMAL\n\nbread\tB-FOOD\n")
        assert main(["--model", str(tagger), "--input", str(conll), "--output", str(output)]) == 0
        assert [r["tokens"] for r in read_jsonl(output)] == [["the", "cat"], ["bread"]]


def test_a_tagger_says_which_sentences_it_cut(tagger, tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    # the third: a word the tokenizer turns into nothing (a soft hyphen) has no position, but nothing was cut
    sentences.write_text(" ".join(["cat"] * 40) + "\nthe big cat\nthe \u00ad cat\n", encoding="utf-8")
    output = tmp_path / "tags.jsonl"
    # the CLI's logger prints to stderr and does not propagate (caplog saw it only after other tests had run)
    assert main(["--model", str(tagger), "--input", str(sentences), "--output", str(output), "--max-length", "16"]) == 0
    long, short, soft_hyphen = read_jsonl(output)
    assert long["truncated"] is True and len(long["tags"]) == 40 and "truncated" not in short
    assert len(soft_hyphen["tags"]) == 3 and "truncated" not in soft_hyphen
    assert "1 sentence(s) had more words than 16 tokens hold" in capsys.readouterr().err


def test_a_classifier_says_which_inputs_it_cut(classifier, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text(" ".join(["good"] * 40) + "\na good film\n")
    output = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["--model", str(classifier), "--input", str(texts), "--output", str(output), "--max-length", "16"]) == 0
    long, short = read_jsonl(output)
    assert long["truncated"] is True and "truncated" not in short and long["prediction"] is not None
    err = capsys.readouterr().err
    assert "1 input(s) were longer than 16 tokens: predicted from their start" in err
    assert "--max-length up to the model's 64 positions reads more" in err
    texts.write_text(" ".join(["good"] * 80) + "\n")
    assert main(["--model", str(classifier), "--input", str(texts), "--output", str(output), "--max-length", "64"]) == 0
    err = capsys.readouterr().err  # at the model's positions, no advice to read more
    assert "1 input(s) were longer than 64 tokens: predicted from their start" in err
    assert "--max-length up to" not in err and "the model reads no more than its 64 positions" in err


def error_of(argv: list[str], capsys) -> str:
    return cli_error(main, argv, capsys)


def test_bad_input(classifier, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n")
    line = error_of(["--model", str(classifier / "runs"), "--input", str(texts)], capsys)
    assert "no config.json" in line
    line = error_of(["--model", str(tmp_path / "nowhere"), "--input", str(texts)], capsys)
    assert "nowhere: no such directory" in line
    assert "a file, not a directory" in error_of(["--model", str(texts), "--input", str(texts)], capsys)
    tokenizerless = tmp_path / "tokenizerless"
    shutil.copytree(classifier, tokenizerless)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tokenizerless / name).unlink(missing_ok=True)
    line = error_of(["--model", str(tokenizerless), "--input", str(texts)], capsys)
    assert "no usable tokenizer in the directory (tokenizer files missing?" in line and "\n" not in line.strip()
    masked_lm = make_tiny_model(tmp_path / "mlm")
    line = error_of(["--model", str(masked_lm), "--input", str(texts)], capsys)
    assert "FastMiniForMaskedLM, not a fine-tuned classifier" in line
    (tmp_path / "empty.txt").write_text("\n")
    assert "no text" in error_of(["--model", str(classifier), "--input", str(tmp_path / "empty.txt")], capsys)
    assert "no such file" in error_of(["--model", str(classifier), "--input", str(tmp_path / "none.txt")], capsys)
    line = error_of(["--model", str(classifier), "--input", str(texts), "--output", str(texts / "x.jsonl")], capsys)
    assert "--output" in line and "cannot be written" in line
    source = write_table(tmp_path / "b.csv", [{"review": "good"}])
    line = error_of(["--model", str(classifier), "--input", str(source)], capsys)
    assert "no column 'text'" in line and "review" in line
    assert "a directory; give one file" in error_of(["--model", str(classifier), "--input", str(tmp_path)], capsys)
    (tmp_path / "t.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    line = error_of(["--model", str(classifier), "--input", str(tmp_path / "t.jsonl.gz")], capsys)
    assert "unsupported file type '.gz'" in line and "decompress it first" in line
    for threads in ("0", "-1"):
        line = error_of(["--model", str(classifier), "--input", str(texts), "--threads", threads], capsys)
        assert f"--threads must be > 0, got {threads}" in line


def test_one_record_per_input_line_with_its_index(classifier, tmp_path, monkeypatch, capsys):
    lines = ["a good film", "", "odd \u2028 separators \x0c and \u0085 inside", "   ", "an awful plot"]
    texts = tmp_path / "t.txt"
    texts.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    output = tmp_path / "out.jsonl"
    assert main(["--model", str(classifier), "--input", str(texts), "--output", str(output)]) == 0
    predicted = read_jsonl(output)
    assert [(p["index"], p["text"]) for p in predicted] == list(enumerate(line.strip() for line in lines))
    assert [p["prediction"] is None for p in predicted] == [False, True, False, True, False]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode())))
    assert main(["--model", str(classifier), "--input", "-"]) == 0
    assert capsys.readouterr().out == output.read_text(encoding="utf-8")
    # old Mac line ends (CR alone): lines, as a file's universal newlines read them (stdin gave one example)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\r".join(lines).encode())))
    assert main(["--model", str(classifier), "--input", "-"]) == 0
    assert capsys.readouterr().out == output.read_text(encoding="utf-8")
    rows = tmp_path / "rows.csv"
    rows.write_text("id,text\n1,a good film\n,\n3,\n4,an awful plot\n")
    assert main(["--model", str(classifier), "--input", str(rows), "--output", str(output)]) == 0
    predicted = read_jsonl(output)
    assert [p["index"] for p in predicted] == [0, 1, 2, 3]  # empty rows keep their place
    assert [p["prediction"] is None for p in predicted] == [False, True, True, False]
    one_column = tmp_path / "one.csv"
    one_column.write_text("text\ngood\n\nbad\n")  # a blank line is an empty cell
    assert main(["--model", str(classifier), "--input", str(one_column), "--output", str(output)]) == 0
    assert [p["text"] for p in read_jsonl(output)] == ["good", "", "bad"]
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "a good film"}\n{"text": null}\n{"text": "an awful plot"}\n')  # null: as an empty cell
    assert main(["--model", str(classifier), "--input", str(records), "--output", str(output)]) == 0
    assert [p["prediction"] is None for p in read_jsonl(output)] == [False, True, False]


def test_tagger_input_is_read_like_the_classifiers(tagger, tmp_path, capsys):
    output = tmp_path / "tags.jsonl"
    jsonl = tmp_path / "words.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf' + json.dumps({"text": "a big\u2028cat"}, ensure_ascii=False).encode() + b"\n"
                      + b'{"tokens": []}\n')  # fmt: skip
    assert main(["--model", str(tagger), "--input", str(jsonl), "--output", str(output)]) == 0
    first, empty = read_jsonl(output)
    assert first["tokens"] == ["a", "big", "cat"] and len(first["tags"]) == 3  # U+2028 is a space between words
    assert empty == {"index": 1, "tokens": [], "tags": [], "entities": []}
    jsonl.write_text('{"tokens": ["a"]}\n{"tokens": ["a",\n')
    assert "words.jsonl, line 2: not valid JSON" in error_of(["--model", str(tagger), "--input", str(jsonl)], capsys)
    jsonl.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    assert "words.jsonl: not UTF-8 text" in error_of(["--model", str(tagger), "--input", str(jsonl)], capsys)
    array = tmp_path / "words.json"
    array.write_text('[{"tokens": ["a"]}, 3]')
    assert "words.json, item 1: expected a JSON object" in error_of(["--model", str(tagger), "--input", str(array)],
                                                                    capsys)  # fmt: skip
    words = tmp_path / "nulls.jsonl"
    words.write_text('{"tokens": ["big", null, "dog"]}\n')  # null became the word "None"
    line = error_of(["--model", str(tagger), "--input", str(words)], capsys)
    assert "nulls.jsonl, line 1: every item of 'tokens' must be a word (a string)" in line
    for name, text in (("spaced.txt", "big B-X\ndog I-X\n\nthe O\ncat B-X\n"),  # as the fine-tuner reads .txt
                       ("docstart.txt", "-DOCSTART- O\n\nbig\tB-X\ndog\tI-X\n\nthe\tO\ncat\tB-X\n")):  # fmt: skip
        columns = tmp_path / name
        columns.write_text(text)
        assert main(["--model", str(tagger), "--input", str(columns), "--output", str(output)]) == 0
        assert [r["tokens"] for r in read_jsonl(output)] == [["big", "dog"], ["the", "cat"]], name
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Plan B\nthe big cat\n")  # one sentence a line: "B" alone is no tag of a tag file
    assert main(["--model", str(tagger), "--input", str(sentences), "--output", str(output)]) == 0
    assert [r["tokens"] for r in read_jsonl(output)] == [["Plan", "B"], ["the", "big", "cat"]]
    unlabelled = tmp_path / "test.tsv"  # the two-column format without its tags: one token per line
    unlabelled.write_text("the\nbig\ncat\n\nbread\n")
    assert main(["--model", str(tagger), "--input", str(unlabelled), "--output", str(output)]) == 0
    assert [r["tokens"] for r in read_jsonl(output)] == [["the", "big", "cat"], ["bread"]]


@pytest.mark.parametrize(
    ("value", "message"),
    [("1000", "--max-length 1000 exceeds the model's 64 positions"), ("-3", "at least 8 tokens, got -3"),
     ("0", "at least 8 tokens, got 0"), ("2", "at least 8 tokens, got 2")],
)  # fmt: skip
def test_max_length_is_checked_as_finetune_checks_it(classifier, tmp_path, capsys, value, message):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n")
    assert message in error_of(["--model", str(classifier), "--input", str(texts), "--max-length", value], capsys)


def test_long_texts_are_cut_where_the_fine_tuning_cut_them(tmp_path):
    """By default predict cuts a text to the length the model was fine-tuned with, so that it gives the fine-tuning's
    own predictions (and dev metric); --max-length still wins, and a model from elsewhere gets its positions."""
    from transformers import AutoTokenizer

    model = fine_tuned(tmp_path / "job", "classification", "--max-length", "8")
    saved = json.loads((model / "config.json").read_text())
    assert saved["finetuned_max_length"] == 8 and saved["max_position_embeddings"] == 64
    reference = read_jsonl(model / "predictions_validation.jsonl")  # scored with 8 tokens per text
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert any(len(tokenizer(r["text"])["input_ids"]) > 8 for r in reference)  # some texts are cut
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(r["text"] for r in reference) + "\n")

    def scores(directory: Path, *flags: str) -> list[float]:
        output = tmp_path / "out.jsonl"
        assert main(["--model", str(directory), "--input", str(texts), "--output", str(output), *flags]) == 0
        return [r["score"] for r in read_jsonl(output)]

    fine_tuning_scores = [r["score"] for r in reference]
    assert scores(model) == pytest.approx(fine_tuning_scores, abs=1e-5)
    whole_texts = scores(model, "--max-length", "64")
    assert max(abs(a - b) for a, b in zip(whole_texts, fine_tuning_scores, strict=True)) > 1e-4  # the flag wins
    older = Path(shutil.copytree(model, tmp_path / "older", ignore=shutil.ignore_patterns("runs")))
    del saved["finetuned_max_length"]  # fine-tuned before config.json recorded it: metrics.json says
    (older / "config.json").write_text(json.dumps(saved))
    assert scores(older) == pytest.approx(fine_tuning_scores, abs=1e-5)
    (older / "metrics.json").unlink()  # a model from elsewhere: its positions
    assert scores(older) == pytest.approx(whole_texts, abs=1e-6)


@pytest.mark.parametrize("device", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_bad_device_is_reported_before_the_model_is_loaded(device, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n")
    # A model directory that does not exist: the device is checked first, so its message is the one.
    line = error_of(["--model", str(tmp_path / "no-model"), "--input", str(texts), "--device", device], capsys)
    assert f"--device {device}: " in line and "--model" not in line


def test_a_failed_run_leaves_an_existing_output_file_as_it_was(classifier, tmp_path, monkeypatch):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\nbad film\ndull plot\n")
    output = tmp_path / "out.jsonl"
    output.write_text("earlier results\n")
    calls = []

    def fail_on_the_second_chunk(self, examples, batch_size, max_length):
        calls.append(len(examples))
        if len(calls) == 2:
            raise RuntimeError("crash half-way")
        return original(self, examples, batch_size, max_length)

    original = predict.Predictor._predict
    monkeypatch.setattr(predict, "CHUNK", 2)
    monkeypatch.setattr(predict.Predictor, "_predict", fail_on_the_second_chunk)
    with pytest.raises(RuntimeError, match="crash half-way"):
        main(["--model", str(classifier), "--input", str(texts), "--output", str(output)])
    assert output.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "t.txt"]  # no temporary file left behind
    monkeypatch.setattr(predict.Predictor, "_predict", original)
    assert main(["--model", str(classifier), "--input", str(texts), "--output", str(output)]) == 0
    assert [r["text"] for r in read_jsonl(output)] == ["good film", "bad film", "dull plot"]
    assert output.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # a usual file, not mkstemp's private one


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_broken_config_json_is_named_before_the_tokenizer(classifier, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n")
    broken = Path(shutil.copytree(classifier, tmp_path / "junk", ignore=shutil.ignore_patterns("runs")))
    for content in (b"{not json", b'{"architectures": ["caf\xe9"]}', b"[1, 2]"):
        (broken / "config.json").write_bytes(content)
        line = error_of(["--model", str(broken), "--input", str(texts)], capsys)
        assert "config.json" in line and "tokenizer" not in line


def test_a_sentence_pair_model_given_single_texts_warns_once(classifier, tmp_path, capsys):
    saved = json.loads((classifier / "config.json").read_text())
    assert "finetuned_text_pair_column" in saved and saved["finetuned_text_pair_column"] is None  # recorded
    texts = tmp_path / "t.txt"
    texts.write_text("good film\nbad film\n")
    assert main(["--model", str(classifier), "--input", str(texts)]) == 0
    assert "pairs" not in capsys.readouterr().err
    pair_model = Path(shutil.copytree(classifier, tmp_path / "pairs", ignore=shutil.ignore_patterns("runs")))
    (pair_model / "config.json").write_text(json.dumps({**saved, "finetuned_text_pair_column": "hypothesis"}))
    assert main(["--model", str(pair_model), "--input", str(texts)]) == 0
    err = capsys.readouterr().err
    assert err.count("fine-tuned on sentence pairs (second text: column 'hypothesis')") == 1, err
    rows = write_table(tmp_path / "pairs.jsonl", [{"text": "a film", "hypothesis": "good"}])
    assert main(["--model", str(pair_model), "--input", str(rows), "--text-pair-column", "hypothesis"]) == 0
    assert "pairs" not in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly(classifier, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a very good film and a great story\n" * 3000)  # far more than a pipe buffer holds
    process = subprocess.Popen([sys.executable, "-m", "fastmini.predict", "--model", str(classifier), "--input",
                                str(texts)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert json.loads(process.stdout.readline())["index"] == 0  # like `| head -1`
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_module_runs_from_the_repository_root(classifier, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a great film\n")
    result = subprocess.run([sys.executable, "-m", "fastmini.predict", "--model", str(classifier), "--input",
                             str(texts)], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["prediction"] in ("neg", "pos")
