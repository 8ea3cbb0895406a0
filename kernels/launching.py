"""What every kernel's host launcher needs around a launch."""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (nothing to do for CPU tensors, which
    only the interpreter runs)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
