"""What a run reports while it trains: JSON lines always, TensorBoard when it is installed.

Only the main process (rank 0) writes; on other ranks every method does nothing. A line that cannot be written
(a full disk) ends the logging, with a warning, not the run.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class RunLog:
    def __init__(
        self, directory: Path, enabled: bool, resume_from_step: int | None = None, resumed_run: Path | None = None
    ):
        """``resume_from_step``: a resumed run keeps the log up to that step, from ``resumed_run``'s directory when
        it resumes another directory's run (this directory's own lines then belong to another run). TensorBoard's
        events likewise: a new run (or one continuing another directory's) starts its tensorboard/ afresh, and a
        resumed one has TensorBoard drop what the interrupted process logged after the checkpoint (purge_step)."""
        self.enabled = enabled
        self.path = Path(directory) / LOG_NAME
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        events = Path(directory) / TENSORBOARD_DIR
        if resume_from_step is None:
            self.path.write_text("")
        else:
            self._keep_up_to(resume_from_step, self.path if resumed_run is None else Path(resumed_run) / LOG_NAME)
        if resume_from_step is None or resumed_run is not None:
            shutil.rmtree(events, ignore_errors=True)  # another run's curves
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        purge_step = None if resume_from_step is None or resumed_run is not None else resume_from_step + 1
        self._tensorboard = SummaryWriter(str(events), purge_step=purge_step)

    def _keep_up_to(self, step: int, source: Path) -> None:
        """A resumed run keeps what its run logged up to the checkpoint it resumes from, and drops what the
        interrupted one logged after it."""
        kept = []
        for line in (source.read_text() if source.is_file() else "").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{key: _plain(value) for key, value in values.items()}}
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self._tensorboard is not None:  # (its writer re-raises here what its thread met: a full disk too)
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tensorboard.add_scalar(f"{kind}/{key}", value, step)
        except OSError as error:
            # The run goes on without its log, once warned: rank 0 alone writes it, and stopping rank 0 here would
            # leave the other ranks of a torchrun job failing in their next collective. A full disk stops the run
            # at its next checkpoint or output instead, on every rank (training.distributed.on_main).
            self._stop_logging(error)

    def _stop_logging(self, error: OSError) -> None:
        warnings.warn(f"{self.path}: {error.strerror or error}; the run goes on without it", RuntimeWarning, 3)
        self.enabled = False
        self._tensorboard = None  # (not closed: closing flushes, and the flush is what failed)

    def close(self) -> None:
        if self._tensorboard is not None:
            try:
                self._tensorboard.close()
            except OSError as error:
                self._stop_logging(error)
