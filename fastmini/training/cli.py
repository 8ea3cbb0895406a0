"""What the trainers' command lines share: quiet libraries, a log handler, errors without tracebacks.

``run_cli(name, body)`` runs ``body()`` and turns the ways a run ends early on purpose into one
line on stderr and an exit code: UsageError (bad input) -> ``<name>: error: ...``, exit 2 (as a PermissionError:
a path this user may not read or write);
TrainingError -> ``<name>: stopped: ...``, exit 1; Ctrl-C or SIGTERM -> exit 130; a reader of
stdout that stops early (``| head``) -> exit 0, quietly. Anything else is a bug and keeps its
traceback. Under torchrun every rank ends the same way, and rank 0 alone prints the line (see
fastmini.training.errors for failures that may be one rank's own).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# How long a torchrun worker that left its error message to rank 0 waits for torchrun to end it (see
# _leave_if_torchrun_worker): ranks raise the same error within moments of each other, slow imports aside.
RANK0_REPORT_GRACE_S = 20.0


def quiet_libraries() -> None:
    """Our progress bars and log lines only: transformers/datasets chatter and bars off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):  # a dependency, but fastmini.predict does without it (--no-deps installs)
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    # Its retry warnings ("... thrown while requesting HEAD ...; Retrying in 8s") bury our one-line error.
    huggingface_hub.utils.logging.set_verbosity_error()


def use_cache_if_hub_unreachable() -> None:
    """Before a hub lookup: when HF_HUB_OFFLINE is unset and the hub cannot be reached within a few
    seconds, switch huggingface_hub (and datasets) to offline mode, for the running job when there is one
    (``hub_offline_switch_undone``), else for the process.

    A model or dataset already in the local cache then still loads, and one that is not fails at
    once instead of after huggingface_hub's five retries with back-off (about 25 s)."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or not _hub_unreachable():
        return
    from huggingface_hub import constants

    modules = [constants]  # what huggingface_hub.is_offline_mode() and transformers read
    with contextlib.suppress(ImportError):
        import datasets.config

        modules.append(datasets.config)
    job = _hub_job.get()
    for module in modules:
        if not module.HF_HUB_OFFLINE:
            if job is not None:
                job.switched.append((module, module.HF_HUB_OFFLINE))
            module.HF_HUB_OFFLINE = True


@dataclasses.dataclass
class _HubJob:
    """One job's view of the hub: its probe's answers, and what its offline switch changed (to undo)."""

    probe: dict[str, bool] = dataclasses.field(default_factory=dict)  # endpoint -> unreachable
    switched: list[tuple[Any, bool]] = dataclasses.field(default_factory=list)  # (module, its value before)


_hub_job: contextvars.ContextVar[_HubJob | None] = contextvars.ContextVar("fastmini_hub_job", default=None)
_process_hub_probe: dict[str, bool] = {}  # the probe's answers outside any job


@contextlib.contextmanager
def hub_offline_switch_undone() -> Iterator[None]:
    """A job's scope for ``use_cache_if_hub_unreachable``: the hub is probed once in it, and what the switch
    changed is undone on leaving (a job's answer to a network that was down, not the process's, which may go on:
    a notebook, a server). A job inside a job shares the outer one's scope."""
    if _hub_job.get() is not None:
        yield
        return
    job = _HubJob()
    token = _hub_job.set(job)
    try:
        yield
    finally:
        _hub_job.reset(token)
        for module, before in reversed(job.switched):
            module.HF_HUB_OFFLINE = before


def _hub_unreachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint fails (probed once a job, or once outside any)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    job = _hub_job.get()
    probe = _process_hub_probe if job is None else job.probe
    if constants.ENDPOINT not in probe:
        endpoint = urlparse(constants.ENDPOINT)
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
            probe[constants.ENDPOINT] = False
        except OSError:
            probe[constants.ENDPOINT] = True
    return probe[constants.ENDPOINT]


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
    if _rank() != 0:
        logger.setLevel(logging.ERROR)  # one voice under torchrun
    return logger


def run_cli(name: str, body: Callable[[], int | None], interrupted_hint: str | Callable[[], str] = "") -> int:
    """``body()``'s exit code (0 for None), or the exit code of the error it raised (see above). ``interrupted_hint``:
    what Ctrl-C's message advises where the run has not said better, or a function giving it at that moment."""
    from fastmini.command_start import hand_over
    from fastmini.training.errors import Interrupted, TrainingError, UsageError
    from fastmini.training.write_failures import write_failure

    hand_over()  # from here an interrupt is this function's to report
    try:
        with _sigterm_interrupts(), hub_offline_switch_undone():
            code = body() or 0
        sys.stdout.flush()  # here, not at exit: a reader that stopped early is then caught below
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket of the run broke: a real failure
        # The reader of stdout stopped early (`| head -1`): it has what it wanted, not an error.
        _discard_stdout()
        return 0
    except UsageError as error:
        _report(f"{name}: error: {error}", error.rank_specific)
        return _leave_if_torchrun_worker(2, wait_for_rank0=not error.rank_specific)
    except PermissionError as error:  # a path given (or under one) that this user may not read or write: bad input
        where = f"{error.filename}: " if error.filename else ""
        _report(f"{name}: error: {where}{error.strerror or 'permission denied'}", rank_specific=True)
        return _leave_if_torchrun_worker(2, wait_for_rank0=False)
    except TrainingError as error:
        _report(f"{name}: stopped: {error}", error.rank_specific)
        return _leave_if_torchrun_worker(1, wait_for_rank0=not error.rank_specific)
    except Exception as error:
        failure = write_failure(error)
        if failure is None:
            raise  # not the user's to fix: its traceback
        # A disk filled (or a quota or a read-only filesystem met) while writing a checkpoint or an output: the
        # published checkpoints stay, the one being written is discarded (training.checkpoints.atomic_directory).
        where = f"{failure.filename}: " if failure.filename else ""
        _report(f"{name}: stopped: {where}{failure.strerror or failure}", rank_specific=True)
        return _leave_if_torchrun_worker(1, wait_for_rank0=False)
    except KeyboardInterrupt as interrupt:
        # A run that knows better (e.g. there is no checkpoint to resume from) says so in the exception.
        if isinstance(interrupt, Interrupted):
            hint = str(interrupt)
        else:
            hint = interrupted_hint() if callable(interrupted_hint) else interrupted_hint
        _report(f"{name}: interrupted{'; ' + hint if hint else ''}")
        return _leave_if_torchrun_worker(130, wait_for_rank0=False)


def _leave_if_torchrun_worker(code: int, wait_for_rank0: bool) -> int:
    """A torchrun worker whose run ended early (bad input, a stop, an interrupt) exits at once with ``code``:
    left to the normal interpreter exit it can sit in the process group's teardown until torchrun kills it
    30 s later. Safe: checkpoints are published atomically, log.jsonl is appended line by line, the message
    is printed.

    Except a worker that left the message of an error every rank raises alike to rank 0: torchrun ends
    every other worker (SIGTERM) as soon as one exits, so such a worker exiting first could cut rank 0 off
    before it prints, and the user would see torchrun's summary alone. It waits for that SIGTERM instead,
    which ends it at once (the body's SIGTERM handler is gone by now), once rank 0 has printed and exited.
    Not after an interrupt: torchrun is stopping every worker then anyway, and would not signal again."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or _world_size() < 2:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if wait_for_rank0 and _rank() != 0:
        time.sleep(RANK0_REPORT_GRACE_S)
    os._exit(code)


def _rank() -> int:
    """This process's rank in a torchrun job, from torchrun's environment (0 outside torchrun); read without
    torch.distributed, which the command lines do not import before they need it."""
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _report(message: str, rank_specific: bool = False) -> None:
    """``message`` on stderr once per torchrun job: from rank 0 for what every rank raises alike, from
    each rank that has it, named, for what may be a rank's own."""
    rank, world_size = _rank(), _world_size()
    if world_size > 1 and rank_specific:
        print(f"[rank {rank}] {message}", file=sys.stderr)
    elif rank == 0:
        print(message, file=sys.stderr)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the body runs, SIGTERM (torchrun passing on its own signal, a job scheduler's time limit,
    ``kill``) ends it like Ctrl-C: the same message, the same --resume hint, exit 130."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe that its reader has closed (assumed where that cannot be asked)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # a closed pipe's writer always gets POLLERR
    except AttributeError:  # no poll() (Windows)
        return True
    except (OSError, ValueError):  # a stdout without a file descriptor (tests, notebooks)
        return False
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout at the null device: Python flushes it again at exit, which would raise into the
    closed pipe once more (and print "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def trainer_main(name: str, config_module: str, run: Callable[[object], object], argv: Sequence[str] | None) -> int:
    """The whole ``python -m <name>`` of a trainer: parse options with ``<config_module>.resolve``,
    print them (``--print-config``) or ``run(config)``, errors as one line (see ``run_cli``)."""
    setup_logger(name)
    parsed: list = []  # the config, once the command line is read

    def body() -> int:
        with _silent_off_rank0():
            config, print_config = importlib.import_module(config_module).resolve(argv)
            if print_config:
                print(json.dumps(config.to_dict(), indent=2))
                return 0
        parsed.append(config)
        quiet_libraries()
        import fastmini  # noqa: F401  (registers the Auto classes)

        run(config)
        return 0

    def interrupted_hint() -> str:
        """Before the run knows its checkpoints (its own hints are better): resuming that directory's job (which
        starts afresh where there is nothing to resume), or the checkpoint elsewhere the command resumed from;
        nothing while the command line is being read."""
        from fastmini.training.checkpoints import CHECKPOINTS_DIR, RESUME_LATEST, list_checkpoints
        from fastmini.training.output_dirs import resume_options

        if not parsed:
            return ""
        output_dir, resume = parsed[0].output_dir, getattr(parsed[0], "resume", None)  # distill's: None, latest, a path
        checkpoint = resume if isinstance(resume, str) and resume != RESUME_LATEST else None
        if checkpoint is not None and list_checkpoints(Path(output_dir).expanduser() / CHECKPOINTS_DIR):
            checkpoint = None  # the run has published its own since: a bare --resume continues from the latest
        return f"resume with {resume_options(output_dir, checkpoint)}"

    return run_cli(name, body, interrupted_hint)


def _silent_off_rank0() -> contextlib.AbstractContextManager:
    """Every rank of a torchrun job parses the same command line: its argparse errors, --help and --print-config
    come from rank 0 alone (once a process, --print-config wrote N JSON objects to one stdout)."""
    if _rank() == 0:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def check_writable_directory(path: str, option: str = "--output-dir") -> Path:
    """``path`` as a Path if it is a writable directory or could be created as one; a UsageError naming
    ``option`` otherwise. Creates and writes nothing (a command that fails later leaves no trace)."""
    from fastmini.training.errors import UsageError

    directory = Path(path).expanduser()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"{option} {path}: not a writable directory ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: not a writable directory (permission denied on {existing})")
    return directory


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
