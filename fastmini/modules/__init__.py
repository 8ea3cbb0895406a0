"""Thin nn.Modules: parameter owners that call fastmini.ops."""

from fastmini.modules.adapter import BottleneckAdapter
from fastmini.modules.embeddings import Embeddings
from fastmini.modules.encoder import EncoderOutput, RecursiveEncoder
from fastmini.modules.heads import MaskedLMHead
from fastmini.modules.shared_layer import SharedLayer

__all__ = [
    "BottleneckAdapter",
    "Embeddings",
    "EncoderOutput",
    "MaskedLMHead",
    "RecursiveEncoder",
    "SharedLayer",
]
