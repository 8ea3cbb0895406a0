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
