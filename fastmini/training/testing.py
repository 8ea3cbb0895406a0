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
