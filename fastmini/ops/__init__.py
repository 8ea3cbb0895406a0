"""One public function per fused op; each file holds its ``<op>_ref`` torch oracle beside it.

The fused ops take ``backend=None`` ("torch" | "triton"); see :mod:`fastmini.ops.dispatch`.
``packed_self_attention`` takes ``backend=None`` ("torch" | "cuda": torch's varlen flash kernel), chosen
by the model's ``optimize_for_inference(varlen_attention=True)``, not by ``FASTMINI_BACKEND``.
"""

from fastmini.ops.adapter_bottleneck import adapter_bottleneck, adapter_bottleneck_ref
from fastmini.ops.add_layer_norm import add_layer_norm, add_layer_norm_ref
from fastmini.ops.add_layer_norm_adapter import add_layer_norm_adapter, add_layer_norm_adapter_ref
from fastmini.ops.attention import packed_self_attention, self_attention, self_attention_ref
from fastmini.ops.dispatch import BACKEND_ENV_VAR, BACKENDS, BackendUnavailableError, resolve_backend
from fastmini.ops.key_padding import KeyPadding
from fastmini.ops.linear_gelu import GELU_APPROXIMATIONS, linear_gelu, linear_gelu_ref
from fastmini.ops.packing import Packing

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "BackendUnavailableError",
    "GELU_APPROXIMATIONS",
    "KeyPadding",
    "Packing",
    "adapter_bottleneck",
    "adapter_bottleneck_ref",
    "add_layer_norm",
    "add_layer_norm_adapter",
    "add_layer_norm_adapter_ref",
    "add_layer_norm_ref",
    "linear_gelu",
    "linear_gelu_ref",
    "packed_self_attention",
    "resolve_backend",
    "self_attention",
    "self_attention_ref",
]
