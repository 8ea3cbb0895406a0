"""What the trainers' command lines share: quiet libraries, a log handler, errors without tracebacks.

``run_cli(name, body)`` runs ``body()`` and turns the ways a run ends early on purpose into one
line on stderr and an exit code: UsageError (bad input) -> ``<name>: error: ...``, exit 2;
TrainingError -> ``<name>: stopped: ...``, exit 1; Ctrl-C -> exit 130. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def quiet_libraries() -> None:
    """Our progress bars and log lines only: transformers/datasets chatter and bars off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


class CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logger(name: str) -> logging.Logger:
    """The ``name`` logger printing ``name: message`` lines to stderr, from rank 0 only under torchrun."""
    logger = logging.getLogger(name)
    if not any(isinstance(handler, CurrentStderr) for handler in logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if int(os.environ.get("RANK", "0")) != 0:
        logger.setLevel(logging.ERROR)  # one voice under torchrun
    return logger


def run_cli(name: str, body: Callable[[], int | None], interrupted_hint: str = "") -> int:
    """``body()``'s exit code (0 for None), or the exit code of the error it raised (see above)."""
    from fastmini.training.errors import TrainingError, UsageError

    try:
        return body() or 0
    except UsageError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"{name}: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return 130


def trainer_main(name: str, config_module: str, run: Callable[[object], object], argv: Sequence[str] | None) -> int:
    """The whole ``python -m <name>`` of a trainer: parse options with ``<config_module>.resolve``,
    print them (``--print-config``) or ``run(config)``, errors as one line (see ``run_cli``)."""
    setup_logger(name)

    def body() -> int:
        config, print_config = importlib.import_module(config_module).resolve(argv)
        if print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        quiet_libraries()
        import fastmini  # noqa: F401  (registers the Auto classes)

        run(config)
        return 0

    return run_cli(name, body, "resume with --resume")


def writable_directory(path: str, option: str = "--output-dir") -> Path:
    """``path`` created if needed and checked writable, or a UsageError naming ``option``."""
    from fastmini.training.errors import UsageError

    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{option} {path}: not a writable directory ({error.strerror or error})") from error
    return directory
