"""``python -m fastmini.finetune [options]`` (also under ``torchrun --nproc_per_node=K``).

Bad input (an option, a data file, a model directory) prints one line,
``fastmini.finetune: error: ...``, and exits 2; a run stopped by a non-finite loss exits 1; an
interrupted run exits 130. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import sys

from fastmini.training.cli import trainer_main


def main(argv: list[str] | None = None) -> int:
    def run(config) -> None:
        from fastmini.finetune.trainer import finetune

        finetune(config)

    return trainer_main("fastmini.finetune", "fastmini.finetune.config", run, argv)


if __name__ == "__main__":
    sys.exit(main())
