"""Training plumbing shared by the trainers (distillation and fine-tuning).

Ground floor (DESIGN.md): no model code. Checkpoints written atomically with RNG state,
run logging from rank 0, the torchrun/DDP context, AdamW with warmup and linear or cosine
decay, step-indexed batching, dataclass-described options (--help, config files), the
command-line wrapper that turns errors into one-line messages, and fault injection for
crash-safety tests.
"""

from fastmini.training.errors import TrainingError, UsageError

__all__ = ["TrainingError", "UsageError"]
