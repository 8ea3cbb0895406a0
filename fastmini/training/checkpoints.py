"""Checkpoint directories written atomically, found again, pruned; RNG state capture.

A checkpoint is a directory ``<root>/step-<N>``. It is assembled under a temporary name in
the same parent and published with one ``os.rename``, so a reader (``--resume``) sees either
a complete checkpoint or none: a process killed half-way leaves only a ``.tmp-*`` directory,
which is ignored and cleaned up by the next save. Training state is read back with
``torch.load(weights_only=True)``: it holds tensors and plain Python values only.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastmini.training.write_failures import write_failure

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
TEMPORARY_PREFIX = ".tmp-"
# Names in a trainer's output directory, the same for both trainers (fastmini.finetune looks for a
# distillation's checkpoints; fastmini.predict reads a fine-tuning's options).
CHECKPOINTS_DIR = "checkpoints"  # <output>/checkpoints/step-N/
STATE_NAME = "trainer_state.pt"  # in a checkpoint, beside the model: optimizer, scheduler, RNG, progress
TRAIN_CONFIG_NAME = "train_config.json"  # every option of the run
METRICS_NAME = "metrics.json"
RUNS_DIR = "runs"  # a fine-tuning job's <output>/runs/: every run of its grid, and the job's options
# A distillation run that starts training moves the directory's metrics.json here; removed when it ends.
PREVIOUS_METRICS_NAME = "metrics.previous.json"


# --resume with no path (the distillation's): the output directory's own latest checkpoint.
RESUME_LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; rename it to ``final`` on success.

    An existing ``final`` is replaced (moved aside first, then removed). On an exception the
    temporary directory is removed and nothing is published.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)
        if final.exists():
            stale = final.parent / f"{TEMPORARY_PREFIX}old-{final.name}-{os.getpid()}"
            os.rename(final, stale)
            os.rename(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(temporary, final)
        _fsync_directory(final.parent)
    except BaseException as error:
        try:
            # Judged before the temporary goes: once removed, a full disk has space again.
            failure = write_failure(error, final.parent) if isinstance(error, Exception) else None
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        if failure is not None:
            raise _os_error_naming(failure, final) from error
        raise


def _os_error_naming(failure: OSError, final: Path) -> OSError:
    """``failure`` naming the directory that was being published (not its temporary name)."""
    return OSError(failure.errno, failure.strerror, str(final))


# Windows' fsync (FlushFileBuffers) refuses a handle opened for reading alone (EBADF); POSIX takes any.
_FSYNC_NEEDS_WRITE_ACCESS = os.name == "nt"


def _fsync_tree(directory: Path) -> None:
    mode = "rb+" if _FSYNC_NEEDS_WRITE_ACCESS else "rb"
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, mode) as handle:
                os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def publish_directory_contents(source: Path, target: Path) -> list[str]:
    """Move every entry of ``source`` into ``target`` (one rename each; an entry of the same name,
    file or directory, is replaced), then remove ``source``. For final outputs assembled aside.
    Returns the names of the entries published, sorted.

    train_config.json goes first: it names the directory's writer (training.output_dirs.written_by), so a
    process stopped part-way never leaves a config.json without it, which reads as a model saved by another tool
    (its checkpoints could then neither be resumed nor replaced without --overwrite-output-dir)."""
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(source.iterdir(), key=lambda path: (path.name != TRAIN_CONFIG_NAME, path.name)):
        destination = target / path.name
        if path.is_dir() or destination.is_dir():  # a file replaces a file in its one rename: no moment without it
            remove_entry(destination)
        path.replace(destination)
        names.append(path.name)
    source.rmdir()
    return sorted(names)


def remove_entry(path: Path) -> None:
    """Remove a file, link or directory tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the published checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_temporaries(root: Path) -> None:
    """Remove what an interrupted save left behind."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TEMPORARY_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (None or 0 keeps all); returns the deleted."""
    if not keep_last:
        return []
    doomed = [path for _, path in list_checkpoints(root)[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def capture_rng_state() -> dict[str, Any]:
    """Every global random state a training step may draw from (Python, NumPy, torch CPU and CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_of_rank(saved: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This process's share of the RNG states a checkpoint saved, one per process; a run resumed on
    another number of processes continues on the saved states taken round robin (its dropout draws
    differ: batching.check_resumed_split warns)."""
    return saved[rank % len(saved)]


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        kind, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_tokenizer(tokenizer, directory: Path, max_positions: int) -> None:
    """Save the tokenizer beside a model whose inputs hold at most ``max_positions`` tokens.

    Its ``model_max_length`` is capped at that (on the object too): what ``truncation=True`` cuts to, in
    transformers' pipelines for one. A tokenizer that carries no limit (1e30) or a larger one than the
    model's positions would hand the model sequences it refuses."""
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_positions)
    tokenizer.save_pretrained(directory)
