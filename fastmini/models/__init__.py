"""fastmini models: config, PreTrainedModel classes, checkpoint loading and conversion."""

from fastmini.models.checkpoint import CheckpointError
from fastmini.models.configuration import FastMiniConfig
from fastmini.models.modeling import (
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
    FastMiniPreTrainedModel,
)

__all__ = [
    "CheckpointError",
    "FastMiniConfig",
    "FastMiniForMaskedLM",
    "FastMiniForSequenceClassification",
    "FastMiniForTokenClassification",
    "FastMiniModel",
    "FastMiniPreTrainedModel",
]
