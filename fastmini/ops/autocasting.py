"""The dtype autocast computes a tensor's lower-precision ops in: one rule for the ops and modules that
must anticipate it (custom ops autocast does not cast, masks built to match, weights cast once)."""

from __future__ import annotations

import torch

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves fp64 (and integers) alone


def autocast_casts_both(device_type: str, a: torch.dtype, b: torch.dtype) -> bool:
    """Whether an autocast region of ``device_type`` brings tensors of dtypes ``a`` and ``b`` to one dtype by
    itself (both eligible): an fp64 activation stays fp64 while an fp32 weight would become 16-bit."""
    return a in _AUTOCAST_ELIGIBLE and b in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(device_type)


def autocast_dtype_for(tensor: torch.Tensor) -> torch.dtype:
    """Autocast's dtype inside an autocast region of ``tensor``'s device when it would cast ``tensor``,
    else ``tensor``'s own dtype."""
    device_type = tensor.device.type
    if tensor.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def autocast_softmax_dtype(scores: torch.Tensor) -> torch.dtype:
    """What ``scores.softmax(-1)`` returns by itself: CUDA's autocast computes softmax in fp32 and returns it
    so; the CPU's leaves it in the input's dtype (checked on torch 2.13), as does no autocast."""
    if scores.device.type == "cuda" and scores.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled("cuda"):
        return torch.float32  # fp64 scores stay fp64: autocast leaves them alone
    return scores.dtype


def autocast_upcasts_layer_norm(tensor: torch.Tensor) -> bool:
    """Whether torch would return a LayerNorm of ``tensor`` in fp32 where fastmini's kernels return its own
    16-bit dtype: inside CUDA's autocast, whose policy computes and returns LayerNorm in fp32 (the CPU's keeps
    the input's dtype). The automatic choice then keeps torch's ops, so that a graph recorded under autocast
    gives the dtypes the eager model gives."""
    return tensor.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled("cuda")
