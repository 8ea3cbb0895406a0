"""``python -m fastmini.predict``, and fine-tuned outputs inside transformers' ``pipeline``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_text_file_predictions_match_the_trainers_own(classifier, tmp_path):
    reference = read_jsonl(classifier / "predictions_validation.jsonl")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(r["text"] for r in reference) + "\n\n")
    output = tmp_path / "predicted.jsonl"
    assert main(["--model", str(classifier), "--input", str(texts), "--output", str(output), "--batch-size", "5"]) == 0
    predicted = read_jsonl(output)
    assert [p["index"] for p in predicted] == list(range(len(reference)))  # input order, blank line skipped
    assert [p["prediction"] for p in predicted] == [r["prediction"] for r in reference]
    for p, r in zip(predicted, reference, strict=True):
        assert p["score"] == pytest.approx(r["score"], abs=1e-5) and p["text"] == r["text"]


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

    tag = pipeline("token-classification", model=str(tagger), device="cpu")
    entities = tag("the big cat and a bread")
    assert {e["entity"] for e in entities} <= {"B-ANIMAL", "I-ANIMAL", "B-FOOD"} and entities


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
    conll = tmp_path / "test.tsv"
    conll.write_text("the\tO\ncat\tB-ANIMAL\n\nbread\tB-FOOD\n")
    assert main(["--model", str(tagger), "--input", str(conll), "--output", str(output)]) == 0
    assert [r["tokens"] for r in read_jsonl(output)] == [["the", "cat"], ["bread"]]


def error_of(argv: list[str], capsys) -> str:
    return cli_error(main, argv, capsys)


def test_bad_input(classifier, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("good film\n")
    line = error_of(["--model", str(classifier / "runs"), "--input", str(texts)], capsys)
    assert "no config.json" in line
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


def test_module_runs_from_the_repository_root(classifier, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a great film\n")
    result = subprocess.run([sys.executable, "-m", "fastmini.predict", "--model", str(classifier), "--input",
                             str(texts)], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["prediction"] in ("neg", "pos")
