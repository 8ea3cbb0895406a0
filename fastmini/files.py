"""Local files: writing one so that a reader never sees half of it, and telling a local path that does not
exist from a Hugging Face hub or datasets name."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file_atomically(path: str | Path, write: Callable[[str], object]) -> None:
    """``write(temporary)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename.

    A reader never sees half a file, and a write that fails (or is interrupted) leaves the old file, or none,
    and no temporary. The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        os.chmod(temporary, _usual_mode())
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, value: object) -> None:
    """``value`` as indented JSON (one trailing newline), written atomically."""
    write_file_atomically(path, lambda temporary: Path(temporary).write_text(json.dumps(value, indent=2) + "\n"))


@functools.cache
def _usual_mode() -> int:
    """The mode open() gives a new file. Read once: the umask can only be read by setting it, which is not
    safe while other threads create files."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def looks_like_local_path(name: str) -> bool:
    """Whether ``name``, which names nothing on this machine, was meant as a local path rather than a Hugging Face
    hub or datasets name ("name" or "owner/name"): it starts as a path does (".", "/", "~"), has more than one "/",
    or a backslash, none of which a hub name can. The loaders of models and of fine-tuning data then say "no such
    directory" rather than ask the hub; the corpus reader widens the rule for data files (data.corpus)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
