"""Training plumbing shared by the trainers (distillation now, fine-tuning next).

Ground floor (DESIGN.md): no model code. Checkpoints written atomically with RNG state,
run logging from rank 0, the torchrun/DDP context, AdamW with linear warmup and decay, the
errors the CLIs turn into one-line messages, and fault injection for crash-safety tests.
"""

from fastmini.training.errors import TrainingError, UsageError

__all__ = ["TrainingError", "UsageError"]
