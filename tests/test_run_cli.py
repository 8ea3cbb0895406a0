"""``fastmini.training.cli.run_cli``, which every command line (distill, finetune, predict) runs its body in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastmini.training.cli import run_cli

REPO = Path(__file__).resolve().parents[1]

# A command that prints far more than a pipe buffer holds, as predict does for a large input.
CHATTY = """
import sys
from fastmini.training.cli import run_cli

def body():
    for index in range(200_000):
        print(f'{{"index": {index}}}')

sys.exit(run_cli("chatty", body))
"""


def test_a_reader_that_stops_early_ends_any_command_quietly():
    process = subprocess.Popen([sys.executable, "-c", CHATTY], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    assert process.stdout.readline() == b'{"index": 0}\n'  # like `| head -1`
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0 and err == "", err


def test_a_broken_pipe_that_is_not_stdout_is_a_real_failure():
    def body():
        raise BrokenPipeError("a worker's pipe")

    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        run_cli("worker", body)


# Every rank fails alike, as the trainers' usage errors, non-finite losses and interrupts do.
# Rank 0, which alone prints, is the slower one: torchrun ends every worker once one has exited, so rank 1 must
# not exit first.
TWO_RANKS = """
import os, sys, time
from fastmini.training.cli import run_cli
from fastmini.training.errors import UsageError

def body():
    if os.environ["RANK"] == "0":
        time.sleep(3)
    raise UsageError("--batch-size 7 is not divisible by 2")

sys.exit(run_cli("demo", body))
"""


def test_under_torchrun_a_failure_of_every_rank_is_printed_once(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(launcher, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("demo: error: --batch-size 7 is not divisible by 2") == 1, result.stderr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_failure_that_may_be_a_ranks_own_is_printed_by_that_rank_with_its_rank(rank, monkeypatch, capsys):
    from fastmini.training.errors import UsageError

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")

    def body():
        raise UsageError("no CUDA device 3 here", rank_specific=True)

    assert run_cli("demo", body) == 2
    assert capsys.readouterr().err == f"[rank {rank}] demo: error: no CUDA device 3 here\n"

    def alike():
        raise UsageError("--batch-size 7")

    assert run_cli("demo", alike) == 2
    assert capsys.readouterr().err == ("demo: error: --batch-size 7\n" if rank == "0" else "")


def test_a_path_the_user_may_not_read_is_bad_input_in_one_line(capsys, tmp_path):
    """A PermissionError from reading what the user named (a data or model directory of another user) is
    exit 2 with the path, not a traceback."""
    locked = tmp_path / "data"

    def body():
        raise PermissionError(13, "Permission denied", str(locked))

    assert run_cli("demo", body) == 2
    assert capsys.readouterr().err == f"demo: error: {locked}: Permission denied\n"


def test_sigterm_ends_a_command_like_ctrl_c(capsys):
    import os
    import signal

    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli("demo", body, "resume with --resume") == 130
    assert capsys.readouterr().err == "demo: interrupted; resume with --resume\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's, not the caller's


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_a_command_loads_its_libraries_is_one_line_and_exit_130(tmp_path, signal_name):
    """torch and transformers take seconds to import before run_cli can answer an interrupt: a stand-in
    transformers package signals its own process as it is imported, where a traceback from deep inside an import
    (Ctrl-C) or a silent -15 (SIGTERM) ended the command before. A signal the process was started ignoring (a
    shell's background job ignores Ctrl-C) stays ignored; and anywhere but a fastmini command's own start, Python's
    handlers stay."""
    import os
    import signal

    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        f"import os, signal, time\nos.kill(os.getpid(), signal.{signal_name})\ntime.sleep(0.5)\nraise SystemExit(7)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def run(argv, ignoring=False):
        ignore = (lambda: signal.signal(getattr(signal, signal_name), signal.SIG_IGN)) if ignoring else None
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, preexec_fn=ignore)

    command = [sys.executable, "-m", "fastmini.predict", "--help"]
    started = run(command)
    assert (started.returncode, started.stderr) == (
        130,
        "fastmini.predict: interrupted while starting; nothing was written\n",
    )
    assert run(command, ignoring=True).returncode == 7  # ignored as it was: the start went on
    plain = run([sys.executable, "-c", "import sys; sys.argv[0] = '-m'; import fastmini"])
    assert plain.returncode != 130 and "interrupted while starting" not in plain.stderr


@pytest.mark.parametrize("trainer", ["distill", "finetune"])
def test_an_interrupt_during_a_trainers_setup_names_the_directory_to_resume(trainer, tmp_path, capsys):
    """Before a run knows its checkpoints the hint was a bare "--resume", which resumes the default output
    directory's job instead of this one's."""
    from fastmini.training.cli import trainer_main

    def run(config):
        raise KeyboardInterrupt

    output = tmp_path / "my out"
    name = f"fastmini.{trainer}"
    assert trainer_main(name, f"{name}.config", run, ["--output-dir", str(output)]) == 130
    assert capsys.readouterr().err.endswith(f"{name}: interrupted; resume with --output-dir '{output}' --resume\n")


def test_an_interrupt_during_setup_of_a_run_resumed_from_elsewhere_names_that_checkpoint(tmp_path, capsys):
    """A bare --resume there starts afresh: the directory has no checkpoint of its own yet."""
    from fastmini.training.cli import trainer_main

    def run(config):
        raise KeyboardInterrupt

    checkpoint = tmp_path / "old" / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_config.json").write_text("{}")
    output = tmp_path / "new"
    argv = ["--output-dir", str(output), "--resume", str(checkpoint)]
    assert trainer_main("fastmini.distill", "fastmini.distill.config", run, argv) == 130
    hint = f"resume with --output-dir {output} --resume {checkpoint}\n"
    assert capsys.readouterr().err.endswith(f"fastmini.distill: interrupted; {hint}")
    # Once the run has published a checkpoint of its own, that one is newer: a bare --resume continues from it.
    (output / "checkpoints" / "step-00000004").mkdir(parents=True)
    assert trainer_main("fastmini.distill", "fastmini.distill.config", run, argv) == 130
    assert capsys.readouterr().err.endswith(
        f"fastmini.distill: interrupted; resume with --output-dir {output} --resume\n"
    )


def test_a_stop_before_a_resumed_runs_first_own_checkpoint_names_the_one_elsewhere(tmp_path):
    """A bare --resume in a directory without checkpoints of its own starts afresh: the hint said "continue from
    step-00000500 with --output-dir X --resume"."""
    from types import SimpleNamespace

    from fastmini.distill.trainer import DistillationRun

    output, elsewhere = tmp_path / "new", tmp_path / "old" / "checkpoints" / "step-00000500"
    run = SimpleNamespace(
        last_checkpoint=elsewhere,
        checkpoint_root=output / "checkpoints",
        config=SimpleNamespace(output_dir=str(output), save_every=100),
    )
    hint = DistillationRun._after_interrupt(run)
    assert hint == f"continue from step-00000500 with --output-dir {output} --resume {elsewhere}"
    run.last_checkpoint = output / "checkpoints" / "step-00000600"  # its own since
    assert DistillationRun._after_interrupt(run).endswith(f"--output-dir {output} --resume")
