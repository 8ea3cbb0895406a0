"""What a call of each fused op costs the host, and what it costs the GPU at small and large row counts.

Run on a CUDA machine: ``python3 benchmarks/launch_overhead.py``. Not a pytest file: a diagnostic whose
figures decide the ops' automatic choice on CUDA (``_triton_pays_off_on_gpu`` in each fastmini/ops module;
benchmarks/results/2026-11-26-nvidia-h200-notes.md has the H200's).

- host: microseconds a call takes to enqueue, from a loop of calls on 128 rows (the GPU finishes each
  faster than the host enqueues it, so wall time / calls is host time), for an empty Triton kernel, the
  kernel's host launcher alone, its torch.library custom op and the public op;
- GPU: microseconds a call takes inside a CUDA graph (20 calls captured, replayed; no host in the way),
  torch's composition against the Triton backend, bf16, H=768 (R=48, I=3072).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_forward
from fastmini.kernels.add_layer_norm import add_layer_norm_forward

from fastmini.ops import adapter_bottleneck, add_layer_norm, linear_gelu
from fastmini.ops.adapter_bottleneck import _adapter_bottleneck_torch

HIDDEN, BOTTLENECK, INTERMEDIATE, EPS = 768, 48, 3072, 1e-12
ROW_COUNTS = (128, 1024, 2048, 4096, 8192, 16384)


@triton.jit
def _empty_kernel(pointer):
    pass


@triton.jit
def _empty_kernel_20_arguments(a, b, c, d, e, f, g, h, i, j, k, m, n, o, p, q, r, s, t, u, BLOCK: tl.constexpr):
    pass


def host_microseconds(fn, calls: int = 1000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_microseconds(fn, calls: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and allocates outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def inputs(rows: int) -> dict[str, torch.Tensor]:
    new = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        x=torch.randn(rows, HIDDEN, **new),
        residual=torch.randn(rows, HIDDEN, **new),
        norm_weight=torch.ones(HIDDEN, **new),
        norm_bias=torch.zeros(HIDDEN, **new),
        down_weight=torch.randn(BOTTLENECK, HIDDEN, **new) * 0.02,
        down_bias=torch.zeros(BOTTLENECK, **new),
        up_weight=torch.randn(HIDDEN, BOTTLENECK, **new) * 0.02,
        up_bias=torch.zeros(HIDDEN, **new),
        ffn_weight=torch.randn(INTERMEDIATE, HIDDEN, **new) * 0.02,
        ffn_bias=torch.zeros(INTERMEDIATE, **new),
    )


ADAPTER_PARAMETERS = ("down_weight", "down_bias", "up_weight", "up_bias", "norm_weight", "norm_bias")


def add_layer_norm_call(t: dict, backend: str):
    return lambda: add_layer_norm(t["x"], t["residual"], t["norm_weight"], t["norm_bias"], EPS, backend=backend)


def adapter_call(t: dict, backend: str):
    parameters = [t[name] for name in ADAPTER_PARAMETERS]
    return lambda: adapter_bottleneck(t["x"], *parameters, EPS, backend=backend)


def linear_gelu_call(t: dict, backend: str):
    return lambda: linear_gelu(t["x"], t["ffn_weight"], t["ffn_bias"], backend=backend)


def report_host_costs() -> None:
    t = inputs(128)
    x, residual, weight, bias = t["x"], t["residual"], t["norm_weight"], t["norm_bias"]
    one = torch.empty(1, device="cuda")
    forward_op = torch.ops.fastmini.add_layer_norm_forward
    adapter_parameters = [t[name] for name in ADAPTER_PARAMETERS]
    costs = {
        "empty Triton kernel, 1 argument": lambda: _empty_kernel[(1,)](one),
        "empty Triton kernel, 20 arguments": lambda: _empty_kernel_20_arguments[(1,)](*[one] * 10, *[1] * 10, BLOCK=16),
        "torch x + 1": lambda: one + 1,
        "add_layer_norm: torch add + F.layer_norm": lambda: F.layer_norm(x + residual, (HIDDEN,), weight, bias, EPS),
        "add_layer_norm: Triton host launcher": lambda: add_layer_norm_forward(
            x, residual, weight, bias, EPS, 0.0, 0, False
        ),
        "add_layer_norm: custom op": lambda: forward_op(x, residual, weight, bias, EPS, 0.0, None, False),
        "add_layer_norm: public op, triton": add_layer_norm_call(t, "triton"),
        "adapter_bottleneck: public op, torch": adapter_call(t, "torch"),
        "adapter_bottleneck: Triton host launcher": lambda: adapter_bottleneck_forward(
            x, *adapter_parameters, EPS, False
        ),
        "adapter_bottleneck: public op, triton": adapter_call(t, "triton"),
    }
    print("host cost of one call, 128 rows, bf16 (us):")
    for name, fn in costs.items():
        print(f"  {name:45s} {host_microseconds(fn):8.1f}", flush=True)


def adapter_fused_norm_call(t: dict, backend: str):
    """The adapter as the automatic choice runs it in a CUDA graph: torch's ops closing in add_layer_norm's
    fused kernel (fastmini.ops.adapter_bottleneck._triton_pays_off_on_gpu weighs the kernel against this)."""
    if backend == "triton":
        return adapter_call(t, backend)
    parameters = [t[name] for name in ADAPTER_PARAMETERS]
    return lambda: _adapter_bottleneck_torch(t["x"], *parameters, EPS, norm_backend="triton")


def report_device_times() -> None:
    print("GPU time of one call inside a CUDA graph, bf16 (us): torch / triton (ratio)")
    calls = {
        "add_layer_norm": add_layer_norm_call,
        "adapter_bottleneck": adapter_call,
        "adapter, fused LN": adapter_fused_norm_call,
        "linear_gelu": linear_gelu_call,
    }
    for rows in ROW_COUNTS:
        t = inputs(rows)
        for name, call in calls.items():
            torch_us, triton_us = graph_microseconds(call(t, "torch")), graph_microseconds(call(t, "triton"))
            print(f"  rows={rows:6d} {name:20s} {torch_us:8.2f} / {triton_us:8.2f} ({triton_us / torch_us:.2f})")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead.py needs a CUDA device")
    report_host_costs()
    report_device_times()
