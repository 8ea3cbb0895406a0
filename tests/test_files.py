"""``fastmini.files.write_file_atomically``: all of a file or the old one, with the usual permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastmini.files import write_file_atomically


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_file_gets_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    path = tmp_path / "out.json"
    write_file_atomically(path, lambda temporary: Path(temporary).write_text("{}"))
    assert path.read_text() == "{}"
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    open(tmp_path / "plain", "w").close()  # what open() gives a new file
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path, failure):
    path = tmp_path / "out.json"
    path.write_text("old")

    def write_half_then_fail(temporary: str) -> None:
        Path(temporary).write_text("ne")
        raise failure

    with pytest.raises(type(failure)):
        write_file_atomically(path, write_half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    write_file_atomically(path, lambda temporary: Path(temporary).write_text("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
