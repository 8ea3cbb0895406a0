"""The ways a training run ends early on purpose; CLIs print the message without a traceback.

Under torchrun every rank raises these alike (they follow from the options, the data, or values
all-reduced over the processes), so ``run_cli`` lets rank 0 alone print them. One that may
happen on some ranks only is raised with ``rank_specific=True``: every rank that has it prints
it, prefixed with its rank.
"""

from __future__ import annotations


class _RunEnding(Exception):
    def __init__(self, *args: object, rank_specific: bool = False):
        super().__init__(*args)
        self.rank_specific = rank_specific


class UsageError(_RunEnding):
    """Bad input (an option, a file, a model): one sentence naming it and what was expected. Exit 2."""


class TrainingError(_RunEnding, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); checkpoints already written stay. Exit 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the user can do now (e.g. which checkpoint --resume would continue). Exit 130."""
