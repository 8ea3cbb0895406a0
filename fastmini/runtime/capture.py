"""How GraphedEncoder records one bucket's forward and runs it again: a capture strategy.

A strategy turns ``fn`` and the bucket's static input buffers into a ``Captured`` object whose
``replay()`` recomputes ``fn`` on whatever the buffers hold now and leaves the result in the same
``output`` tensor every time (that is what a CUDA graph does). Two strategies:

- ``CudaGraphCapture``: the real one, one ``torch.cuda.CUDAGraph`` per bucket, all sharing one
  memory pool;
- ``EagerCapture``: a stand-in with the same contract that simply calls ``fn`` again, so that
  bucketing, padding, slicing and reuse are testable on a CPU.

Everything here runs under ``torch.no_grad()``: graphs are for inference only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from fastmini.ops.dispatch import recording_cuda_graph

EncoderFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GraphHook = Callable[[int], object]


class Captured(Protocol):
    output: torch.Tensor  # overwritten in place by every replay

    def replay(self) -> None: ...


class CaptureStrategy(Protocol):
    def check_device(self, device: torch.device) -> None:
        """Raise a clear error for a device this strategy cannot record on (e.g. the CPU for CUDA graphs)."""

    def capture(self, fn: EncoderFn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Captured:
        """Record ``fn`` on the static buffers (already filled with a real batch)."""


def check_output(
    output: object,
    input_ids: torch.Tensor,
    owner: str = "GraphedEncoder",
    wrapping: str = "`lambda ids, mask: model.encode(ids, mask, unpad=False).sequence`",
) -> torch.Tensor:
    """``output`` of the wrapped callable, if it is the (batch, sequence, ...) tensor ``owner`` needs; else an
    error naming ``owner`` and how to wrap a model (``wrapping``)."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{owner}: the wrapped callable must return the (batch, sequence, hidden) tensor, got "
            f"{type(output).__name__}; wrap a model as {wrapping}"
        )
    if output.dim() < 2 or tuple(output.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"{owner}: the wrapped callable returned shape {tuple(output.shape)} for input "
            f"{tuple(input_ids.shape)}; expected (batch, sequence, ...)"
        )
    return output


class _EagerCaptured:
    def __init__(self, fn: EncoderFn, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self._fn, self._inputs = fn, (input_ids, attention_mask)
        output = self._run()
        # A normal tensor even under torch.inference_mode(): replays outside it write it in place.
        with torch.inference_mode(False):
            self.output = output.clone()

    def _run(self) -> torch.Tensor:
        with torch.no_grad():
            return check_output(self._fn(*self._inputs), self._inputs[0])

    def replay(self) -> None:
        self.output.copy_(self._run())  # same buffer every time, as a graph's static output


class EagerCapture:
    """Graph semantics without a graph: for tests on a CPU and for debugging a graphed model."""

    def check_device(self, device: torch.device) -> None:
        return None

    def capture(self, fn: EncoderFn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Captured:
        return _EagerCaptured(fn, input_ids, attention_mask)


class _GraphCaptured:
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor):
        self.graph, self.output = graph, output

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphCapture:
    """One CUDA graph per bucket, captured as torch.cuda.graphs documents it.

    ``warmup_iters`` eager runs on a side stream come first (lazy initialisation in cuBLAS, Triton
    autotuning and the caching allocator must not happen inside the capture). All graphs of one
    strategy on a device share one memory pool and one capture stream, so the buckets' activations reuse one
    another's memory instead of adding up. That is safe in any replay order because replays run one
    at a time on one stream, every replay writes its intermediates before reading them, each
    bucket's output tensor stays alive (no later capture is handed its memory), and a bucket's
    output is read only right after its own replay (GraphedEncoder copies it out at once: the
    memory behind it may be another bucket's scratch space).

    ``graph_hook(raw_cuda_graph)`` runs between capture and instantiation with the cudaGraph_t as an
    int, e.g. ``L2Window.apply_to_graph`` to put an L2 access-policy window on every kernel node.
    It needs ``torch.cuda.CUDAGraph(keep_graph=True)`` (torch >= 2.8).

    Verified on an H200 (the ``gpu`` tests of tests/test_runtime_cuda_graphs.py, 2026-11-26).
    """

    def __init__(self, warmup_iters: int = 3, graph_hook: GraphHook | None = None):
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 1:
            raise ValueError(f"warmup_iters must be an int >= 1, got {warmup_iters!r}")
        self.warmup_iters = warmup_iters
        self.graph_hook = graph_hook
        # A memory pool and a capture stream per device, made on its first capture: a model moved to another GPU
        # (and its encoder reset()) captures there with a pool of that device.
        self._pools_and_streams: dict[torch.device, tuple[object, torch.cuda.Stream]] = {}

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise RuntimeError(
                f"GraphedEncoder: CUDA-graph capture needs CUDA tensors, got input_ids on {device}; "
                "move the model and inputs to a GPU, or pass capture=EagerCapture() to run without graphs"
            )

    def _new_graph(self) -> torch.cuda.CUDAGraph:
        if self.graph_hook is None:
            return torch.cuda.CUDAGraph()
        try:
            return torch.cuda.CUDAGraph(keep_graph=True)
        except TypeError as error:
            raise RuntimeError(
                f"CudaGraphCapture(graph_hook=...) needs torch.cuda.CUDAGraph(keep_graph=True) (torch >= 2.8); "
                f"this is torch {torch.__version__}"
            ) from error

    def capture(self, fn: EncoderFn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Captured:
        device = input_ids.device
        with torch.cuda.device(device), torch.no_grad():
            if device not in self._pools_and_streams:
                self._pools_and_streams[device] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=device))
            pool, stream = self._pools_and_streams[device]
            caller = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(caller)
            # The ops may pick kernels whose host cost only a graph pays off (fastmini/ops/dispatch.py), in the
            # warm-up too: there they are compiled, which must not happen inside the capture.
            with torch.cuda.stream(side), recording_cuda_graph():
                for _ in range(self.warmup_iters):
                    check_output(fn(input_ids, attention_mask), input_ids)
            caller.wait_stream(side)

            graph = self._new_graph()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream), recording_cuda_graph():
                    output = fn(input_ids, attention_mask)
            except RuntimeError as error:
                raise RuntimeError(
                    f"GraphedEncoder: capturing the {tuple(input_ids.shape)} bucket failed: {error}\n"
                    "A callable that reads tensor values on the host (.item(), bool(tensor), nonzero, the model's "
                    "unpadded path without a given packing) or moves data from the CPU cannot be captured; run the "
                    "model in its padded layout (model.encode(ids, mask, unpad=False), or model.set_unpadding(False)), "
                    "or unpadded on a static packing (model.graphed_encoder(unpadded=True))"
                ) from error
            output = check_output(output, input_ids)
            if self.graph_hook is not None:
                self.graph_hook(graph.raw_cuda_graph())
                graph.instantiate()
        return _GraphCaptured(graph, output)
