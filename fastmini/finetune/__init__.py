"""Fine-tuning: ``python -m fastmini.finetune`` (see ``--help``) or ``finetune(config)``.

Layers: config (every option), tasks (GLUE table, task kinds, label maps), data (splits,
encoding), metrics (written out, tested by hand), models (the model source and one task model
per run), inference (batched logits, decoding; shared with ``fastmini.predict``), trainer (the
grid of runs, checkpoints, resume, the choice, outputs).
"""

from fastmini.finetune.config import FinetuneConfig
from fastmini.finetune.tasks import GLUE_TASKS, TASKS, TaskSpec


def finetune(config: FinetuneConfig) -> dict:
    """Run a fine-tuning job with ``config``; returns the metrics that ``metrics.json`` holds."""
    from fastmini.finetune.trainer import finetune as run

    return run(config)


__all__ = ["GLUE_TASKS", "TASKS", "FinetuneConfig", "TaskSpec", "finetune"]
