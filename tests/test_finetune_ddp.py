"""``torchrun --nproc_per_node=2 -m fastmini.finetune`` on CPU (gloo) for a token-level loss (NER).

The NER cross-entropy averages over labelled tokens, which micro-batches hold in unequal numbers:
the trainer divides by the global batch's count, so one process with the whole batch, two processes
with half each and one process accumulating two halves follow the same losses to the same model
(dropout off). (Sentence-level tasks: tests/test_finetune_resume.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmini.finetune.__main__ import main
from fastmini.finetune.testing import make_tiny_model, write_task_data
from fastmini.training.faults import FAULT_ENV_VAR
from fastmini.training.testing import run_module

RUN = "full-lr0.002-seed1"


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    return run_module("fastmini.finetune", argv, processes=2)


def train_losses(output: Path) -> list[float]:
    lines = (output / "runs" / RUN / "log.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["kind"] == "train"]


def test_ner_trajectory_depends_on_the_global_batch_only(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_task_data(tmp_path / "data", "ner", train=32, dev=8)
    common = ["--model", str(model), "--data", str(data), "--task", "ner", "--lr", "2e-3", "--seed", "1",
              "--epochs", "1", "--batch-size", "8", "--log-every", "1", "--no-progress", "--threads", "1"]  # fmt: skip
    whole, two, accumulated = tmp_path / "whole", tmp_path / "two", tmp_path / "accumulated"
    assert main([*common, "--output-dir", str(whole)]) == 0
    torchrun([*common, "--output-dir", str(two)])
    assert main([*common, "--output-dir", str(accumulated), "--grad-accumulation", "2"]) == 0
    expected = train_losses(whole)
    assert len(expected) == 4 and expected[-1] != expected[0]
    weights = load_file(str(whole / "model.safetensors"))
    for other in (two, accumulated):
        assert train_losses(other) == pytest.approx(expected, rel=1e-5)
        other_weights = load_file(str(other / "model.safetensors"))
        for name, value in weights.items():
            torch.testing.assert_close(other_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_fresh_student_fine_tunes_under_torchrun(tmp_path):
    """No --model and no outputs/distill here: every process builds the fresh student into a temporary directory of
    its own, and rank 1's had no config.json (save_pretrained writes from rank 0 alone once torch.distributed is up):
    the job failed with a gloo traceback."""
    data = write_task_data(tmp_path / "data", "classification", train=16, dev=8)
    output = tmp_path / "out"
    run_module("fastmini.finetune", ["--data", str(data), "--output-dir", str(output), "--lr", "2e-3", "--seed", "1",
                                     "--epochs", "1", "--batch-size", "8", "--no-progress", "--threads", "1"],
               processes=2, cwd=tmp_path)  # fmt: skip
    assert (output / "metrics.json").is_file() and (output / "model.safetensors").is_file()


def _checkpoint_run(tmp_path: Path) -> tuple[list[str], Path]:
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_task_data(tmp_path / "data", "classification", train=32, dev=8)
    output = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--lr", "2e-3", "--seed", "1", "--epochs", "1",
            "--batch-size", "8", "--save-every", "1", "--no-progress", "--threads", "1",
            "--output-dir", str(output)]  # fmt: skip
    return argv, output / "runs" / RUN / "checkpoints"


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 writes checkpoints alone while the others wait: a full disk there ended the others in their next
    collective, each with a gloo "Connection closed by peer" traceback around rank 0's message."""
    argv, checkpoints = _checkpoint_run(tmp_path)
    result = run_module(
        "fastmini.finetune", argv, processes=2, env={FAULT_ENV_VAR: "fail-in-checkpoint:1"}, check=False
    )
    assert result.returncode != 0
    assert len(re.findall(rf"fastmini.finetune: stopped: {checkpoints}/step-0+1: No space left", result.stderr)) == 1
    assert "Connection closed" not in result.stderr and "[rank1]" not in result.stderr, result.stderr[-3000:]
    assert list(checkpoints.iterdir()) == []  # the half-written checkpoint went


def test_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    argv, _ = _checkpoint_run(tmp_path)
    monkeypatch.setenv(FAULT_ENV_VAR, "fail-in-checkpoint:1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "fastmini.finetune: stopped: " in err and "step-00000001: No space left on device" in err
    assert "Traceback" not in err
