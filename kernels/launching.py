"""What every kernel's host launcher needs around a launch."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton.language as tl

from fastmini.ops.checks import accumulator_dtype


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


def accumulator_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, torch.dtype]:
    """ops.checks.accumulator_dtype for inputs of ``dtype``, as a kernel constexpr and as torch's dtype."""
    torch_dtype = accumulator_dtype(dtype)
    return (tl.float64 if torch_dtype == torch.float64 else tl.float32), torch_dtype
