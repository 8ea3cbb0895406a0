"""``python -m fastmini.distill [options]`` (also under ``torchrun --nproc_per_node=K``).

Bad input prints one line, ``fastmini.distill: error: ...``, and exits 2; a run stopped by a
non-finite loss exits 1; an interrupted run exits 130. Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def _quiet_libraries() -> None:
    """Our progress bar and log lines only: transformers/datasets chatter and bars off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    logger = logging.getLogger("fastmini.distill")
    if not any(isinstance(handler, _CurrentStderr) for handler in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("fastmini.distill: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if int(os.environ.get("RANK", "0")) != 0:
        logger.setLevel(logging.ERROR)  # one voice under torchrun

    from fastmini.distill.config import resolve
    from fastmini.training.errors import TrainingError, UsageError

    try:
        config, print_config = resolve(argv)
        if print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        _quiet_libraries()
        import fastmini  # noqa: F401  (registers the Auto classes)
        from fastmini.distill.trainer import distill

        distill(config)
    except UsageError as error:
        print(f"fastmini.distill: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"fastmini.distill: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastmini.distill: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
