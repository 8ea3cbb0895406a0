"""``python -m fastmini.finetune [options]`` (also under ``torchrun --nproc_per_node=K``).

Bad input (an option, a data file, a model directory) prints one line,
``fastmini.finetune: error: ...``, and exits 2; a run stopped by a non-finite loss exits 1; an
interrupted run exits 130. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import json
import sys

from fastmini.training.cli import quiet_libraries, run_cli, setup_logger


def main(argv: list[str] | None = None) -> int:
    setup_logger("fastmini.finetune")

    def body() -> int:
        from fastmini.finetune.config import resolve

        config, print_config = resolve(argv)
        if print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        quiet_libraries()
        import fastmini  # noqa: F401  (registers the Auto classes)
        from fastmini.finetune.trainer import finetune

        finetune(config)
        return 0

    return run_cli("fastmini.finetune", body, "resume with --resume")


if __name__ == "__main__":
    sys.exit(main())
