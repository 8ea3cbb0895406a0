"""A full disk (quota, read-only filesystem) is the user's to fix: found behind what the writers raise
(training.write_failures), reported in one line by the command lines, never half-published."""

from __future__ import annotations

import errno
import os
import warnings
from types import SimpleNamespace

import pytest

from fastmini.training import checkpoints, write_failures
from fastmini.training.cli import run_cli
from fastmini.training.run_log import RunLog
from fastmini.training.write_failures import NEARLY_FULL_BYTES, write_failure

# What safetensors raises when the disk fills under it (its own exception type; the errno only in the text).
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
# What torch.save to a path raises then: nothing says why.
TORCH_SAVE_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 105664 vs 105568"


def _free_space(monkeypatch, free_bytes: int) -> None:
    stats = SimpleNamespace(f_bavail=free_bytes, f_bfree=free_bytes, f_frsize=1)
    monkeypatch.setattr(write_failures.os, "statvfs", lambda path: stats)


def test_found_in_the_chain_of_causes(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as cause:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from cause
    except RuntimeError as error:
        failure = write_failure(error, tmp_path)
    assert failure.errno == errno.ENOSPC and failure.filename == str(tmp_path)


def test_read_from_the_text_of_a_rust_error(tmp_path):
    failure = write_failure(RuntimeError(SAFETENSORS_FULL), tmp_path)
    assert failure.errno == errno.ENOSPC and failure.strerror == os.strerror(errno.ENOSPC)
    assert write_failure(RuntimeError("No such file or directory (os error 2)"), tmp_path) is None


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="no statvfs on this platform")
def test_inferred_from_a_filesystem_with_no_space_left(tmp_path, monkeypatch):
    error = RuntimeError(TORCH_SAVE_FULL)
    _free_space(monkeypatch, NEARLY_FULL_BYTES - 1)
    assert write_failure(error, tmp_path).errno == errno.ENOSPC
    assert write_failure(error) is None  # where nothing was being written: no guess
    _free_space(monkeypatch, 10 * NEARLY_FULL_BYTES)
    assert write_failure(error, tmp_path) is None


def test_other_errors_are_not_write_failures(tmp_path):
    for error in (ValueError("bad"), OSError(errno.EACCES, "Permission denied"), KeyError("x")):
        assert write_failure(error, tmp_path) is None


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="no statvfs on this platform")
@pytest.mark.parametrize("message", [SAFETENSORS_FULL, TORCH_SAVE_FULL])
def test_a_checkpoint_that_fills_the_disk_is_one_oserror_naming_it_and_nothing_is_left(message, tmp_path, monkeypatch):
    _free_space(monkeypatch, 0)
    final = tmp_path / "checkpoints" / "step-00000004"
    with pytest.raises(OSError) as raised:
        with checkpoints.atomic_directory(final) as directory:
            (directory / "model.safetensors").write_bytes(b"half")
            raise RuntimeError(message)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(final)
    assert list(final.parent.iterdir()) == []  # the temporary went; nothing was published


def test_a_checkpoints_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with checkpoints.atomic_directory(tmp_path / "step-00000001"):
            raise ValueError("a bug")


@pytest.mark.parametrize("message", [SAFETENSORS_FULL])
def test_the_command_line_says_it_in_one_line_with_exit_1(message, capsys):
    def body():
        raise RuntimeError(message)

    assert run_cli("demo", body) == 1
    assert capsys.readouterr().err == "demo: stopped: No space left on device\n"


def test_the_command_line_keeps_the_traceback_of_other_errors():
    def body():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("demo", body)


def test_a_log_line_that_cannot_be_written_ends_the_logging_not_the_run(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.write("train", 1, {"loss": 1.0})
    log.path.unlink()
    log.path.mkdir()  # opening it to append now fails (as a full disk would)
    with pytest.warns(RuntimeWarning, match="the run goes on without it"):
        log.write("train", 2, {"loss": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.write("train", 3, {"loss": 0.25})  # once warned: no warning a step
    log.close()


def test_a_chain_of_causes_that_loops_ends(tmp_path):
    first, second = RuntimeError("first"), RuntimeError("second")
    first.__cause__, second.__cause__ = second, first  # raise first from second, then second from first
    assert write_failure(first) is None


def test_a_bug_raised_while_handling_a_full_disk_is_the_bug(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise KeyError("a bug in the handler")  # noqa: B904  (implicitly chained, as a real bug would be)
    except KeyError as error:
        assert error.__context__ is not None and write_failure(error, tmp_path) is None


class _Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise ValueError("no message")


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="no statvfs on this platform")
def test_only_io_like_errors_are_taken_for_a_full_disk_and_the_temporary_always_goes(tmp_path, monkeypatch):
    _free_space(monkeypatch, 0)
    assert write_failure(TypeError("a bug in save_pretrained"), tmp_path) is None
    assert write_failure(_Unprintable(), None) is None
    final = tmp_path / "step-00000002"
    with pytest.raises(TypeError):
        with checkpoints.atomic_directory(final):
            raise TypeError("a bug in save_pretrained")
    assert list(tmp_path.iterdir()) == []


def test_a_tensorboard_writer_that_fails_ends_the_logging_too(tmp_path):
    class Failing:
        def add_scalar(self, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            raise AssertionError("a writer whose flush failed is not closed (closing flushes)")

    log = RunLog(tmp_path, enabled=True)
    log._tensorboard = Failing()  # TensorBoard's writer re-raises in add_scalar what its thread met
    with pytest.warns(RuntimeWarning, match="the run goes on without it"):
        log.write("train", 1, {"loss": 1.0})
    log.write("train", 2, {"loss": 0.5})
    log.close()
    assert not log.enabled
