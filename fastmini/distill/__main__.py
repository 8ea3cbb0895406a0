"""``python -m fastmini.distill [options]`` (also under ``torchrun --nproc_per_node=K``).

Bad input prints one line, ``fastmini.distill: error: ...``, and exits 2; a run stopped by a
non-finite loss exits 1; an interrupted run exits 130. Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import sys

from fastmini.training.cli import trainer_main


def main(argv: list[str] | None = None) -> int:
    def run(config) -> None:
        from fastmini.distill.trainer import distill

        distill(config)

    return trainer_main("fastmini.distill", "fastmini.distill.config", run, argv)


if __name__ == "__main__":
    sys.exit(main())
