"""Writes that fail because the disk is full (or a quota is reached, or the filesystem is read-only): the user's to
fix by freeing space or choosing another directory, so the command lines say so in one line, not a traceback.

Not every writer reports them as an OSError: safetensors (Rust) raises its own error with "(os error 28)" in the
text, and torch.save to a path loses the errno altogether ("unexpected pos 105664 vs 105568"). ``write_failure``
finds the OSError behind an error, or rebuilds it; where nothing says why, a filesystem with almost no space left
at the moment of the failure does (``where``). Imports nothing heavy: the command lines use it before torch.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

FULL_OR_READ_ONLY = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, name))
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error shows an errno
# Below this many free bytes a failed write is taken for a full disk (a model's checkpoint is megabytes).
NEARLY_FULL_BYTES = 1 << 20


def _os_error(code: int, where: str | Path | None) -> OSError:
    return OSError(code, os.strerror(code), None if where is None else str(where))


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # noqa: BLE001  (an error whose message cannot be made says nothing here)
        return ""


def write_failure(error: BaseException, where: str | Path | None = None) -> OSError | None:
    """The full-disk (quota, read-only) OSError behind ``error``, or None: found in its chain of explicit causes
    (``raise ... from``; not the implicit context: a bug raised while handling a full disk is that bug), read from
    its text, or, with ``where`` (the directory being written), inferred for an I/O-like error (OSError,
    RuntimeError) from that filesystem having less than NEARLY_FULL_BYTES free. The OSError names ``where`` when its
    own does not name a file."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:  # (a chain may loop: raise a from b, then b from a)
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in FULL_OR_READ_ONLY:
            return cause if cause.filename is not None or where is None else _os_error(cause.errno, where)
        match = _OS_ERROR_IN_TEXT.search(_text(cause))
        if match and int(match.group(1)) in FULL_OR_READ_ONLY:
            return _os_error(int(match.group(1)), where)
        cause = cause.__cause__
    if where is None or not hasattr(os, "statvfs") or not isinstance(error, (OSError, RuntimeError)):
        return None  # (Windows has no statvfs)
    try:
        stats = os.statvfs(where)
    except OSError:
        return None
    # root may write into the blocks reserved for it, which f_bavail leaves out
    free_blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    if free_blocks * stats.f_frsize < NEARLY_FULL_BYTES:
        return _os_error(errno.ENOSPC, where)
    return None
