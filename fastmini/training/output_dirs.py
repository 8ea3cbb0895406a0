"""Whose outputs an --output-dir holds, and one job in it at a time.

A trainer replaces only its own earlier run: never the directory of its inputs (``--model``, ``--teacher``), and a
model another tool or person saved there only with --overwrite-output-dir. A job takes the directory's lock
(``LOCK_NAME``, an flock that dies with its process) before it changes anything there, so a second process
(a repeated command, a ``--resume`` while the first still runs) is refused instead of writing the same files.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from fastmini.models.checkpoint import CONFIG_NAME
from fastmini.training.checkpoints import METRICS_NAME, RUNS_DIR, TRAIN_CONFIG_NAME
from fastmini.training.errors import UsageError

LOCK_NAME = ".fastmini.lock"
# What each trainer's train_config.json has that the other's has not: how a directory's writer is told.
TRAINER_KEYS = {"fastmini.distill": "teacher", "fastmini.finetune": "task"}
# Entries that mean a directory holds outputs that could be lost (a saved model, a job's records).
_OUTPUT_ENTRIES = (CONFIG_NAME, TRAIN_CONFIG_NAME, METRICS_NAME, RUNS_DIR)

_held: dict[Path, IO[str]] = {}  # resolved directory -> its open, locked lock file
# The directories the running job locked (releasing_output_dirs_taken); a context variable: a thread's own.
_taken_by_this_job: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar(
    "fastmini_output_dirs_taken", default=None
)


def written_by(output: Path) -> str | None:
    """The trainer ("fastmini.distill" / "fastmini.finetune") whose outputs ``output`` holds, "" for outputs no
    fastmini trainer wrote (a model saved by hand, another tool's), None for none at all."""
    if not any((output / entry).exists() for entry in _OUTPUT_ENTRIES):
        return None
    try:
        saved = json.loads((output / TRAIN_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        saved = None
    for trainer, key in TRAINER_KEYS.items():
        if isinstance(saved, dict) and key in saved:
            return trainer
    return "fastmini.finetune" if (output / RUNS_DIR).is_dir() else ""  # a job stopped before it published


def resume_options(output_dir: str | Path, checkpoint: str | Path | None = None) -> str:
    """The options that resume the job in ``output_dir``, as a user types them: the directory named, since a bare
    --resume would resume the default output directory's job instead; ``checkpoint``, a checkpoint elsewhere that
    the job was resumed from (--resume PATH), named too (a bare --resume would start afresh in a directory with
    no checkpoint of its own yet)."""
    options = f"--output-dir {shlex.quote(str(output_dir))} --resume"
    return options if checkpoint is None else f"{options} {shlex.quote(str(checkpoint))}"


def check_foreign_outputs(
    output: Path, trainer: str, overwrite: bool, inputs: dict[str, str | None], option: str = "--output-dir"
) -> None:
    """Refuse an output directory that is one of ``inputs`` (option -> path: the run would overwrite what it
    reads) or that holds outputs another writer left (unless ``overwrite``). Writes nothing."""
    resolved = output.expanduser().resolve()
    for name, value in inputs.items():
        if value and Path(value).expanduser().is_dir() and Path(value).expanduser().resolve() == resolved:
            raise UsageError(f"{option} {output} is the {name} directory: the run would overwrite its own input")
    writer = written_by(output)
    if writer in (None, trainer) or overwrite:
        return
    whose = f"a {writer} run's outputs" if writer else "a model or files that no fastmini trainer wrote"
    raise UsageError(
        f"{option} {output} holds {whose}; pass --overwrite-output-dir to replace them, or choose another directory"
    )


def _refuse_running(output: Path, handle: IO[str], warn: bool = True) -> bool:
    """Take ``handle``'s lock, or a UsageError naming the process that holds it; False where the filesystem
    or the platform has no locks (some network filesystems; Windows, without flock): the job then runs
    unguarded, with a warning when ``warn`` (the job's hold warns, its probe does not: one warning a job)."""
    try:
        import fcntl
    except ImportError:
        return _unguarded(output, "this platform has no flock", warn)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        by = f" (process {holder})" if holder.isdigit() else ""
        raise UsageError(
            f"--output-dir {output}: another fastmini job is running in it{by}; wait for it to end, or choose "
            "another directory"
        ) from None
    except OSError as error:  # ENOLCK, EOPNOTSUPP: no locking here
        return _unguarded(output, error.strerror or str(error), warn)
    return True


def _unguarded(output: Path, reason: str, warn: bool) -> bool:
    if warn:
        warnings.warn(
            f"--output-dir {output}: cannot lock it ({reason}); a second job started there now would not be refused",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def check_not_running(output: Path) -> None:
    """Refuse, without writing anything, a directory whose lock another process holds (where nothing can be locked,
    hold_output_dir says so, once)."""
    lock = output / LOCK_NAME
    if output.resolve() in _held or not lock.is_file():
        return
    with open(lock) as handle:  # noqa: PTH123  (flock needs the file object)
        _refuse_running(output, handle, warn=False)  # taken and at once given back on close


def hold_output_dir(output: Path) -> None:
    """Take ``output``'s lock for this process until ``release_output_dir`` (or the process ends); a
    UsageError when another process holds it. Taking it again in the same process is a no-op."""
    key = output.resolve()
    if key in _held:
        return
    handle = open(key / LOCK_NAME, "a+")  # noqa: PTH123, SIM115  (held open while the job runs)
    if not _refuse_running(output, handle):
        handle.close()
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = handle
    taken = _taken_by_this_job.get()
    if taken is not None:
        taken.append(key)


def release_output_dir(output: str | Path) -> None:
    """Give back the lock ``hold_output_dir`` took (nothing when this process holds none)."""
    _give_back(Path(output).expanduser().resolve())


def _give_back(key: Path) -> None:
    handle = _held.pop(key, None)
    if handle is not None:
        with contextlib.suppress(OSError):  # closing gives the lock back; nothing to save if it fails
            handle.close()


@contextlib.contextmanager
def releasing_output_dirs_taken() -> Iterator[None]:
    """Give back, on leaving, the locks this job took inside (its context's own: another thread's job keeps its
    locks), by the directories it locked, not by re-resolving a path the job was given (a relative one names
    another directory once the working directory changed)."""
    taken: list[Path] = []
    token = _taken_by_this_job.set(taken)
    try:
        yield
    finally:
        _taken_by_this_job.reset(token)
        for key in taken:
            _give_back(key)
