"""``python -m fastmini.distill``: options, config files, recipes, bad input, outputs.

Runs in-process through ``main(argv)`` on a tiny random BERT teacher (vocab 99, H 36, 4 layers)
and its tiny corpus; one test starts the real module in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmini.distill import config as distill_config
from fastmini.distill.__main__ import main
from fastmini.distill.config import FIELDS, RECIPES, DistillConfig, build_parser, resolve, resolve_layer_map
from fastmini.distill.testing import make_tiny_teacher, tiny_args
from fastmini.training.errors import UsageError
from fastmini.training.testing import cli_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def encoder_teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("encoder"), masked_lm=False)


def error_of(argv: list[str], capsys) -> str:
    return cli_error(main, argv, capsys)


# ---- options ---------------------------------------------------------------------------------------


def test_help_explains_every_option():
    text = build_parser().format_help()
    for name in FIELDS:
        assert distill_config.flag_of(name) in text, name
    for flag in (
        "--output-dir",
        "--max-steps",
        "--save-every",
        "--resume",
        "--teacher",
        "--data",
        "--seed",
        "--config",
        "--keep-last",
        "--hidden-projection",
        "--layer-map",
        "--grad-accumulation",
    ):
        assert flag in text
    assert all(FIELDS[name].metadata["help"] for name in FIELDS)


def test_module_help_runs_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "fastmini.distill", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--output-dir" in result.stdout and "minialbert-128" in result.stdout


def test_config_file_then_command_line_overrides(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.001\nwindow-length: 96\nlayer_map: [1, 2, 3]\nadapters: false\nmax_steps: null\n")
    config, _ = resolve(["--config", str(yaml_file), "--lr", "0.002", "--recursions", "3"])
    assert (config.lr, config.window_length, config.layer_map, config.adapters) == (0.002, 96, "1,2,3", False)
    assert config.max_steps is None and config.recursions == 3
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"seed": 7, "hidden_weight": 0.5}))
    config, _ = resolve(["--config", str(json_file)])
    assert config.seed == 7 and config.loss_weights.hidden == 0.5 and config.loss_weights.output == 5.0


def test_published_recipe_is_spec_md():
    config, _ = resolve(["--config", "minialbert-128"])
    assert (config.window_length, config.window_stride, config.max_windows) == (256, 128, 10)
    assert (config.lr, config.warmup_steps, config.weight_decay, config.batch_size) == (5e-4, 5000, 1e-4, 192)
    assert (config.mlm_weight, config.attention_weight, config.hidden_weight, config.output_weight) == (1, 3, 3, 5)
    assert (config.temperature, config.mask_probability, config.epochs, config.max_steps) == (1.0, 0.15, 1.0, None)
    assert config.teacher == "bert-base-uncased" and config.save_every == 2500
    assert RECIPES["minialbert-312"]["embedding_size"] == 312


def test_layer_map_stride_auto_and_explicit():
    assert resolve_layer_map("auto", 12, 6) == (2, 4, 6, 8, 10, 12)  # SPEC: teacher layers 2, 4, ..., 12
    assert resolve_layer_map("auto", 6, 6) == (1, 2, 3, 4, 5, 6)
    assert resolve_layer_map("3", 12, 4) == (3, 6, 9, 12)
    assert resolve_layer_map("1,1,5", 6, 3) == (1, 1, 5)
    for spec, teacher_layers, recursions, message in (
        ("auto", 12, 5, "not a multiple"),
        ("3", 12, 6, "does not exist"),
        ("1,2", 6, 3, "one teacher layer per recursion"),
        ("0,1,2", 6, 3, "1-based"),
    ):
        with pytest.raises(UsageError, match=message):
            resolve_layer_map(spec, teacher_layers, recursions)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be > 0"),
        (["--window-stride", "128"], "--window-stride .* must be smaller than --window-length"),
        (["--mask-probability", "1.5"], r"--mask-probability must be in \[0, 1\]"),
        (["--layer-map", "a,b"], "--layer-map must be"),
        (["--dropout", "1"], "--dropout"),
        (["--seed", str(-(2**63) - 1)], "torch.manual_seed's range"),
        (["--mask-fraction", "0.9", "--random-fraction", "0.2"], "must be <= 1"),
        (
            ["--mlm-weight", "0", "--attention-weight", "0", "--hidden-weight", "0", "--output-weight", "0"],
            "every loss weight is 0",
        ),
        (["--config", "no-such-recipe"], "no such file, and not a recipe"),
        (["--weight-decay", "nan"], "--weight-decay must be >= 0, got nan"),
        (["--max-grad-norm", "inf"], "--max-grad-norm must be >= 0, got inf"),
        (["--hidden-weight", "nan"], "--hidden-weight must be >= 0, got nan"),
        (
            ["--epochs", "3"],
            "--epochs counts only with --max-steps none .*--max-steps 200.*--max-steps none --epochs 3",
        ),
        (["--threads", "-1"], "--threads must be > 0, got -1"),
        (["--threads", "0"], "--threads must be > 0, got 0"),
        (["--tokenize-workers", "-2"], "--tokenize-workers must be > 0, got -2"),
        (["--resume", "--overwrite-output-dir"], "--resume .* --overwrite-output-dir .*: give one of them"),
        (
            ["--compile-student", "--gradient-checkpointing"],
            "--compile-student and --gradient-checkpointing do not combine yet: give one of them",
        ),
        (
            ["--graph-teacher", "--device", "cpu"],
            r"--graph-teacher records CUDA graphs: it needs a GPU \(this run is on cpu\)",
        ),
    ],
)
def test_nonsense_values_give_one_clear_message(argv, message, capsys, tmp_path):
    # A teacher that does not exist: a value that slipped through validation fails fast on it, not after a run.
    argv = [*argv, "--teacher", str(tmp_path / "no-teacher"), "--output-dir", str(tmp_path / "out")]
    assert __import__("re").search(message, error_of(argv, capsys))
    assert not (tmp_path / "out").exists()


def test_bad_config_files(tmp_path, capsys):
    unknown = tmp_path / "u.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    assert "unknown option 'learning_rate'" in error_of(["--config", str(unknown)], capsys)
    wrong = tmp_path / "w.yaml"
    wrong.write_text("batch_size: [1, 2]\n")
    assert "batch_size has the wrong type" in error_of(["--config", str(wrong)], capsys)
    broken = tmp_path / "b.json"
    broken.write_text("{not json")
    assert "not valid JSON" in error_of(["--config", str(broken)], capsys)


def test_config_files_read_text_with_the_options_own_parsers(tmp_path, capsys):
    """'none' for an optional number as on the command line; errors in words, not Python types."""
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: none\nmax_windows: 'null'\nhidden_size: none\nlr: 5e-4\n")
    config, _ = resolve(["--config", str(yaml_file)])
    assert (config.max_steps, config.max_windows, config.hidden_size, config.lr) == (None, None, None, 5e-4)
    for text, message in (
        ("max_steps: abc\n", "max_steps: expected an integer or 'none', got 'abc'"),
        ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ):
        yaml_file.write_text(text)
        line = error_of(["--config", str(yaml_file)], capsys)
        assert message in line and "| None" not in line and "float" not in line


def test_broken_config_files_give_one_line_naming_the_line(tmp_path, capsys):
    broken = tmp_path / "b.yaml"
    broken.write_text("lr: 0.1\nseed: [1, 2\nmax_steps: 3\n")
    capsys.readouterr()
    assert main(["--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not valid YAML at line" in err, err
    upper = tmp_path / "RUN.JSON"
    upper.write_text('{"seed": 7}')
    assert resolve(["--config", str(upper)])[0].seed == 7
    upper.write_text("{broken")
    assert "not valid JSON at line 1" in error_of(["--config", str(upper)], capsys)


def test_print_config_shows_the_resolved_options(capsys):
    assert main(["--config", "minialbert-128", "--seed", "3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["window_length"] == 256 and printed.keys() == FIELDS.keys()


def test_window_stride_that_leaves_no_room_for_the_special_tokens(teacher_dir, tmp_path, capsys):
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--window-length", "8", "--window-stride", "6"], capsys)
    assert "--window-stride" in line and "special tokens" in line


def test_argparse_type_errors_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--max-steps", "many"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "--max-steps: expected an integer or 'none', got 'many'" in err
    assert "optional_int" not in err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_the_command_line_speaks_from_rank_0_alone(rank, monkeypatch, capsys):
    """Every rank parses the same command line: --print-config wrote one JSON object a process to one stdout, and
    argparse's errors came once a process."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--seed", "3", "--print-config"]) == 0
    with pytest.raises(SystemExit) as raised:
        main(["--max-steps", "many"])
    captured = capsys.readouterr()
    assert raised.value.code == 2
    if rank == "0":
        assert json.loads(captured.out)["seed"] == 3 and "--max-steps: expected an integer" in captured.err
    else:
        assert captured.out == "" and captured.err == ""


def test_student_config_errors_name_the_options(teacher_dir, tmp_path, capsys):
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--reduction-factor", "5"], capsys)
    assert "must be divisible by --reduction-factor (5)" in line and "reduction_factor" not in line


# ---- bad input -------------------------------------------------------------------------------------


def test_missing_teacher(tmp_path, capsys):
    line = error_of(tiny_args(tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert "--teacher" in line and "no such directory" in line  # the teacher is checked before the data
    line = error_of(["--teacher", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")], capsys)
    assert "--teacher" in line and "no such directory" in line
    (tmp_path / "empty").mkdir()
    line = error_of(["--teacher", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")], capsys)
    assert "no config.json" in line


def test_empty_or_unreadable_data(teacher_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--data", str(empty)], capsys)
    assert str(empty) in line and "no text found" in line
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("w1 w2\nw3\nw4\nw5 w6\n")
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out2"), "--data", str(tiny)], capsys)
    assert "fewer than one global batch" in line
    invisible = tmp_path / "invisible.txt"  # survives strip(), tokenises to nothing
    invisible.write_text("\u200b\n" * 40 + "\x00\x01\n" * 10, encoding="utf-8")
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out3"), "--data", str(invisible)], capsys)
    assert "no training windows: every training document tokenises to special tokens only" in line
    assert not (tmp_path / "out3").exists()
    unknown = tmp_path / "unknown.txt"  # words outside the tiny vocabulary: [UNK] only
    unknown.write_text("zzzzzzz qqqqq\n" * 40, encoding="utf-8")
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out4"), "--data", str(unknown)], capsys)
    assert "special tokens only" in line and "[UNK]" in line


@pytest.mark.parametrize("device", ["tpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_device_is_one_message_in_both_trainers_before_the_output_dir_exists(device, tmp_path, capsys):
    from fastmini.finetune.__main__ import main as finetune_main

    expected = "no CUDA device is available here" if device == "cuda" else "expected auto, cpu, cuda or cuda:N"
    for cli in (main, finetune_main):
        line = cli_error(cli, ["--device", device, "--output-dir", str(tmp_path / "out")], capsys)
        assert f"--device {device}: {expected}" in line
    assert not (tmp_path / "out").exists()


def test_corrupt_or_mismatched_weights_name_the_directory(teacher_dir, tmp_path, capsys):
    import shutil

    truncated = shutil.copytree(teacher_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = error_of([*tiny_args(teacher_dir, tmp_path / "o1"), "--teacher", str(truncated)], capsys)
    assert f"--teacher {truncated}: cannot load its weights" in line
    line = error_of([*tiny_args(teacher_dir, tmp_path / "o2"), "--embedding-size", "36", "--copy-embeddings-from",
                     str(truncated)], capsys)  # fmt: skip
    assert f"--copy-embeddings-from {truncated}: cannot load" in line
    mismatched = shutil.copytree(teacher_dir, tmp_path / "mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 50}))
    line = error_of([*tiny_args(teacher_dir, tmp_path / "o3"), "--teacher", str(mismatched)], capsys)
    assert "do not have the shapes its config.json describes" in line
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_a_run_never_writes_inside_the_corpus_directory_it_reads(teacher_dir, tmp_path, capsys):
    """A --data directory is read whole: outputs inside it were read as text by the next identical command (which
    failed on the first run's config.json). A hidden folder there is skipped by the reader, so it is allowed."""
    import shutil

    from fastmini.data.corpus import reads_below

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(teacher_dir / "corpus.txt", corpus / "wiki.txt")
    args = [*tiny_args(teacher_dir, corpus / "out"), "--data", str(corpus)]
    for extra in ((), ("--overwrite-output-dir",)):
        assert main([*args, *extra]) == 2
        assert "is inside the --data directory" in capsys.readouterr().err
    assert sorted(p.name for p in corpus.iterdir()) == ["wiki.txt"]
    assert reads_below(str(corpus), corpus / "runs" / "r1") and reads_below(str(corpus), corpus)
    assert not reads_below(str(corpus), corpus / ".runs" / "r1")  # the reader skips hidden folders
    assert not reads_below(str(corpus / "wiki.txt"), corpus)  # a file is read alone
    assert not reads_below(str(corpus), tmp_path / "out") and not reads_below("wikitext", corpus)


def test_a_run_never_writes_where_its_corpus_pattern_reaches(teacher_dir, tmp_path, capsys, monkeypatch):
    """A --data glob pattern that reaches into the output directory would read the run's outputs next time (a
    checkpoint's vocab.txt as text); one that only names files beside it, or skips hidden folders, does not."""
    import shutil

    from fastmini.data.corpus import reads_below

    corpus = tmp_path / "corpus"
    (corpus / "part").mkdir(parents=True)
    shutil.copy(teacher_dir / "corpus.txt", corpus / "part" / "wiki.txt")
    assert main([*tiny_args(teacher_dir, corpus / "out"), "--data", str(corpus / "**" / "*.txt")]) == 2
    assert "is reached by the --data pattern" in capsys.readouterr().err
    assert sorted(p.name for p in corpus.iterdir()) == ["part"]
    recursive, flat = str(corpus / "**" / "*.txt"), str(corpus / "*.txt")
    assert reads_below(recursive, corpus / "runs" / "r1") and reads_below(recursive, corpus)
    assert reads_below(flat, corpus) and not reads_below(flat, corpus / "runs")  # * does not descend
    assert reads_below(str(corpus / "r*" / "*.txt"), corpus / "runs") and not reads_below(
        str(corpus / "r*"), corpus / "runs"
    )
    assert not reads_below(str(corpus / "p*" / "*.txt"), corpus / "runs")
    assert not reads_below(recursive, corpus / ".runs" / "r1")  # glob skips hidden folders
    assert reads_below(str(corpus / ".r*" / "*.txt"), corpus / ".runs")  # ... unless the pattern names them
    assert not reads_below(recursive, tmp_path / "out") and reads_below(str(corpus / "**"), corpus / "x")
    monkeypatch.chdir(corpus)  # a relative pattern is relative to the working directory, as the reader takes it
    assert reads_below("**/*.txt", corpus / "runs") and not reads_below("part/*.txt", corpus / "runs")


def test_a_run_never_writes_over_its_teacher_nor_silently_over_a_fine_tuning_job(teacher_dir, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    before = {p.name: p.read_bytes() for p in teacher.iterdir() if p.is_file()}
    capsys.readouterr()
    for extra in ((), ("--overwrite-output-dir",)):
        assert main(tiny_args(teacher, teacher, *extra)) == 2
        assert "is the --teacher directory: the run would overwrite its own input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in teacher.iterdir() if p.is_file()} == before
    job = tmp_path / "finetuned"
    job.mkdir()
    (job / "config.json").write_text("{}")
    (job / "train_config.json").write_text(json.dumps({"task": "sst2"}))
    assert main(tiny_args(teacher_dir, job)) == 2
    assert "holds a fastmini.finetune run's outputs; pass --overwrite-output-dir" in capsys.readouterr().err
    assert (job / "config.json").read_text() == "{}"


def test_a_teacher_without_a_usable_tokenizer_is_refused(teacher_dir, tmp_path, capsys):
    import shutil

    from transformers import BertTokenizer

    from fastmini.distill.testing import tiny_vocabulary

    bare = shutil.copytree(teacher_dir, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--teacher", str(bare)], capsys)
    assert "no tokenizer files" in line and "--tokenizer" in line
    smaller = tmp_path / "tokenizer"
    BertTokenizer(vocab=tiny_vocabulary(20)).save_pretrained(smaller)
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--tokenizer", str(smaller)], capsys)
    assert "only 20 tokens for the teacher's 99 embedding rows" in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_rust_windows_is_refused_in_one_line(teacher_dir, tmp_path, capsys):
    """A Python-backed tokenizer (ESM's, BERTweet's, ...) gives no overflowing windows: datasets raised an
    AssertionError from inside its map."""
    from transformers import EsmTokenizer

    tokens = ["<cls>", "<pad>", "<eos>", "<unk>", *(f"w{i}" for i in range(90)), "<mask>"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    EsmTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "esm")
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--tokenizer", str(tmp_path / "esm")], capsys)
    assert "EsmTokenizer is not a fast (Rust-backed) tokenizer" in line
    assert not (tmp_path / "out").exists()


def test_the_student_pads_with_the_tokenizers_id_and_draws_its_words(teacher_dir, tmp_path, capsys, monkeypatch):
    """A tokenizer whose [PAD] is id 5 (the teacher's config says 0, BertConfig's default): the student's
    padding row (no gradient, ever) must be [PAD]'s, not a word's; random replacements come from the tokenizer's
    words, not from the teacher's padded table."""
    from transformers import BertTokenizer

    from fastmini import FastMiniForMaskedLM
    from fastmini.distill import trainer
    from fastmini.distill.testing import tiny_vocabulary

    vocabulary = tiny_vocabulary(90)
    order = sorted(vocabulary, key=vocabulary.get)
    order.insert(5, order.pop(0))  # [PAD] to id 5: ids 0-4 are [UNK], [CLS], [SEP], [MASK], w0
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(order)}, pad_token="[PAD]")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert tokenizer.pad_token_id == 5 and len(tokenizer) == 90
    drawn_from = []

    class RecordingWindows(trainer.MaskedWindows):
        def __init__(self, windows, tokenizer, vocab_size, *rest):
            drawn_from.append(vocab_size)
            super().__init__(windows, tokenizer, vocab_size, *rest)

    monkeypatch.setattr(trainer, "MaskedWindows", RecordingWindows)
    assert main([*tiny_args(teacher_dir, tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert "the tokenizer pads with id 5, the teacher's config says pad_token_id 0" in capsys.readouterr().err
    assert set(drawn_from) == {90}  # the tokenizer's 90 words, not the teacher's 99 rows
    student = FastMiniForMaskedLM.from_pretrained(tmp_path / "out")
    assert student.config.pad_token_id == 5
    assert student.fastmini.embeddings.word_embeddings.padding_idx == 5
    assert student.fastmini.embeddings.word_embeddings.weight[0].abs().sum() > 0  # [UNK]'s row, trained


def test_vocabulary_mismatch_between_tokenizer_and_teacher(teacher_dir, tmp_path, capsys):
    from transformers import BertTokenizer

    from fastmini.distill.testing import tiny_vocabulary

    bigger = tmp_path / "tokenizer"
    BertTokenizer(vocab=tiny_vocabulary(120)).save_pretrained(bigger)
    line = error_of([*tiny_args(teacher_dir, tmp_path / "out"), "--tokenizer", str(bigger)], capsys)
    assert "vocabulary mismatch" in line and "120 tokens" in line and "99 rows" in line


def test_unwritable_output_directory(teacher_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = error_of(tiny_args(teacher_dir, blocker / "out"), capsys)
    assert "--output-dir" in line and "not a writable directory" in line


def test_hidden_size_mismatch_needs_a_projection(teacher_dir, tmp_path, capsys):
    line = error_of([*tiny_args(teacher_dir, tmp_path / "a"), "--hidden-size", "24"], capsys)
    assert "differs from the teacher's 36" in line and "--hidden-projection" in line
    assert main([*tiny_args(teacher_dir, tmp_path / "b"), "--hidden-size", "24", "--hidden-projection"]) == 0
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["hidden_size"] == 24 and saved["intermediate_size"] == 96


def test_an_unfinished_run_is_not_overwritten_silently(teacher_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(tiny_args(teacher_dir, output, "--max-steps", "2", "--save-every", "1")) == 0
    assert main(tiny_args(teacher_dir, output, "--max-steps", "2", "--save-every", "1")) == 0  # finished: replaced
    (output / "metrics.json").unlink()  # as if the run had been killed before its end
    capsys.readouterr()
    line = error_of(tiny_args(teacher_dir, output, "--max-steps", "2"), capsys)
    assert "unfinished run" in line and "--resume" in line and "--overwrite-output-dir" in line
    assert (output / "checkpoints" / "step-00000002").is_dir()
    assert main(tiny_args(teacher_dir, output, "--max-steps", "2", "--overwrite-output-dir")) == 0
    assert not (output / "checkpoints").exists()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_command_that_fails_validation_leaves_the_output_directory_as_it_was(teacher_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    output = tmp_path / "out"
    assert main(tiny_args(teacher_dir, output, "--max-steps", "2", "--save-every", "1", "--keep-last", "0")) == 0
    finished = snapshot(output)
    assert "checkpoints/step-00000002/model.safetensors" in finished and "log.jsonl" in finished
    capsys.readouterr()
    assert "no text found" in error_of([*tiny_args(teacher_dir, output), "--data", str(empty)], capsys)
    assert snapshot(output) == finished
    (output / "metrics.json").unlink()  # now an unfinished run: --overwrite-output-dir with bad data keeps it
    unfinished = snapshot(output)
    error_of([*tiny_args(teacher_dir, output), "--data", str(empty), "--overwrite-output-dir"], capsys)
    assert snapshot(output) == unfinished
    error_of([*tiny_args(teacher_dir, tmp_path / "new"), "--data", str(empty)], capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("extra", [("--eval-windows", "0"), ("--eval-documents", "0"), ("--data", "ONE")])
def test_evaluation_can_be_off(extra, teacher_dir, tmp_path):
    if extra[1] == "ONE":
        one = tmp_path / "one.txt"
        one.write_text(" ".join(f"w{i % 90}" for i in range(400)) + "\n")  # one document, many windows
        extra = ("--data", str(one), "--max-windows", "none")
    output = tmp_path / "out"
    assert main([*tiny_args(teacher_dir, output, "--max-steps", "2"), *extra]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["evaluation"]["enabled"] is False and metrics["before"] is None and metrics["after"] is None
    assert metrics["train"]["steps"] == 2
    assert metrics["train"]["precision"] == "fp32"  # --precision auto, resolved on this CPU


def test_metrics_json_goes_in_after_the_model_it_vouches_for(teacher_dir, tmp_path, monkeypatch):
    """metrics.json marks a run finished: published in name order with the rest, it went in before
    model.safetensors, and a run stopped in between left a finished directory without weights."""
    from fastmini.distill import trainer

    published = []

    def stopped_before_the_metrics(path, value):
        published.extend(sorted(p.name for p in path.parent.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "write_json_atomically", stopped_before_the_metrics)
    output = tmp_path / "out"
    assert main(tiny_args(teacher_dir, output, "--max-steps", "2")) != 0  # stopped as Ctrl-C stops it
    assert "model.safetensors" in published and "metrics.json" not in published
    assert not (output / "metrics.json").exists()


def test_ctrl_c_without_a_checkpoint_does_not_suggest_resume(teacher_dir, tmp_path, capsys, monkeypatch):
    from fastmini.distill import trainer

    def interrupted(self, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.DistillationRun, "_train_step", interrupted)
    assert main(tiny_args(teacher_dir, tmp_path / "out", "--save-every", "0")) == 130
    err = capsys.readouterr().err
    assert "interrupted; no checkpoint was written (--save-every 0), so there is nothing to resume" in err
    assert "with --resume" not in err


def test_ctrl_c_after_a_checkpoint_names_the_directory_to_resume(teacher_dir, tmp_path, capsys, monkeypatch):
    """The hint names --output-dir: a bare --resume, as it said before, resumed the default directory's run."""
    from fastmini.distill import trainer

    train_step = trainer.DistillationRun._train_step

    def interrupted(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return train_step(self, step)

    monkeypatch.setattr(trainer.DistillationRun, "_train_step", interrupted)
    output = tmp_path / "my run"
    assert main(tiny_args(teacher_dir, output, "--max-steps", "4", "--save-every", "1")) == 130
    err = capsys.readouterr().err
    assert f"interrupted; continue from step-00000002 with --output-dir '{output}' --resume" in err


def test_hub_lookups_are_quiet_and_use_the_cache_when_the_hub_is_unreachable(monkeypatch):
    import logging

    from huggingface_hub import constants

    from fastmini.training import cli

    cli.quiet_libraries()
    assert logging.getLogger("huggingface_hub").getEffectiveLevel() >= logging.ERROR  # no retry chatter
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cli, "_hub_unreachable", lambda: True)
    cli.use_cache_if_hub_unreachable()
    assert constants.HF_HUB_OFFLINE is True


def test_the_offline_switch_lasts_one_job(monkeypatch):
    """A job that found the hub unreachable works offline; the process (a notebook) is online again after it,
    and the next job probes afresh."""
    import datasets.config
    from huggingface_hub import constants

    from fastmini.training import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    probes = []

    def unreachable(*args, **kwargs):
        probes.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr("socket.create_connection", unreachable)

    def job():
        cli.use_cache_if_hub_unreachable()
        cli.use_cache_if_hub_unreachable()  # probed once a job
        assert constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True

    for _ in range(2):
        assert cli.run_cli("fastmini.test", job) == 0
        assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    assert len(probes) == 2


def test_the_offline_switch_undoes_only_what_it_changed(monkeypatch):
    """datasets offline by its own setting (HF_DATASETS_OFFLINE) stays so after a job that switched the hub."""
    import datasets.config
    from huggingface_hub import constants

    from fastmini.training import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(cli, "_hub_unreachable", lambda: True)
    with cli.hub_offline_switch_undone():
        with cli.hub_offline_switch_undone():  # a job inside a job: the outer one undoes
            cli.use_cache_if_hub_unreachable()
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is True


# ---- a run and what it leaves ---------------------------------------------------------------------


def test_tiny_run_writes_a_loadable_model_and_improves_on_held_out_data(teacher_dir, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    output = tmp_path / "out"
    assert main(tiny_args(teacher_dir, output, "--max-steps", "30", "--lr", "3e-3", "--save-every", "10",
                          "--log-every", "5", "--keep-last", "0")) == 0  # fmt: skip
    model = AutoModelForMaskedLM.from_pretrained(output)
    assert type(model).__name__ == "FastMiniForMaskedLM" and model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert json.loads((output / "tokenizer.json").read_text())["truncation"] is None  # not the windowing's
    assert tokenizer.model_max_length == model.config.max_position_embeddings  # what truncation=True cuts to
    with torch.no_grad():
        logits = model(**tokenizer(["w1 w4 [MASK] w10"], return_tensors="pt")).logits
    assert logits.shape[-1] == 99 and torch.isfinite(logits).all()
    train_config = json.loads((output / "train_config.json").read_text())
    assert train_config["max_steps"] == 30 and train_config["teacher"] == str(teacher_dir)
    metrics = json.loads((output / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert len(after["hidden_cosine_per_layer"]) == 2 and metrics["layer_map"] == [2, 4]
    assert after["hidden_cosine_mean"] > before["hidden_cosine_mean"] + 0.3
    assert {"mlm_accuracy", "attention_kl_sum", "teacher_mlm_accuracy"} <= after.keys()
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    (evaluation,) = [r for r in records if r["kind"] == "eval"]  # flat: TensorBoard's eval/<metric> tags
    assert evaluation["step"] == 30 and evaluation["hidden_cosine_mean"] == after["hidden_cosine_mean"]
    assert all(r["output"] > 0 and r["attention"] >= 0 and r["hidden"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["output"] < train[0]["output"] and train[-1]["hidden"] < train[0]["hidden"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000020", "step-00000030"
    ]  # fmt: skip


def test_encoder_teacher_turns_the_output_term_off_with_one_warning(encoder_teacher_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(tiny_args(encoder_teacher_dir, output, "--max-steps", "3", "--log-every", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("no masked-LM head: the output-KL term is off") == 1
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert all(r["output"] == 0 for r in records if r["kind"] == "train")
    assert json.loads((output / "metrics.json").read_text())["output_kl"] is False


@pytest.mark.parametrize("architectures, head", [(None, True), (["BertForMaskedLM"], False)],
                         ids=["head-without-architectures", "architectures-without-head"])  # fmt: skip
def test_the_teachers_weights_decide_whether_it_has_a_head(architectures, head, teacher_dir, encoder_teacher_dir,
                                                           tmp_path, capsys):  # fmt: skip
    """Not config.json: a converted checkpoint may list no architectures while holding the head (the output-KL
    term, the recipe's heaviest, must stay on), and a masked-LM class may be named over an encoder alone (its
    head would be random: the term must go off)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir if head else encoder_teacher_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["architectures"] = architectures
    (teacher / "config.json").write_text(json.dumps(config))
    output = tmp_path / "out"
    assert main(tiny_args(teacher, output, "--data", str(teacher_dir / "corpus.txt"), "--max-steps", "2")) == 0
    err = capsys.readouterr().err
    assert ("no masked-LM head" in err) is not head
    assert ("its checkpoint lacks cls.predictions." in err) is not head  # why, where config.json promised one
    assert json.loads((output / "metrics.json").read_text())["output_kl"] is head


def test_student_embeddings_copied_from_the_teacher(teacher_dir):
    from transformers import BertForMaskedLM

    from fastmini.distill import models

    config = DistillConfig(teacher=str(teacher_dir), embedding_size=36, copy_embeddings_from="teacher",
                           recursions=2, reduction_factor=4)  # fmt: skip
    teacher = models.load_teacher(config, torch.device("cpu"), torch.float32)
    student = models.build_student(config, teacher)
    reference = BertForMaskedLM.from_pretrained(teacher_dir).bert.embeddings
    assert torch.equal(student.fastmini.embeddings.word_embeddings.weight, reference.word_embeddings.weight)
    with pytest.raises(UsageError, match="copy-embeddings-from"):
        models.build_student(DistillConfig(**{**config.to_dict(), "embedding_size": 16}), teacher)


@pytest.mark.slow
def test_default_run_on_the_packaged_minilm_and_wikipedia_sample(tmp_path):
    """The embedded default, shortened: packaged teacher (no MLM head) + gensim sample, from the repo root."""
    output = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fastmini.distill", "--output-dir", str(output), "--max-steps", "2",
         "--window-length", "32", "--window-stride", "8", "--max-windows", "2", "--eval-windows", "8",
         "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("output-KL term is off") == 1 and "Traceback" not in result.stderr
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(output)
    assert (model.config.hidden_size, model.config.vocab_size, model.config.embedding_size) == (384, 30522, 128)
    metrics = json.loads((output / "metrics.json").read_text())
    assert len(metrics["before"]["hidden_cosine_per_layer"]) == 6 and metrics["train"]["steps"] == 2
    assert (output / "vocab.txt").is_file() or (output / "tokenizer.json").is_file()


def test_gradient_checkpointing_changes_nothing_but_memory(teacher_dir, tmp_path, monkeypatch):
    """Dropout on (the default 0.1): the recomputed recursions draw the same masks, so the loss
    trajectory and the final student equal the run that keeps its activations."""
    from safetensors.torch import load_file

    from fastmini.training.testing import record_checkpointed_forwards

    runs = {}
    for name, extra in (("plain", ()), ("checkpointed", ("--gradient-checkpointing",))):
        output = tmp_path / name
        checkpointed_forwards = record_checkpointed_forwards(monkeypatch)
        assert main(tiny_args(teacher_dir, output, "--log-every", "1", *extra)) == 0
        assert any(checkpointed_forwards) is bool(extra)  # the flag reached the encoder, and only with it
        records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
        runs[name] = ([r for r in records if r["kind"] == "train"], load_file(str(output / "model.safetensors")))
    (plain, plain_weights), (checkpointed, checkpointed_weights) = runs["plain"], runs["checkpointed"]
    assert [r["step"] for r in checkpointed] == [1, 2, 3, 4]
    for a, b in zip(plain, checkpointed, strict=True):
        for term in ("loss", "mlm", "attention", "hidden", "output", "grad_norm"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-7), (a["step"], term)
    for name, value in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("epochs, steps", [("1", 6), ("1.5", 9)])
def test_epochs_mode_takes_epochs_times_full_batches_and_decays_the_lr_over_exactly_those_steps(
    epochs, steps, teacher_dir, tmp_path
):
    """--max-steps none --epochs E: 27 one-window documents in batches of 4 are 6 full batches an epoch
    (the partial batch of 3 is dropped), so E epochs are ceil(6 E) steps; the linear schedule's total is
    that same count, so the logged lr (the one each step used) falls by lr/(steps - 1) a step after the
    one warmup step and the last step runs at lr/(steps - 1), one decrement above zero."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(f"w{(d + i) % 90}" for i in range(10)) + "\n" for d in range(27)))
    output = tmp_path / "out"
    argv = tiny_args(teacher_dir, output, "--data", str(corpus), "--max-steps", "none", "--epochs", epochs,
                     "--eval-windows", "0", "--log-every", "1", "--lr", "8e-3", "--save-every", "0")  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train"]["steps"] == steps
    train = [r for r in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    expected = [0.0] + [8e-3 * (steps - k) / (steps - 1) for k in range(1, steps)]  # warmup 1, then linear to 0
    assert [r["lr"] for r in train] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_teacher_by_hub_name_loads_from_the_local_hub_cache_offline(teacher_dir, tmp_path, monkeypatch, capsys):
    """--teacher ORG/NAME is a hub name: with HF_HUB_OFFLINE=1 and the model in huggingface_hub's cache
    layout (models--ORG--NAME/snapshots/<commit>/ + refs/main), the teacher and its tokenizer load from the
    cache and a run distils from them; the output records the name as given."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-bert"
    shutil.copytree(teacher_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("corpus.txt"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub reads its cache directory and offline flag from these constants at call time (they
    # were taken from the environment at import); the environment variable skips fastmini's hub probe.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    output = tmp_path / "out"
    argv = tiny_args(teacher_dir, output, "--teacher", "tiny-org/tiny-bert", "--max-steps", "2")
    assert main(argv) == 0
    assert json.loads((output / "train_config.json").read_text())["teacher"] == "tiny-org/tiny-bert"
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["layer_map"] == [2, 4] and metrics["output_kl"] is True  # the tiny BertForMaskedLM, head and all
    assert json.loads((output / "config.json").read_text())["vocab_size"] == 99
    message = error_of(tiny_args(teacher_dir, tmp_path / "other", "--teacher", "tiny-org/missing"), capsys)
    assert "--teacher 'tiny-org/missing' is not a local directory and could not be loaded" in message  # not cached


def test_data_by_datasets_name_passes_config_split_and_text_field_through_the_command_line(
    teacher_dir, tmp_path, monkeypatch
):
    """--data NAME --data-config C --data-split S --text-field F reach datasets.load_dataset (a stand-in:
    no hub in tests) and the run distils on column F's documents."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    documents = (teacher_dir / "corpus.txt").read_text().splitlines()
    requested = []

    def load_dataset(name, config, split, cache_dir=None):
        requested.append((name, config, split))
        return datasets.Dataset.from_dict({"content": documents, "id": list(range(len(documents)))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    output = tmp_path / "out"
    argv = tiny_args(teacher_dir, output, "--data", "someone/corpus", "--data-config", "en", "--data-split",
                     "train[:50%]", "--text-field", "content", "--max-steps", "2")  # fmt: skip
    assert main(argv) == 0
    assert requested == [("someone/corpus", "en", "train[:50%]")]
    saved = json.loads((output / "train_config.json").read_text())
    assert (saved["data"], saved["data_config"], saved["text_field"]) == ("someone/corpus", "en", "content")
    assert json.loads((output / "metrics.json").read_text())["train"]["steps"] == 2
