"""Ctrl-C or SIGTERM while ``python -m fastmini.<command>`` is still loading its libraries: one line, exit 130.

torch and transformers take seconds to import (6 s measured on this project's 2-core machine) before a command's
``run_cli`` (fastmini.training.cli) can turn an interrupt into its one-line message: until then Ctrl-C printed a
KeyboardInterrupt traceback from deep inside an import, and SIGTERM ended the process silently (-15). Nothing has
been written that early, so the process just leaves. Only a fastmini command's own process is touched: ``import
fastmini`` anywhere else keeps Python's handlers. ``hand_over`` gives the signals back once the command runs.
"""

from __future__ import annotations

import os
import signal
import sys

_replaced: dict[int, object] = {}  # signal -> the handler it had before leave_quietly_on_interrupt


def starting_command() -> str | None:
    """``fastmini.<command>`` while Python is locating that module of ``python -m`` (sys.argv[0] is "-m" then,
    and the original command line names it), else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    argv = getattr(sys, "orig_argv", [])
    for flag, module in zip(argv, argv[1:], strict=False):
        if flag == "-m":
            return module if module.startswith("fastmini.") else None
    return None


def leave_quietly_on_interrupt() -> None:
    """While a fastmini command starts: Ctrl-C or SIGTERM prints one line and exits 130 (see the module doc). A
    signal the process was started ignoring (a shell's background job ignores Ctrl-C) stays ignored."""
    command = starting_command()
    if command is None or _replaced:
        return

    def leave(signum: int, frame) -> None:
        os.write(2, f"{command}: interrupted while starting; nothing was written\n".encode())
        os._exit(130)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            _replaced[signum] = signal.signal(signum, leave)


def hand_over() -> None:
    """The handlers the process had before (Ctrl-C raising KeyboardInterrupt), for the command's run to take over."""
    while _replaced:
        signum, handler = _replaced.popitem()
        signal.signal(signum, handler)
