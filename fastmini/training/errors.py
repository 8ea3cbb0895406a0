"""The two ways a training run ends early on purpose; CLIs print the message without a traceback."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input (an option, a file, a model): one sentence naming it and what was expected. Exit 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); checkpoints already written stay. Exit 1."""
