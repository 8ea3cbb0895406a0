"""What every kernel's host launcher needs around a launch."""

from __future__ import annotations

import contextlib
import functools

import torch


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (nothing to do for CPU tensors, which
    only the interpreter runs)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.cache
def streaming_multiprocessors(device: torch.device) -> int:
    """The GPU's SM count, which launchers size their grids by; 1 for the interpreter's CPU tensors, where each
    program costs Python time."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
