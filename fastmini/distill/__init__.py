"""MiniALBERT distillation: ``python -m fastmini.distill`` (see ``--help``) or ``distill(config)``.

Layers: config (every option), models (teacher, tokenizer, student), losses (the recipe's four
terms), distiller (one forward), teacher_attention (the teacher's maps in the matched layers only),
graphed_teacher (--graph-teacher: its forward replayed from CUDA graphs), speed_defaults (which speed
switches the trainer turns on by itself),
batches (which windows and masks each step sees), evaluation, trainer (loop, checkpoints, resume, outputs).
"""

from fastmini.distill.config import RECIPES, DistillConfig
from fastmini.distill.losses import LossTerms, LossWeights


def distill(config: DistillConfig) -> dict:
    """Run a distillation with ``config``; returns the metrics that ``metrics.json`` holds."""
    from fastmini.distill.trainer import distill as run

    return run(config)


__all__ = ["RECIPES", "DistillConfig", "LossTerms", "LossWeights", "distill"]
