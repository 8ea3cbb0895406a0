"""Backend choice for every op in fastmini.ops.

Order: the op's explicit ``backend=`` argument, then the ``FASTMINI_BACKEND`` environment
variable, then automatic by the input's device (CUDA tensor: triton where the op has it, its
kernels have passed their tests on a GPU and the op's measured rule says they pay off here;
CPU tensor: torch, or triton when ``TRITON_INTERPRET=1`` runs kernels on the CPU).

Why a rule per op (measured on an H200, benchmarks/results/2026-11-26-nvidia-h200*.md): the fused
kernels take less GPU time than torch's composition, but each call costs the host far more (Triton's
launcher ~1.4 us an argument, the custom op's dispatch ~60 us: ~155 us for add_layer_norm against
~28 us for torch's two kernels), so in eager code they win only where the GPU, not the host, is the
bottleneck. While a CUDA graph is recorded (``recording_cuda_graph()``, set by fastmini's graph
capture for its warm-up and capture) the host cost is paid once and the device time is all that
counts. While torch.jit.trace or torch.export records a
graph, automatic is torch: the recorded graph holds plain aten ops, which every consumer of it
(the ONNX exporters, AOTInductor, a process without fastmini) can run. Kernels that have only run
in the interpreter are never chosen automatically for CUDA tensors: asking for them by name is the
switch.
A backend that is asked for but missing is an error, never a silent fallback.
Nothing here touches a GPU or imports triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable, Collection, Iterator, Mapping

import torch

BACKENDS = ("torch", "triton", "cuda")
BACKEND_ENV_VAR = "FASTMINI_BACKEND"
TRITON_INTERPRET_ENV_VAR = "TRITON_INTERPRET"


_RECORDING_CUDA_GRAPH = contextvars.ContextVar("fastmini_recording_cuda_graph", default=False)


@contextlib.contextmanager
def recording_cuda_graph() -> Iterator[None]:
    """Within: the calls are being recorded into a CUDA graph (its eager warm-up runs included, so that the
    kernels the capture picks are compiled before it), and the ops' automatic choice may count device time
    alone."""
    token = _RECORDING_CUDA_GRAPH.set(True)
    try:
        yield
    finally:
        _RECORDING_CUDA_GRAPH.reset(token)


def in_cuda_graph_recording() -> bool:
    return _RECORDING_CUDA_GRAPH.get()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this op, this build or this tensor's device cannot run."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get(TRITON_INTERPRET_ENV_VAR, "0") not in ("", "0")


# Looked up once, without importing it: a cached function would warn under torch.compile (dynamo ignores its cache).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Whether the triton package is there to import (not on macOS or Windows, where it ships no wheels)."""
    return _TRITON_INSTALLED


def recording_a_graph() -> bool:
    """Whether torch.jit.trace or torch.export (the ONNX exporters' tracers) is recording a graph, which they
    keep for every later input."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _check_runnable(op: str, backend: str, tensor: torch.Tensor) -> None:
    if backend == "triton" and not triton_installed():
        raise BackendUnavailableError(f"fastmini op '{op}': backend 'triton' needs the triton package, not installed")
    if backend in ("triton", "cuda") and not tensor.is_cuda:
        if backend == "triton" and triton_interpreter_enabled():
            return
        hint = " (or set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if backend == "triton" else ""
        raise BackendUnavailableError(
            f"fastmini op '{op}': backend '{backend}' needs a CUDA tensor, got one on {tensor.device}{hint}"
        )


def resolve_backend(
    op: str,
    tensor: torch.Tensor,
    backend: str | None,
    available: Mapping[str, Callable],
    verified_on_gpu: Collection[str] = (),
    pays_off_on_gpu: Callable[[torch.Tensor], bool] | None = None,
    kernel_takes: Callable[[torch.Tensor], bool] | None = None,
) -> str:
    """Return the name of the backend that runs ``op`` on ``tensor``.

    ``verified_on_gpu`` names the backends whose kernels have passed their tests on a GPU;
    only those are picked automatically for CUDA tensors, and only where ``pays_off_on_gpu(tensor)``
    (the op's measured rule; None: wherever verified). ``kernel_takes(tensor)``: whether the op's kernel
    handles such an input at all (None: any); where not, the automatic choice is torch, on a GPU and under
    the interpreter alike (asked for by name, the kernel says what it refuses).
    """
    requested = backend if backend is not None else (os.environ.get(BACKEND_ENV_VAR) or None)
    if requested is not None:
        source = "backend=" if backend is not None else f"{BACKEND_ENV_VAR}="
        if not isinstance(requested, str):
            raise TypeError(f"fastmini op '{op}': backend must be a str or None, got {type(requested).__name__}")
        if requested not in BACKENDS:
            raise ValueError(f"fastmini op '{op}': unknown {source}{requested!r}; expected one of {BACKENDS}")
        if requested not in available:
            raise BackendUnavailableError(
                f"fastmini op '{op}' has no '{requested}' backend ({source}'{requested}'); "
                f"available: {sorted(available)}"
            )
        _check_runnable(op, requested, tensor)
        return requested
    if recording_a_graph():
        return "torch"
    if "triton" in available and triton_installed():
        # Under torch.compile, torch: inductor fuses the elementwise work itself, around kernels it can see into
        # (and the rules below read Python state that dynamo should not trace).
        on_gpu = (
            tensor.is_cuda
            and "triton" in verified_on_gpu
            and not torch.compiler.is_compiling()
            and (pays_off_on_gpu is None or pays_off_on_gpu(tensor))
        )
        interpreted = not tensor.is_cuda and triton_interpreter_enabled()
        if (on_gpu or interpreted) and (kernel_takes is None or kernel_takes(tensor)):
            return "triton"
    return "torch"


def choose(
    op: str,
    tensor: torch.Tensor,
    backend: str | None,
    available: Mapping[str, Callable],
    verified_on_gpu: Collection[str] = (),
    pays_off_on_gpu: Callable[[torch.Tensor], bool] | None = None,
    kernel_takes: Callable[[torch.Tensor], bool] | None = None,
) -> Callable:
    """The implementation of ``op`` to call for ``tensor`` (see :func:`resolve_backend`)."""
    return available[resolve_backend(op, tensor, backend, available, verified_on_gpu, pays_off_on_gpu, kernel_takes)]
