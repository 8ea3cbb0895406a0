"""Fault injection for crash-safety tests: ``FASTMINI_FAULT=<point>:<step>`` (comma-separated).

Points: ``kill-after-step`` (SIGKILL right after the optimizer step, before any checkpoint of
that step), ``kill-in-checkpoint`` (SIGKILL after the checkpoint's files are written, before
the rename that publishes it), ``fail-in-checkpoint`` (writing the checkpoint fails as safetensors
fails on a full disk, in the process that writes it: rank 0 under torchrun), ``nan-loss`` (the
step's loss becomes NaN). Unset, nothing happens; this exists so that tests can kill a real
process between steps.
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV_VAR = "FASTMINI_FAULT"


def _armed(point: str, step: int) -> bool:
    for item in os.environ.get(FAULT_ENV_VAR, "").split(","):
        name, _, at = item.strip().partition(":")
        if name == point and at.strip().isdigit() and int(at) == step:
            return True
    return False


def kill_if_armed(point: str, step: int) -> None:
    if _armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def fail_if_armed(point: str, step: int) -> None:
    """Raise what safetensors raises when the disk fills under it: not an OSError, the errno only in its text."""
    if _armed(point, step):
        raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})")


def nan_if_armed(step: int) -> bool:
    return _armed("nan-loss", step)
