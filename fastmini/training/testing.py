"""Test support shared by the command-line tools' tests (bad input gives one clear line, exit 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def cli_error(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys) -> str:
    """Run a CLI's ``main(argv)`` expecting a usage error; return its one ``<program>: error:`` line.

    The program is the module ``main`` belongs to (``fastmini.distill.__main__`` -> ``fastmini.distill``).
    Fails unless it exits 2 with exactly one such line on stderr and no traceback.
    """
    program = main.__module__.removesuffix(".__main__")
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{program}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_module(
    module: str,
    argv: Sequence[str],
    processes: int = 1,
    timeout: float = 240,
    backend: str = "torch",
    cwd=None,
    env: dict[str, str] | None = None,
    check: bool = True,
):
    """``python -m module argv``, or under ``torchrun --nproc_per_node=processes``
    (gloo on CPU), with ``FASTMINI_BACKEND=backend`` and one thread a process, in ``cwd`` (None: this process's),
    with ``env`` added to this process's environment; fails unless it exits 0 (``check=False``: whatever it exits).

    The backend is named because the child inherits the test session's environment, where CPU-only
    machines have TRITON_INTERPRET=1 (tests/conftest.py): with no backend named, fastmini would pick the
    Triton interpreter for every CPU op of the run. "torch" by default, "triton" to train through the kernels.
    The launch gets a session of its own, so that a hang kills torchrun's workers too, not only torchrun.
    """
    import os
    import signal
    import subprocess
    import sys

    from fastmini.ops.dispatch import BACKEND_ENV_VAR

    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", module, *argv]
    environment = {**os.environ, BACKEND_ENV_VAR: backend, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(
        command,
        env=environment,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0 or not check, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def record_checkpointed_forwards(monkeypatch) -> list[bool]:
    """For each training forward of a RecursiveEncoder from now on, whether activation checkpointing was on in
    it (what ``--gradient-checkpointing`` must switch on)."""
    import torch

    from fastmini.modules.encoder import RecursiveEncoder

    seen: list[bool] = []
    forward = RecursiveEncoder.forward

    def recording(self, *arguments, **keywords):
        if self.training and torch.is_grad_enabled():
            seen.append(bool(self.gradient_checkpointing))
        return forward(self, *arguments, **keywords)

    monkeypatch.setattr(RecursiveEncoder, "forward", recording)
    return seen
