"""What a run reports while it trains: JSON lines always, TensorBoard when it is installed.

Only the main process (rank 0) writes; on other ranks every method does nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class RunLog:
    def __init__(self, directory: Path, enabled: bool, resume_from_step: int | None = None):
        self.enabled = enabled
        self.path = Path(directory) / LOG_NAME
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_from_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tensorboard = SummaryWriter(str(Path(directory) / TENSORBOARD_DIR))

    def _truncate_after(self, step: int) -> None:
        """A resumed run drops what the interrupted one logged after the checkpoint it resumes from."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
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
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
