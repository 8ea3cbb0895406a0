"""fastmini: MiniALBERT (recursive, adapter-tuned ALBERT students) as drop-in Hugging Face models.

``import fastmini`` registers the ``fastmini`` model type with transformers' Auto classes.
Importing never touches a GPU, builds an extension or imports fastmini's Triton kernels (``fastmini.kernels``).
"""

from fastmini.command_start import leave_quietly_on_interrupt

leave_quietly_on_interrupt()  # before the seconds of imports below, in a `python -m fastmini.<command>` process only

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from fastmini.models import (  # noqa: E402
    CheckpointError,
    FastMiniConfig,
    FastMiniForMaskedLM,
    FastMiniForSequenceClassification,
    FastMiniForTokenClassification,
    FastMiniModel,
    FastMiniPreTrainedModel,
)
from fastmini.models.student import copy_embeddings  # noqa: E402

__version__ = "0.1.0"

AutoConfig.register(FastMiniConfig.model_type, FastMiniConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, FastMiniModel),
    (AutoModelForMaskedLM, FastMiniForMaskedLM),
    (AutoModelForSequenceClassification, FastMiniForSequenceClassification),
    (AutoModelForTokenClassification, FastMiniForTokenClassification),
):
    _auto.register(FastMiniConfig, _model, exist_ok=True)

__all__ = [
    "CheckpointError",
    "FastMiniConfig",
    "FastMiniForMaskedLM",
    "FastMiniForSequenceClassification",
    "FastMiniForTokenClassification",
    "FastMiniModel",
    "FastMiniPreTrainedModel",
    "copy_embeddings",
]
