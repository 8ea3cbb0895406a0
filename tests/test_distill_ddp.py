"""``torchrun --nproc_per_node=2 -m fastmini.distill`` on CPU (gloo): same global batch semantics.

The trajectory depends on the global batch only: one process with the whole batch, two processes
with half each, and one process accumulating two halves follow the same losses to the same
parameters (dropout off, so only summation order differs). Rank 0 alone logs and reports; a
resume continues exactly, or, on another split of the same global batch, with a warning.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmini.distill.__main__ import main
from fastmini.distill.testing import make_tiny_teacher
from fastmini.training import checkpoints
from fastmini.training.faults import FAULT_ENV_VAR
from fastmini.training.testing import run_module


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def distill_args(teacher: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--teacher", str(teacher), "--data", str(teacher / "corpus.txt"),
        "--output-dir", str(output), "--window-length", "32", "--window-stride", "8", "--recursions", "2",
        "--embedding-size", "16", "--reduction-factor", "4", "--batch-size", "8", "--max-steps", "4",
        "--warmup-steps", "1", "--eval-documents", "2", "--eval-windows", "4", "--dropout", "0", "--lr", "2e-3",
        "--no-progress", "--threads", "1", "--log-every", "1", "--save-every", "2", "--keep-last", "0", *extra,
    ]  # fmt: skip


def torchrun(teacher: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_module("fastmini.distill", distill_args(teacher, output, *extra), processes=2)


def train_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def assert_same_run(reference: Path, other: Path) -> None:
    """Same logged terms every step and the same final parameters (float summation order aside)."""
    expected, actual = train_records(reference), train_records(other)
    assert [r["step"] for r in actual] == [1, 2, 3, 4]  # one log line per step: rank 0 writes alone
    for a, b in zip(expected, actual, strict=True):
        for term in ("loss", "mlm", "attention", "hidden", "output", "grad_norm"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-7), (a["step"], term)
    assert expected[-1]["loss"] != expected[0]["loss"]
    weights, other_weights = (load_file(str(output / "model.safetensors")) for output in (reference, other))
    for name, value in weights.items():
        torch.testing.assert_close(other_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_trajectory_depends_on_the_global_batch_only(teacher_dir, tmp_path, capsys):
    whole, two, accumulated = tmp_path / "whole", tmp_path / "two", tmp_path / "accumulated"
    assert main(distill_args(teacher_dir, whole)) == 0  # one process: in this one
    result = torchrun(teacher_dir, two)
    assert main(distill_args(teacher_dir, accumulated, "--grad-accumulation", "2")) == 0
    assert result.stderr.count("held-out after") == 1  # rank 0 speaks, rank 1 does not
    assert_same_run(whole, two)
    assert_same_run(whole, accumulated)
    # Tokens are counted over the global batch, not rank 0's share times the processes.
    tokens = [json.loads((d / "metrics.json").read_text())["train"]["tokens_this_session"] for d in (whole, two)]
    assert tokens[0] == tokens[1] > 0

    # The checkpoint holds both processes' RNG states; resuming under torchrun ends where the run ended.
    weights_two = load_file(str(two / "model.safetensors"))
    state = checkpoints.load_state(two / "checkpoints" / "step-00000002" / "trainer_state.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    (two / "model.safetensors").unlink()
    torchrun(teacher_dir, two, "--resume", str(two / "checkpoints" / "step-00000002"))
    resumed = load_file(str(two / "model.safetensors"))
    assert all(torch.equal(resumed[name], weights_two[name]) for name in weights_two)

    # Another split of the same global batch may resume it: said once, and the run ends the same.
    capsys.readouterr()
    resume = ["--grad-accumulation", "1", "--resume", str(two / "checkpoints" / "step-00000002")]
    assert main(distill_args(teacher_dir, accumulated, *resume)) == 0
    err = capsys.readouterr().err
    assert "written by 2 x 1 (processes x --grad-accumulation), this run uses 1 x 1" in err
    assert "the same up to dropout draws" in err
    assert_same_run(whole, accumulated)


def test_a_loss_setting_that_leaves_parameters_without_gradients_runs_under_torchrun(teacher_dir, tmp_path):
    """No loss on the logits (--mlm-weight 0, --output-weight 0): the MLM head gets no gradient, which DDP
    refuses unless asked to find such parameters; a projection no loss reads is not built at all."""
    output = tmp_path / "no-logits"
    no_logits = ("--mlm-weight", "0", "--output-weight", "0", "--hidden-projection", "--hidden-weight", "0")
    result = torchrun(teacher_dir, output, *no_logits)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no loss reads the projection; not building it" in result.stderr
    assert [r["step"] for r in train_records(output)] == [1, 2, 3, 4]


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_one_line(teacher_dir, tmp_path):
    """Rank 0 writes checkpoints alone while the others wait: a full disk there ended the others in their next
    collective, each with a gloo "Connection closed by peer" traceback around rank 0's message."""
    output = tmp_path / "out"
    result = run_module(
        "fastmini.distill", distill_args(teacher_dir, output), processes=2,
        env={FAULT_ENV_VAR: "fail-in-checkpoint:2"}, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    stopped = f"fastmini.distill: stopped: {output / 'checkpoints'}/step-0+2: No space left"
    assert len(re.findall(stopped, result.stderr)) == 1
    assert "Connection closed" not in result.stderr and "[rank1]" not in result.stderr, result.stderr[-3000:]
    assert checkpoints.list_checkpoints(output / "checkpoints") == []  # the half-written checkpoint went
