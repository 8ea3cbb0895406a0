"""Fine-tuning reliability: exact resume after a kill, atomic checkpoints, non-finite loss, and the
training plumbing it shares with the distiller (schedules, gradient accumulation, torchrun DDP).

A job killed with SIGKILL (a real process, between two steps or while writing a checkpoint) and
resumed must end with exactly the models and metrics of an uninterrupted job: same seeds, dropout
on, CPU, one thread. The grid has two runs, so resuming also skips the finished one correctly.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmini.finetune.__main__ import main
from fastmini.finetune.testing import make_tiny_model, write_task_data
from fastmini.training import checkpoints
from fastmini.training.faults import FAULT_ENV_VAR
from fastmini.training.testing import run_module

REPO = Path(__file__).resolve().parents[1]
RUNS = ("full-lr0.002-seed1", "full-lr0.002-seed2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("job")
    return make_tiny_model(root / "model"), write_task_data(root / "data", "classification", train=32, dev=16)


def job_args(setup: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    model, data = setup
    return ["--model", str(model), "--data", str(data), "--output-dir", str(output), "--lr", "2e-3", "--seed", "1",
            "2", "--epochs", "3", "--batch-size", "8", "--save-every", "2", "--log-every", "1", "--no-progress",
            "--threads", "1", *extra]  # fmt: skip


def subprocess_run(argv: list[str], fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastmini.finetune", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, FAULT_ENV_VAR: fault, "FASTMINI_BACKEND": "torch"},
    )  # fmt: skip


def outcome(output: Path) -> dict:
    """Everything a job leaves that must not depend on interruptions (timings excluded)."""
    metrics = json.loads((output / "metrics.json").read_text())
    results = {}
    for run in RUNS:
        result = json.loads((output / "runs" / run / "result.json").read_text())
        result.pop("seconds")
        results[run] = result
    return {
        "published": load_file(str(output / "model.safetensors")),
        "best": {run: load_file(str(output / "runs" / run / "best" / "model.safetensors")) for run in RUNS},
        "grid": metrics["modes"]["full"]["grid"],
        "results": results,
        "predictions": (output / "predictions_validation.jsonl").read_text(),
    }


def assert_same_outcome(actual: dict, expected: dict) -> None:
    for name, tensor in expected["published"].items():
        assert torch.equal(actual["published"][name], tensor), name
    for run in RUNS:
        for name, tensor in expected["best"][run].items():
            assert torch.equal(actual["best"][run][name], tensor), (run, name)
    assert actual["grid"] == expected["grid"]
    assert actual["results"] == expected["results"]
    assert actual["predictions"] == expected["predictions"]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    # Module scope runs before conftest's function-scoped backend fixture: name the backend here too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTMINI_BACKEND", "torch")
        assert main(job_args(setup, output)) == 0
    torch.set_num_threads(threads)
    return outcome(output)


def test_kill_between_steps_then_resume_gives_identical_models_and_metrics(setup, tmp_path, uninterrupted):
    output = tmp_path / "job"
    killed = subprocess_run(job_args(setup, output), "kill-after-step:7")  # epoch 2 of the first run
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = output / "runs" / RUNS[0]
    assert [step for step, _ in checkpoints.list_checkpoints(first / "checkpoints")] == [6]  # latest only
    assert not (first / "result.json").exists() and not (output / "metrics.json").exists()
    assert main(job_args(setup, output)) == 2  # an unfinished job is not overwritten without asking
    # the job's saved options are the resuming command's defaults: the directory and --resume are enough
    assert main(["--output-dir", str(output), "--resume", "--no-progress", "--threads", "1"]) == 0
    assert_same_outcome(outcome(output), uninterrupted)
    steps = [json.loads(line)["step"] for line in (first / "log.jsonl").read_text().splitlines()
             if '"train"' in line]  # fmt: skip
    assert steps == list(range(1, 13))  # the interrupted run's log has no duplicated or missing steps


def test_kill_while_writing_a_checkpoint_then_resume(setup, tmp_path, uninterrupted):
    output = tmp_path / "job"
    killed = subprocess_run(job_args(setup, output), "kill-in-checkpoint:4")
    assert killed.returncode == -9
    root = output / "runs" / RUNS[0] / "checkpoints"
    assert [step for step, _ in checkpoints.list_checkpoints(root)] == [2]
    assert any(p.name.startswith(checkpoints.TEMPORARY_PREFIX) for p in root.iterdir())  # the half-written one
    assert main([*job_args(setup, output), "--resume"]) == 0
    assert_same_outcome(outcome(output), uninterrupted)


def test_resume_of_a_finished_job_and_with_changed_options(setup, tmp_path, uninterrupted, capsys):
    output = tmp_path / "job"
    assert main(job_args(setup, output)) == 0
    leftovers = []  # what a SIGKILL while a run replaced its best/ model leaves: full model copies, never read
    for run in (output / "runs").iterdir():
        if run.is_dir():
            leftovers += [run / ".tmp-best-4242", run / ".tmp-old-best-4242"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"x")
    assert main([*job_args(setup, output), "--resume"]) == 0  # every run finished: only the outputs are rewritten
    assert "finished earlier" in capsys.readouterr().err
    assert leftovers and not any(leftover.exists() for leftover in leftovers)
    assert_same_outcome(outcome(output), uninterrupted)
    assert main([*job_args(setup, output, "--weight-decay", "0.1"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--weight-decay 0.01 -> 0.1" in err and "Traceback" not in err


def test_finished_or_not_is_read_from_the_files_not_their_times(setup, tmp_path, capsys):
    """A copy of a finished job made without its files' times (cp -r) is still finished; a new job with the same
    options killed in a finished job's directory is unfinished: the old metrics.json does not vouch for it."""
    output = tmp_path / "job"
    assert main(job_args(setup, output)) == 0
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, copy_function=shutil.copyfile)
    os.utime(copy / "metrics.json", (0, 0))  # older than runs/grid.json, as a copy may leave it
    assert main(job_args(setup, copy)) == 0  # finished: replaced, not refused
    killed = subprocess_run(job_args(setup, output), "kill-after-step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (output / "metrics.json").is_file()  # the earlier job's, still there until this one publishes
    capsys.readouterr()
    assert main(job_args(setup, output)) == 2
    assert "holds an unfinished fine-tuning job" in capsys.readouterr().err


def test_a_second_process_is_refused_while_a_job_runs_in_the_directory(setup, tmp_path, capsys):
    """Following the "unfinished job: pass --resume" advice while the first process still runs would have two
    processes train one run and write one log: the directory's lock refuses the second."""
    import time

    from fastmini.training.errors import UsageError
    from fastmini.training.output_dirs import check_not_running

    output = tmp_path / "job"
    first = subprocess.Popen(
        [sys.executable, "-m", "fastmini.finetune", *job_args(setup, output, "--epochs", "200")], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "FASTMINI_BACKEND": "torch"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:  # until the first job holds the directory and has recorded its options
            assert first.poll() is None and time.monotonic() < deadline
            try:
                check_not_running(output)
            except UsageError:
                if (output / "runs" / "grid.json").is_file():
                    break
            time.sleep(0.2)
        capsys.readouterr()
        assert main(["--output-dir", str(output), "--resume", "--no-progress", "--threads", "1"]) == 2
        assert f"another fastmini job is running in it (process {first.pid})" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()


def test_a_damaged_grid_file_is_one_clear_error_on_resume(setup, tmp_path, capsys):
    output = tmp_path / "job"
    (output / "runs").mkdir(parents=True)
    for damaged in ("{", "[1, 2]"):
        (output / "runs" / "grid.json").write_text(damaged)
        capsys.readouterr()
        assert main([*job_args(setup, output), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "grid.json" in err and "--overwrite-output-dir" in err and "Traceback" not in err


def test_checkpoints_hold_what_resume_needs(setup, tmp_path, capsys):
    output = tmp_path / "job"
    killed = subprocess_run(job_args(setup, output), "kill-after-step:5")
    assert killed.returncode == -9
    checkpoint = output / "runs" / RUNS[0] / "checkpoints" / "step-00000004"
    state = checkpoints.load_state(checkpoint / "trainer_state.pt")  # weights_only=True
    assert {"optimizer", "scheduler", "rng", "progress"} <= state.keys()
    assert state["progress"]["step"] == 4 and len(state["progress"]["history"]) == 1
    assert state["scheduler"]["last_epoch"] == 4 and state["optimizer"]["state"]
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(checkpoint).config.id2label == {0: "neg", 1: "pos"}
    # the precision it trained in: "--precision auto" resolves per device, so a resume elsewhere says it changed
    assert state["precision"] == "fp32"
    checkpoints.save_state(checkpoint / "trainer_state.pt", {**state, "precision": "bf16"})
    capsys.readouterr()
    assert main([*job_args(setup, output), "--resume"]) == 0
    assert "the checkpoint's run trained in bf16; it goes on in fp32 (--precision auto" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_message(setup, tmp_path):
    output = tmp_path / "job"
    result = subprocess_run(job_args(setup, output), "nan-loss:3")
    assert result.returncode == 1
    assert "the loss is not finite at step 3 (loss=nan); stopped without updating the model" in result.stderr
    assert "step-00000002" in result.stderr
    assert "Traceback" not in result.stderr and not (output / "metrics.json").exists()


@pytest.mark.parametrize("max_grad_norm", ["0", "1"])
def test_overflowing_gradients_stop_the_run_before_they_reach_the_weights(setup, tmp_path, capsys, monkeypatch,
                                                                          max_grad_norm):  # fmt: skip
    """A finite loss whose gradients overflow (made inf in backward at step 4, the last of epoch 1): the run
    stops before AdamW would write NaN into the weights, so every checkpoint and best/ stays finite."""
    from fastmini.finetune import grid_run

    def overflowing_at_step_4(*arguments, **keywords):
        model, fresh_head = load_task_model(*arguments, **keywords)
        backward_passes = itertools.count(1)
        weight = next(p for p in model.parameters() if p.requires_grad)
        weight.register_hook(lambda grad: torch.full_like(grad, float("inf")) if next(backward_passes) == 4 else grad)
        return model, fresh_head

    load_task_model = grid_run.load_task_model
    monkeypatch.setattr(grid_run, "load_task_model", overflowing_at_step_4)
    output = tmp_path / "job"
    assert main(job_args(setup, output, "--save-every", "1", "--max-grad-norm", max_grad_norm)) == 1
    err = capsys.readouterr().err
    assert f"run {RUNS[0]}: the gradient norm is not finite at step 4 (norm=inf, loss=" in err
    latest = output / "runs" / RUNS[0] / "checkpoints" / "step-00000003"
    assert f"stopped without updating the model; the checkpoints written so far hold finite weights (the latest: " \
           f"{latest})" in err  # fmt: skip
    saved = sorted(output.rglob("*.safetensors"))
    assert latest / "model.safetensors" in saved and not (output / "metrics.json").exists()
    for path in saved:
        assert all(torch.isfinite(tensor).all() for tensor in load_file(str(path)).values()), path


def test_ctrl_c_says_what_resume_would_continue(setup, tmp_path, capsys, monkeypatch, uninterrupted):
    from fastmini.finetune.grid_run import GridRun

    train_step = GridRun._train_step
    interrupt_at = {}

    def interrupted(self, step):
        if interrupt_at.pop((self.setting.seed, step + 1), False):
            raise KeyboardInterrupt
        return train_step(self, step)

    monkeypatch.setattr(GridRun, "_train_step", interrupted)
    output = tmp_path / "job"
    for seed, step, hint in (
        (1, 1, "no checkpoint was written yet, so there is nothing to resume; start afresh with "
               "--overwrite-output-dir"),
        (1, 6, f"--output-dir {output} --resume continues run {RUNS[0]} from step-00000004"),
        (2, 1, f"--output-dir {output} --resume starts run {RUNS[1]} afresh (none of its checkpoints was written "
               "yet) and keeps the 1 finished run(s)"),
    ):  # fmt: skip
        interrupt_at[(seed, step)] = True
        resuming = ["--resume"] if (output / "runs").exists() else []
        assert main([*job_args(setup, output), *resuming]) == 130
        assert f"fastmini.finetune: interrupted; {hint}" in capsys.readouterr().err
    assert main([*job_args(setup, output), "--resume"]) == 0  # what the last hint said: the same job in the end
    assert_same_outcome(outcome(output), uninterrupted)


# ---- shared plumbing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_schedules_match_transformers(shape):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from fastmini.training.optimization import WarmupDecay

    reference = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[shape]
    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    schedule, expected = WarmupDecay(ours, 3, 10, shape), reference(theirs, 3, 10)
    for _ in range(12):
        assert schedule.get_last_lr()[0] == pytest.approx(expected.get_last_lr()[0], abs=1e-12)
        ours.step(), theirs.step(), schedule.step(), expected.step()
    with pytest.raises(ValueError, match="schedule"):
        WarmupDecay(ours, 1, 2, "step")


def test_warmup_steps_from_a_ratio_round_up_as_transformers_does(tmp_path):
    from transformers import TrainingArguments

    from fastmini.training.optimization import warmup_steps_from_ratio

    for ratio, total in [(0.1, 25), (0.06, 10), (0.25, 7), (0.5, 4), (0.0, 9), (0.01, 1)]:
        arguments = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[])
        assert warmup_steps_from_ratio(ratio, total) == arguments.get_warmup_steps(total), (ratio, total)
    assert warmup_steps_from_ratio(0.1, 25) == 3  # round() gave 2


def train_log(output: Path, run: str) -> list[dict]:
    lines = (output / "runs" / run / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def test_cosine_schedule_and_gradient_accumulation_in_a_run(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.0)  # no dropout: micro-batching changes no draw
    data = write_task_data(tmp_path / "data", "classification", train=32, dev=16)
    common = ["--model", str(model), "--data", str(data), "--lr", "2e-3", "--seed", "1", "--epochs", "2",
              "--batch-size", "8", "--log-every", "1", "--no-progress", "--threads", "1", "--schedule", "cosine",
              "--warmup-ratio", "0.25"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "two"), "--grad-accumulation", "2"]) == 0
    one, two = train_log(tmp_path / "one", "full-lr0.002-seed1"), train_log(tmp_path / "two", "full-lr0.002-seed1")
    import math

    # 8 steps, 2 of warmup, then half a cosine: the lr each step used
    expected = [2e-3 * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))) for s in range(8)]
    assert [r["lr"] for r in one] == pytest.approx(expected, abs=1e-12)
    for a, b in zip(one, two, strict=True):  # one batch of 8 == two accumulated micro-batches of 4
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert one[-1]["loss"] != one[0]["loss"]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = write_task_data(tmp_path / "data", "classification", train=32, dev=16)

    def run(output: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
        argv = ["--model", str(model), "--data", str(data), "--output-dir", str(output), "--lr", "2e-3", "--seed",
                "1", "--epochs", "2", "--batch-size", "8", "--log-every", "1", "--no-progress", "--threads", "1",
                *extra]  # fmt: skip
        return run_module("fastmini.finetune", argv, processes)

    run(tmp_path / "one", 1, "--grad-accumulation", "2")
    result = run(tmp_path / "two", 2)
    assert result.stdout.count("chosen lr") == 1  # rank 0 alone prints the table
    one, two = train_log(tmp_path / "one", "full-lr0.002-seed1"), train_log(tmp_path / "two", "full-lr0.002-seed1")
    assert [r["step"] for r in two] == list(range(1, 9))  # rank 0 alone writes the log
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    weights_one, weights_two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(
        str(tmp_path / "two" / "model.safetensors"))  # fmt: skip
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-6, msg=name)
