"""Reliability: atomic checkpoints, exact resume after a kill, --keep-last, non-finite loss.

A run killed with SIGKILL (a real process, between two steps or in the middle of writing a
checkpoint) and resumed must end with exactly the parameters of an uninterrupted run: same
seed, dropout on, CPU, one thread.
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
from safetensors.torch import load_file

from fastmini.distill.__main__ import main
from fastmini.distill.testing import make_tiny_teacher
from fastmini.training import checkpoints
from fastmini.training.faults import FAULT_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def run_args(teacher: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--teacher", str(teacher), "--data", str(teacher / "corpus.txt"), "--output-dir", str(output),
        "--window-length", "32", "--window-stride", "8", "--recursions", "2", "--embedding-size", "16",
        "--reduction-factor", "4", "--batch-size", "4", "--grad-accumulation", "2", "--max-steps", str(STEPS),
        "--warmup-steps", "2", "--save-every", "2", "--eval-documents", "2", "--eval-windows", "4",
        "--dropout", "0.1", "--lr", "2e-3", "--seed", "5", "--no-progress", "--threads", "1", *extra,
    ]  # fmt: skip


def killed_run(teacher: Path, output: Path, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastmini.distill", *run_args(teacher, output)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, FAULT_ENV_VAR: fault, "FASTMINI_BACKEND": "torch"},
    )  # fmt: skip


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    output = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    # Module scope runs before conftest's function-scoped backend fixture: name the backend here too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTMINI_BACKEND", "torch")
        assert main(run_args(teacher_dir, output)) == 0
    torch.set_num_threads(threads)
    return final_weights(output)


def assert_same_parameters(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_kill_between_steps_then_resume_gives_identical_parameters(teacher_dir, tmp_path, uninterrupted):
    output = tmp_path / "run"
    killed = killed_run(teacher_dir, output, "kill-after-step:5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [step for step, _ in checkpoints.list_checkpoints(output / "checkpoints")] == [4]  # --keep-last 1
    assert not (output / "model.safetensors").exists()
    # the checkpoint's options are the resuming command's defaults: the directory and --resume are enough
    assert main(["--output-dir", str(output), "--resume", "--no-progress", "--threads", "1"]) == 0
    assert_same_parameters(final_weights(output), uninterrupted)
    steps = [line for line in (output / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(steps) == len({line.split('"step": ')[1].split(",")[0] for line in steps})  # no duplicated steps


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(teacher_dir, tmp_path, uninterrupted):
    output = tmp_path / "run"
    killed = killed_run(teacher_dir, output, "kill-in-checkpoint:4")
    assert killed.returncode == -9
    root = output / "checkpoints"
    assert [step for step, _ in checkpoints.list_checkpoints(root)] == [2]
    assert any(p.name.startswith(checkpoints.TEMPORARY_PREFIX) for p in root.iterdir())  # the half-written one
    assert main([*run_args(teacher_dir, output), "--resume"]) == 0
    assert_same_parameters(final_weights(output), uninterrupted)
    assert not any(p.name.startswith(checkpoints.TEMPORARY_PREFIX) for p in root.iterdir())


def test_resume_from_an_explicit_checkpoint_and_from_a_finished_run(teacher_dir, tmp_path, uninterrupted):
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--max-steps", str(STEPS), "--keep-last", "0")) == 0
    assert_same_parameters(final_weights(output), uninterrupted)
    (output / "model.safetensors").unlink()
    explicit = ["--resume", str(output / "checkpoints" / "step-00000002"), "--output-dir", str(output)]
    assert main([*explicit, "--no-progress", "--threads", "1"]) == 0  # that checkpoint's options
    assert_same_parameters(final_weights(output), uninterrupted)


def test_finished_or_not_is_read_from_the_files_not_their_times(teacher_dir, tmp_path, capsys):
    """A copy of a finished run made without its files' times (cp -r) is still finished; a new run killed in a
    finished run's directory is unfinished: the old metrics.json does not vouch for the new checkpoints."""
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--keep-last", "0")) == 0
    copy = tmp_path / "copy"
    shutil.copytree(output, copy, copy_function=shutil.copyfile)
    os.utime(copy / "metrics.json", (0, 0))  # older than every checkpoint, as a copy may leave it
    assert main(run_args(teacher_dir, copy, "--keep-last", "0")) == 0  # finished: replaced, not refused
    assert not (copy / "metrics.previous.json").exists()  # the replaced run's metrics go with its end
    killed = killed_run(teacher_dir, output, "kill-after-step:3")  # a new run, stopped after its checkpoint 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (output / "metrics.json").exists() and (output / "metrics.previous.json").is_file()
    capsys.readouterr()
    assert main(run_args(teacher_dir, output)) != 0
    assert "unfinished run" in capsys.readouterr().err


def test_a_resume_that_finds_nothing_to_continue_does_not_inherit_the_old_metrics(teacher_dir, tmp_path, capsys):
    """--resume with no checkpoint starts afresh: a finished run's metrics.json (here one without checkpoints,
    --save-every 0) must not vouch for the new run's checkpoints once it is killed."""
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--save-every", "0")) == 0
    killed = subprocess.run(
        [sys.executable, "-m", "fastmini.distill", *run_args(teacher_dir, output), "--resume"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, FAULT_ENV_VAR: "kill-after-step:5", "FASTMINI_BACKEND": "torch"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert checkpoints.list_checkpoints(output / "checkpoints")[-1][0] == 4
    capsys.readouterr()
    assert main(run_args(teacher_dir, output)) != 0
    assert "unfinished run" in capsys.readouterr().err


def test_a_run_resumed_from_another_directory_replaces_this_ones_run(teacher_dir, tmp_path, capsys):
    """Resuming from a checkpoint elsewhere is a new run for the output directory: its finished run's
    checkpoints go (else --keep-last could prune the resumed run's own), an unfinished run's are refused."""
    finished, other = tmp_path / "finished", tmp_path / "other"
    assert main(run_args(teacher_dir, finished, "--keep-last", "0")) == 0
    assert killed_run(teacher_dir, other, "kill-after-step:3").returncode == -9  # other holds step 2
    elsewhere = str(other / "checkpoints" / "step-00000002")
    assert main([*run_args(teacher_dir, finished, "--keep-last", "1"), "--resume", elsewhere]) == 0
    assert [step for step, _ in checkpoints.list_checkpoints(finished / "checkpoints")] == [6]
    unfinished = tmp_path / "unfinished"
    assert killed_run(teacher_dir, unfinished, "kill-after-step:3").returncode == -9
    capsys.readouterr()
    assert main([*run_args(teacher_dir, unfinished), "--resume", elsewhere]) != 0
    assert "unfinished run" in capsys.readouterr().err


def test_a_run_resumed_from_another_directory_continues_that_runs_log(teacher_dir, tmp_path):
    """log.jsonl tells one run: the source run's steps up to its checkpoint, then this one's; never the lines
    of whatever run the output directory held before."""
    source, output = tmp_path / "source", tmp_path / "output"
    assert killed_run(teacher_dir, source, "kill-after-step:3").returncode == -9  # checkpoint at step 2
    assert main(run_args(teacher_dir, output, "--seed", "7", "--log-every", "1", "--max-steps", "2")) == 0
    # the killed run logged every 10 steps: give its log lines of its own for steps 1-2 to tell them apart
    (source / "log.jsonl").write_text(
        "".join(json.dumps({"kind": "train", "step": s, "source": 1}) + "\n" for s in (1, 2, 3))
    )
    elsewhere = str(source / "checkpoints" / "step-00000002")
    assert main([*run_args(teacher_dir, output, "--log-every", "1"), "--resume", elsewhere]) == 0
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    train = [(r["step"], r.get("source")) for r in records if r["kind"] == "train"]
    assert train == [(1, 1), (2, 1), (3, None), (4, None), (5, None), (6, None)]


def test_resume_refuses_weights_that_are_not_the_runs_student(teacher_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    assert main(run_args(teacher_dir, run, "--max-steps", "2")) == 0
    checkpoint = run / "checkpoints" / "step-00000002"
    weights = load_file(str(checkpoint / "model.safetensors"))
    damaged = {
        "cut short": lambda path: path.write_bytes(path.read_bytes()[:1000]),
        "missing": lambda path: path.unlink(),
        "embeddings only": lambda path: save_file({k: v for k, v in weights.items() if "embeddings" in k}, str(path)),
    }
    expected = {"cut short": "cannot be read", "missing": "cannot be read", "embeddings only": "is not this run's"}
    for name, damage in damaged.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(checkpoint, copy)
        damage(copy / "model.safetensors")
        capsys.readouterr()
        assert (
            main([*run_args(teacher_dir, tmp_path / f"out-{copy.name}", "--max-steps", "2"), "--resume", str(copy)])
            == 2
        )
        err = capsys.readouterr().err
        assert expected[name] in err and "Traceback" not in err, (name, err[-500:])


def test_checkpoints_hold_everything_needed_and_load_as_models(teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--max-steps", "2")) == 0
    checkpoint = output / "checkpoints" / "step-00000002"
    state = checkpoints.load_state(checkpoint / "trainer_state.pt")  # weights_only=True
    assert state["step"] == 2 and state["data_position"]["windows_seen"] == 8
    assert {"optimizer", "scheduler", "rng", "config", "metrics_before"} <= state.keys()
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 2
    assert isinstance(state["rng"], list) and "torch" in state["rng"][0]
    model = AutoModelForMaskedLM.from_pretrained(checkpoint)
    assert_same_parameters({k: v for k, v in model.state_dict().items()}, final_weights(output))
    # the precision it trained in: "--precision auto" resolves per device, so a resume elsewhere says it changed
    assert state["precision"] == "fp32"
    checkpoints.save_state(checkpoint / "trainer_state.pt", {**state, "precision": "bf16"})
    capsys.readouterr()
    assert main(run_args(teacher_dir, output, "--max-steps", "2", "--resume", "latest")) == 0
    assert "the checkpoint's run trained in bf16; it goes on in fp32 (--precision auto" in capsys.readouterr().err


def test_keep_last_prunes_old_checkpoints(teacher_dir, tmp_path):
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--save-every", "1", "--keep-last", "2", "--max-steps", "5")) == 0
    assert [step for step, _ in checkpoints.list_checkpoints(output / "checkpoints")] == [4, 5]


def test_resume_refuses_changed_options(teacher_dir, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main([*run_args(teacher_dir, output, "--max-steps", "2", "--lr", "1e-3"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.002 -> 0.001" in err and "Traceback" not in err


def test_resume_of_a_path_that_is_no_checkpoint_says_so_first(teacher_dir, tmp_path, capsys):
    """In a directory holding an unfinished run, "--resume WRONG" was told to pass --resume."""
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--max-steps", "2")) == 0
    (output / "metrics.json").unlink()  # as if stopped before its end: unfinished
    capsys.readouterr()
    for wrong in (tmp_path / "nowhere", teacher_dir / "corpus.txt"):
        assert main([*run_args(teacher_dir, output, "--max-steps", "2"), "--resume", str(wrong)]) == 2
        err = capsys.readouterr().err
        assert f"--resume {wrong}: not a checkpoint directory" in err and "pass --resume" not in err


def test_a_damaged_checkpoint_config_is_named_on_resume(teacher_dir, tmp_path, capsys):
    """Read as no options at all, it made the resumed run "change" every option from the defaults."""
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--max-steps", "2")) == 0
    saved = output / "checkpoints" / "step-00000002" / "train_config.json"
    options = json.loads(saved.read_text())
    resume = ["--output-dir", str(output), "--resume", "latest", "--no-progress", "--threads", "1"]
    for damaged, problem in (("{", "cannot be read as the run's options"), ("[]", "a JSON list, not an object")):
        saved.write_text(damaged)
        capsys.readouterr()
        assert main(resume) == 2
        err = capsys.readouterr().err
        assert f"--resume: {saved} {problem}" in err or (str(saved) in err and problem in err), err
        assert "->" not in err and "Traceback" not in err
    saved.write_text(json.dumps({**options, "max_steps": "many"}))
    assert main(resume) == 2
    assert f"--resume {saved}" in capsys.readouterr().err  # a bad value names the file it came from


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path):
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fastmini.distill", *run_args(teacher_dir, output)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, FAULT_ENV_VAR: "nan-loss:3"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "the loss is not finite at step 3 (loss=nan, mlm=" in result.stderr and "step-00000002" in result.stderr
    assert "Traceback" not in result.stderr
    assert [step for step, _ in checkpoints.list_checkpoints(output / "checkpoints")] == [2]
    assert not (output / "model.safetensors").exists()


def test_overflowing_gradients_stop_the_run_before_they_reach_the_weights(teacher_dir, tmp_path, capsys):
    """lr 1e6: step 1's loss is finite but its gradients overflow; the checkpoints stay finite."""
    output = tmp_path / "run"
    argv = run_args(teacher_dir, output, "--max-steps", "10", "--save-every", "1", "--keep-last", "0", "--lr", "1e6",
                    "--warmup-steps", "0", "--grad-accumulation", "1", "--max-grad-norm", "0")  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the gradient norm is not finite at step" in err and "stopped without updating the student" in err
    saved = checkpoints.list_checkpoints(output / "checkpoints")
    assert saved and f"the last good checkpoint is {saved[-1][1]}" in err
    for _, path in saved:
        assert all(torch.isfinite(value).all() for value in load_file(str(path / "model.safetensors")).values())


def test_gradient_norm_is_measured_with_and_without_clipping():
    from fastmini.training.optimization import gradient_norm

    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    assert gradient_norm([weight], 0.0) == 5.0 and torch.equal(weight.grad, torch.tensor([3.0, 4.0]))
    assert gradient_norm([weight], 1.0) == 5.0 and torch.allclose(weight.grad.norm(), torch.tensor(1.0))
    weight.grad = torch.tensor([float("inf"), 0.0])
    assert gradient_norm([weight], 0.0) == float("inf")


@pytest.mark.parametrize(
    "loss, grad, problem, details",
    [
        (float("nan"), 1.0, "the loss is not finite", "loss=nan, mlm=0.5"),
        (0.5, float("inf"), "the gradient norm is not finite", "norm=inf, loss=0.5, mlm=0.5"),
    ],
)
def test_checked_step_stops_before_any_update_on_a_non_finite_loss_or_gradient(loss, grad, problem, details):
    """Both trainers' one check: nothing steps (weights, AdamW's state, the schedule) and the trainer's message
    gets what was not finite and the step's values."""
    from fastmini.training.errors import TrainingError
    from fastmini.training.optimization import LinearWarmupDecay, checked_step

    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.tensor([grad, 0.0])
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = LinearWarmupDecay(optimizer, 0, 10)
    with pytest.raises(TrainingError) as raised:
        checked_step(
            optimizer, scheduler, [weight], 0.0, {"loss": loss, "mlm": 0.5}, "{} at step 3 ({}); stopped".format
        )
    assert str(raised.value) == f"{problem} at step 3 ({details}); stopped"
    assert torch.equal(weight.detach(), torch.ones(2)) and not optimizer.state and scheduler.last_epoch == 0


def test_resume_refuses_another_held_out_set_and_accepts_the_same_data_by_another_path(
    teacher_dir, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "run"
    assert main(run_args(teacher_dir, output, "--max-steps", "2")) == 0
    capsys.readouterr()
    for option, value in (("--eval-windows", "2"), ("--eval-batch-size", "2")):
        assert main([*run_args(teacher_dir, output, "--max-steps", "2", option, value), "--resume"]) == 2
        assert option in capsys.readouterr().err
    monkeypatch.chdir(teacher_dir)
    assert main([*run_args(teacher_dir, output, "--max-steps", "2", "--data", "./corpus.txt"), "--resume"]) == 0


def test_atomic_directory_publishes_all_or_nothing(tmp_path):
    final = tmp_path / "step-1"
    with pytest.raises(RuntimeError):
        with checkpoints.atomic_directory(final) as directory:
            (directory / "a").write_text("partial")
            raise RuntimeError("disk full")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with checkpoints.atomic_directory(final) as directory:
        (directory / "a").write_text("one")
    with checkpoints.atomic_directory(final) as directory:
        (directory / "a").write_text("two")
    assert (final / "a").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_atomic_directory_fsyncs_through_handles_windows_accepts(tmp_path, monkeypatch):
    """Windows' fsync refuses a file opened for reading alone (EBADF): every checkpoint save failed there. Simulated:
    an fsync that refuses read-only descriptors, on a platform flagged as needing write access."""
    import errno
    import fcntl

    real_fsync = os.fsync

    def windows_fsync(descriptor):
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY and not os.path.isdir(
            f"/proc/self/fd/{descriptor}"
        ):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    monkeypatch.setattr(checkpoints, "_FSYNC_NEEDS_WRITE_ACCESS", True)
    with checkpoints.atomic_directory(tmp_path / "step-1") as directory:
        (directory / "model.safetensors").write_bytes(b"weights")
    assert (tmp_path / "step-1" / "model.safetensors").read_bytes() == b"weights"


def test_rng_state_round_trip():
    import random

    state = checkpoints.capture_rng_state()
    expected = (random.random(), torch.rand(3))
    torch.rand(5)
    random.random()
    checkpoints.restore_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_a_compiled_student_trains_to_the_eager_parameters(teacher_dir, tmp_path):
    """--compile-student through the trainer's whole loop (checkpoints, evaluation, the final save): the same
    parameters as eager to float rounding, with dropout off (inductor draws its own random numbers). About a
    minute: the compile."""
    no_dropout = ("--dropout", "0")  # hidden and attention dropout
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTMINI_BACKEND", "torch")
        assert main(run_args(teacher_dir, tmp_path / "eager", *no_dropout)) == 0
        assert main(run_args(teacher_dir, tmp_path / "compiled", *no_dropout, "--compile-student")) == 0
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert compiled.keys() == eager.keys()
    difference = max((compiled[name] - eager[name]).abs().max().item() for name in eager)
    assert difference < 1e-5
    assert [step for step, _ in checkpoints.list_checkpoints(tmp_path / "compiled" / "checkpoints")] == [STEPS]
