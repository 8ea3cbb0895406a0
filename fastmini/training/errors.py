"""The ways a training run ends early on purpose; CLIs print the message without a traceback."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input (an option, a file, a model): one sentence naming it and what was expected. Exit 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); checkpoints already written stay. Exit 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the user can do now (e.g. which checkpoint --resume would continue). Exit 130."""
