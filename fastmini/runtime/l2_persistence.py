"""Keep one device buffer resident in L2 through a persisting access-policy window (sm_80+).

The shared layer's weights are read N times per forward (~14 MB in bf16 at H=768, against 50 MB
of L2 on an H100); a persisting window asks L2 to keep them over the activations that stream
through between recursions. Usage::

    packed = pack_parameters(model.encoder.shared_layer)       # one contiguous buffer
    stream = torch.cuda.Stream()
    with persist_in_l2(packed.buffer, stream=stream) as window, torch.cuda.stream(stream):
        hidden = model(...)                                     # eager kernels on `stream`
        # and for CUDA graphs, put the window on every captured kernel node: capture and serve while the
        # window lives (after the `with`, apply_to_graph refuses: the window is removed)
        encoder = GraphedEncoder(fn, capture=CudaGraphCapture(graph_hook=window.apply_to_graph))
        hidden = encoder(input_ids, attention_mask)

``persist_in_l2`` reserves persisting L2 for this process's CUDA context (``cudaDeviceSetLimit(
cudaLimitPersistingL2CacheSize)``, clamped to the device's maximum; nothing about the card's own
settings changes, and it ends with the process), then sets the window on the stream.
``remove()`` (or leaving the ``with``) clears the stream windows it set, demotes persisting lines
(``cudaCtxResetPersistingL2Cache``) and restores the previous limit; windows already written into
captured graphs stay there until those graphs are dropped (``GraphedEncoder.reset()``).

The window needs a non-default stream: torch's default stream is CUDA's legacy NULL stream, a
virtual stream that cannot carry attributes of its own.

Its ``gpu`` tests passed on an H200 (2026-11-26), and there it did not pay: the graphed encoder with the
window ran (1, 128) in 0.606 ms against 0.608 ms without, (128, 128) in 4.80 ms against 4.78 ms
(benchmarks/results/2026-11-26-nvidia-h200.md). With nothing else competing for the 60 MB L2, LRU already
keeps the shared layer's ~14 MB of bf16 weights resident; the window is for serving next to other work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from fastmini.runtime.extension import load_l2_extension


@dataclass(frozen=True)
class WindowPlan:
    window_bytes: int  # covered by the window (clamped to the device's maximum window)
    reserve_bytes: int  # persisting L2 to ask for (clamped to the device's maximum)
    hit_ratio: float


def plan_window(
    num_bytes: int,
    max_window_bytes: int,
    max_persisting_bytes: int,
    hit_ratio: float | None = None,
    reserve_bytes: int | None = None,
) -> WindowPlan:
    """Sizes for one window. By default the reservation is as large as the window allows and
    ``hit_ratio = reserve / window`` (at most 1): when the window is larger than the set-aside,
    marking every access persisting would make the persisting lines evict each other (CUDA
    Programming Guide, "L2 Cache Control", hitRatio), so only that fraction is marked."""
    if num_bytes <= 0:
        raise ValueError(f"L2 window: num_bytes must be positive, got {num_bytes}")
    if max_persisting_bytes <= 0 or max_window_bytes <= 0:
        raise RuntimeError("L2 window: this device has no persisting L2 (needs compute capability 8.0 or newer)")
    window = min(num_bytes, max_window_bytes)
    reserve = min(window if reserve_bytes is None else reserve_bytes, max_persisting_bytes)
    if reserve <= 0:
        raise ValueError(f"L2 window: reserve_bytes must be positive, got {reserve_bytes}")
    if hit_ratio is None:
        hit_ratio = min(1.0, reserve / window)
    elif not 0.0 < hit_ratio <= 1.0:
        raise ValueError(f"L2 window: hit_ratio must lie in (0, 1], got {hit_ratio}")
    return WindowPlan(window, reserve, float(hit_ratio))


def _stream_handle(stream: torch.cuda.Stream, device: torch.device) -> int:
    if stream.cuda_stream == 0:
        raise ValueError(
            "L2 window: torch's default stream is CUDA's legacy NULL stream, which takes no access-policy "
            "window; run the model on a stream of its own (torch.cuda.Stream()) and pass it"
        )
    # The extension sets the attribute under the window's device's context; a stream of another device would
    # carry an address range that means nothing there.
    if torch.device(stream.device) != device:
        raise ValueError(
            f"L2 window: the window is on {device}, the stream on {stream.device}; pass a stream of {device}"
        )
    return stream.cuda_stream


@dataclass
class L2Window:
    """An applied window; a context manager that removes it on exit. One lives on a device at a time
    (``persist_range_in_l2`` refuses a second): a CUDA context has one persisting-L2 limit and one set of
    persisting lines, which a second window would shrink and whose removal would reset for both."""

    device: torch.device
    base_ptr: int
    plan: WindowPlan
    reserved_bytes: int  # what the context reports after the reservation
    previous_limit_bytes: int
    streams: list[torch.cuda.Stream] = field(default_factory=list)
    active: bool = True

    def _ext(self):
        if not self.active:
            raise RuntimeError("L2 window: already removed")
        return load_l2_extension()

    def apply_to_stream(self, stream: torch.cuda.Stream) -> None:
        """Later kernels launched on ``stream`` get the window."""
        handle = _stream_handle(stream, self.device)
        self._ext().set_stream_window(
            self.device.index, handle, self.base_ptr, self.plan.window_bytes, self.plan.hit_ratio
        )
        self.streams.append(stream)

    def apply_to_graph(self, raw_graph: int) -> int:
        """The window on every kernel node of a captured, not yet instantiated graph
        (``CUDAGraph(keep_graph=True).raw_cuda_graph()``); returns the number of kernel nodes.
        This is ``CudaGraphCapture``'s ``graph_hook``."""
        return self._ext().set_graph_window(
            self.device.index, raw_graph, self.base_ptr, self.plan.window_bytes, self.plan.hit_ratio
        )

    def remove(self) -> None:
        """Clear the stream windows, demote persisting lines, restore the previous limit. Idempotent."""
        if not self.active:
            return
        ext = load_l2_extension()
        index = self.device.index
        for stream in self.streams:
            ext.set_stream_window(index, stream.cuda_stream, 0, 0, 0.0)
        ext.reset_persisting_lines(index)
        ext.set_persisting_l2_limit(index, self.previous_limit_bytes)
        self.streams.clear()
        self.active = False
        if _live_windows.get(index) is self:
            del _live_windows[index]

    def __enter__(self) -> L2Window:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


_live_windows: dict[int, L2Window] = {}  # device index -> its live window (see L2Window)


def live_l2_window(device: torch.device | int | str | None = None) -> L2Window | None:
    """The device's live window, if any: what a caller that lost its window object removes (``.remove()``) before
    it can set another."""
    return _live_windows.get(_device(device).index)


def l2_limits(device: torch.device | int | str | None = None) -> dict[str, int]:
    """The device's L2 size, maximum persisting set-aside, maximum window and the current limit."""
    ext = load_l2_extension()
    return dict(ext.device_limits(_device(device).index))


def _device(device: torch.device | int | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"L2 window: needs a CUDA device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def persist_in_l2(
    buffer: torch.Tensor,
    *,
    stream: torch.cuda.Stream | None = None,
    hit_ratio: float | None = None,
    reserve_bytes: int | None = None,
) -> L2Window:
    """Reserve persisting L2 and put a window over ``buffer`` (contiguous, on a CUDA device).

    ``stream``: the stream whose later kernels get the window (None: no stream; use
    ``apply_to_stream`` / ``apply_to_graph`` on the returned window). ``hit_ratio`` and
    ``reserve_bytes`` default as ``plan_window`` explains.
    """
    if not isinstance(buffer, torch.Tensor):
        raise TypeError(f"persist_in_l2: expected a tensor, got {type(buffer).__name__}")
    if not buffer.is_cuda:
        raise RuntimeError(f"persist_in_l2: needs a CUDA tensor, got one on {buffer.device}")
    if not buffer.is_contiguous() or buffer.numel() == 0:
        raise ValueError("persist_in_l2: the buffer must be contiguous and non-empty (see pack_parameters)")
    return persist_range_in_l2(
        buffer.device,
        buffer.data_ptr(),
        buffer.numel() * buffer.element_size(),
        stream=stream,
        hit_ratio=hit_ratio,
        reserve_bytes=reserve_bytes,
    )


def persist_range_in_l2(
    device: torch.device | int | str,
    base_ptr: int,
    num_bytes: int,
    *,
    stream: torch.cuda.Stream | None = None,
    hit_ratio: float | None = None,
    reserve_bytes: int | None = None,
) -> L2Window:
    """``persist_in_l2`` over a raw device address range (e.g. a slice of a larger allocation)."""
    device = _device(device)
    live = _live_windows.get(device.index)
    if live is not None:
        raise RuntimeError(
            f"persist_in_l2: {device} already has a live L2 window ({live.plan.window_bytes} bytes at "
            f"{live.base_ptr:#x}); remove it first (window.remove(), or leave its `with` block; "
            "fastmini.runtime.live_l2_window(device) gives it back): the CUDA context has one persisting-L2 "
            "limit, which two windows would fight over (pack what both need into one buffer)"
        )
    if stream is not None:
        _stream_handle(stream, device)  # refuse the default stream or another device's before changing anything
    ext = load_l2_extension()
    limits = ext.device_limits(device.index)
    plan = plan_window(
        num_bytes, limits["max_window_bytes"], limits["max_persisting_l2_bytes"], hit_ratio, reserve_bytes
    )
    reserved = ext.set_persisting_l2_limit(device.index, plan.reserve_bytes)
    if reserved == 0:
        warnings.warn(
            "persist_in_l2: the CUDA context reports no persisting L2 after the reservation (MIG and MPS do not "
            "let a process reserve it); the window will have no effect",
            RuntimeWarning,
            stacklevel=3,
        )
    elif hit_ratio is None and reserved < plan.reserve_bytes:  # granted less than asked: mark less
        plan = replace(plan, hit_ratio=min(1.0, reserved / plan.window_bytes))
    window = L2Window(device, base_ptr, plan, reserved, limits["persisting_l2_limit_bytes"])
    _live_windows[device.index] = window
    if stream is not None:
        try:
            window.apply_to_stream(stream)
        except Exception:
            window.remove()  # give the reservation back
            raise
    return window


def count_graph_window_nodes(
    raw_graph: int, base_ptr: int, device: torch.device | int | None = None
) -> tuple[int, int]:
    """(kernel nodes, kernel nodes carrying a window at ``base_ptr``) of a kept graph: a diagnostic
    for whether a window reached a graph (by stream capture or by ``apply_to_graph``)."""
    return tuple(load_l2_extension().count_graph_window_nodes(_device(device).index, raw_graph, base_ptr))
