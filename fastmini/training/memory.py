"""Activation checkpointing for the trainers' ``--gradient-checkpointing``.

transformers' own switch, non-reentrant by default: fastmini's encoder then checkpoints one recursion at a
time (fastmini/modules/encoder.py). Same losses and gradients, a fraction of the activation memory,
about one more forward of compute per step.
"""

from __future__ import annotations

from transformers import PreTrainedModel


def enable_activation_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """transformers renamed the switch: activation_checkpointing_enable from 5.23, where the old
    gradient_checkpointing_enable stays as an alias that warns; before 5.23 only the old name exists."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
