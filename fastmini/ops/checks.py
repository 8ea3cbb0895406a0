"""Argument checks shared by the fused ops, run before the backend is chosen so that every backend
refuses the same misuse with the same message (a ValueError or TypeError naming the argument).

They read only Python scalars and tensor attributes (type, dim, shape, dtype, device), never tensor
values: no host-device sync, and torch.compile traces them into guards.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from fastmini.ops.autocasting import autocast_casts_both

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOATING_NAMES = "float16, bfloat16, float32 or float64"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, tensor: object, device: torch.device | None = None) -> None:
    """``tensor`` is a tensor of a floating dtype the kernels take, on ``device`` when given."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{op}: {name} must be {_FLOATING_NAMES}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {device}")


def check_loss_inputs(op: str, target: str, **tensors: torch.Tensor) -> None:
    """The loss ops' common checks, after their shape checks: every tensor on one device, and the teacher's
    ``target`` (its first keyword is the student, its last the teacher) given no gradient to ask for."""
    names, devices = list(tensors), [t.device for t in tensors.values()]
    if any(device != devices[0] for device in devices):
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        got = f"{', '.join(map(str, devices[:-1]))} and {devices[-1]}"
        raise ValueError(f"{op}: {listed} must be on one device, got {got}")
    if tensors[names[-1]].requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: the teacher's {target} are the target and get no gradient; detach them first")


def check_features(op: str, x: object) -> int:
    """``x`` is a (..., H) floating tensor with H > 0; returns H."""
    check_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be (..., H) with H > 0, got shape {tuple(x.shape)}")
    return x.shape[-1]


def check_parameter(op: str, name: str, tensor: object, shape: tuple[int, ...], device: torch.device) -> None:
    """``tensor`` is a floating tensor of exactly ``shape`` on x's ``device``."""
    check_tensor(op, name, tensor, device)
    if tensor.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def check_eps(op: str, eps: object) -> None:
    """LayerNorm's eps: a finite Python number > 0 (eps <= 0 turns constant rows into inf/NaN)."""
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, Real)):  # float first: cheap
        raise TypeError(f"{op}: eps must be a Python float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps}")


def check_probability(op: str, name: str, p: object) -> None:
    """A dropout probability: a Python number in [0, 1)."""
    if type(p) is not float and (isinstance(p, bool) or not isinstance(p, Real)):
        raise TypeError(f"{op}: {name} must be a Python float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {p}")


def all_in(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether every tensor already has ``dtype``: the common case, in which the torch backends call their
    oracle as it is (the casting helpers below cost a few function calls per parameter on the hot path)."""
    for tensor in tensors:
        if tensor.dtype != dtype:
            return False
    return True


def cast_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` (itself when it already is): parameters follow the activation, as autocast does.
    Inside an autocast region that casts both, the cast is left to autocast, which casts a parameter once and
    reuses it across the recursions; casting here would redo it on every call."""
    if tensor.dtype == dtype or autocast_casts_both(tensor.device.type, tensor.dtype, dtype):
        return tensor
    return tensor.to(dtype)


def layer_norm_parameters(
    weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias as F.layer_norm takes them next to input of ``dtype``: that dtype, or on the
    CPU both fp32 next to 16-bit input (the CPU kernel's mixed mode, which keeps fp32 parameters fp32, both or
    neither: "mixed dtype (CPU): expect parameter to have scalar type of Float"; the CUDA kernel refuses it:
    "expected scalar type BFloat16 but found Float", torch 2.11 on an H200)."""
    mixed = weight.dtype == bias.dtype == torch.float32 and dtype in _HALF_DTYPES and weight.device.type == "cpu"
    if mixed:
        return weight, bias
    return weight.to(dtype), bias.to(dtype)


class HeldTarget:
    """A loss's target tensor kept for backward outside autograd's saved tensors (the teacher's maps or logits
    may be inference tensors, which autograd cannot save), with autograd's own guard: an in-place change
    between forward and backward is an error, not a silently different gradient. Inference tensors have no
    version counter, and outside inference mode they cannot be changed in place."""

    def __init__(self, op: str, tensor: torch.Tensor):
        self.op = op
        self.tensor = tensor
        self.version = None if tensor.is_inference() else tensor._version

    def get(self) -> torch.Tensor:
        if self.version is not None and self.tensor._version != self.version:
            raise RuntimeError(
                f"{self.op}: the teacher's tensor was modified in place between the loss and its backward"
            )
        return self.tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every fused op and kernel accumulates and computes its statistics in for inputs of ``dtype``: fp32
    for fp32/bf16/fp16, fp64 for fp64 (so that gradcheck sees the kernels' own derivatives)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
