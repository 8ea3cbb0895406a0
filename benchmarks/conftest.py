"""Benchmark bookkeeping (DESIGN.md, Benchmarks).

pytest-benchmark times fastmini's implementation; ``compare`` then times it against its
baselines *interleaved* (a, b, a, b, ...) in the same process, so that a noisy shared machine
slows every contender alike and the ratio stays meaningful. The session ends with a table of
those ratios, of useful GFLOP/s (and their share of the measured matmul rate where recorded) and of
useful tokens/s (padding excluded) where given.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch

_RESULTS: dict[str, dict] = {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def synchronised(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device synchronisation, so that timings include the GPU work."""
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


@pytest.fixture
def compare():
    """compare(benchmark, group, contenders, baseline, flops, rounds, useful_tokens=None, **info) -> medians
    in seconds. ``flops`` and ``useful_tokens`` count useful work (padding excluded); either may be None."""

    def _compare(
        benchmark,
        group: str,
        contenders: dict[str, Callable],
        baseline: str,
        flops: int | None,
        rounds: int,
        useful_tokens: int | None = None,
        **info,
    ) -> dict[str, float]:
        for fn in contenders.values():
            fn()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for round_index in range(rounds):
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                start = time.perf_counter()
                contenders[name]()
                samples[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        _RESULTS[group] = {"medians": medians, "baseline": baseline, "flops": flops, "tokens": useful_tokens}
        benchmark.extra_info.update(info)
        benchmark.extra_info["interleaved_median_ms"] = {name: round(m * 1e3, 3) for name, m in medians.items()}
        benchmark.extra_info["speedup_vs_" + baseline] = {
            name: round(medians[baseline] / m, 3) for name, m in medians.items() if name != baseline
        }
        if flops is not None:
            benchmark.extra_info["useful_gflop_per_s"] = {
                name: round(flops / m / 1e9, 1) for name, m in medians.items()
            }
        if useful_tokens is not None:
            benchmark.extra_info["useful_tokens"] = useful_tokens
            benchmark.extra_info["useful_tokens_per_s"] = {n: round(useful_tokens / m) for n, m in medians.items()}
        return medians

    return _compare


def median_seconds(fn: Callable, runs: int, warmups: int = 3) -> float:
    """Median wall time of ``fn`` (synchronised by the caller) over ``runs`` calls after ``warmups``."""
    for _ in range(warmups):
        fn()
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


_COPY_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 256 MiB (measured once per session): the roofline
    that memory-bound kernels are reported against."""
    key = str(device)
    if key not in _COPY_BANDWIDTH:
        source = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        copy = synchronised(lambda: target.copy_(source), device)
        _COPY_BANDWIDTH[key] = 2 * source.numel() / median_seconds(copy, runs=20)  # read + write
    return _COPY_BANDWIDTH[key]


@pytest.fixture
def record_bandwidth():
    """record_bandwidth(benchmark, medians, bytes_moved, device): achieved GB/s of each contender
    for the minimum traffic ``bytes_moved``, and its % of the measured copy bandwidth."""

    def _record(benchmark, medians: dict[str, float], bytes_moved: int, device: torch.device) -> None:
        bandwidth = copy_bandwidth(device)
        benchmark.extra_info["minimum_bytes"] = bytes_moved
        benchmark.extra_info["copy_bandwidth_gb_per_s"] = round(bandwidth / 1e9, 1)
        benchmark.extra_info["achieved_gb_per_s"] = {n: round(bytes_moved / m / 1e9, 1) for n, m in medians.items()}
        benchmark.extra_info["percent_of_copy_bandwidth"] = {
            n: round(100 * bytes_moved / m / bandwidth, 1) for n, m in medians.items()
        }

    return _record


_MATMUL_RATE: dict[tuple, float] = {}


def matmul_rate(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    """FLOP/s of an (m, k) @ (k, n) matmul on random data (median of 10 after 3 warm-ups, measured once per
    session and shape): the roofline that GEMM-bound work is reported against (sgemm for fp32 on a CPU)."""
    key = (str(device), dtype, m, k, n)
    if key not in _MATMUL_RATE:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        multiply = synchronised(lambda: a @ b, device)
        _MATMUL_RATE[key] = 2 * m * k * n / median_seconds(multiply, runs=10)
    return _MATMUL_RATE[key]


@pytest.fixture
def record_matmul_fraction():
    """record_matmul_fraction(benchmark, group, medians, flops, device, dtype, shape=(m, k, n)): the measured
    matmul rate and each contender's useful FLOP/s as a % of it (also in the session's summary table)."""

    def _record(benchmark, group: str, medians: dict[str, float], flops: int, device, dtype, shape) -> float:
        rate = matmul_rate(device, dtype, *shape)
        name = f"{str(dtype).removeprefix('torch.')} matmul {'x'.join(map(str, shape))}"
        benchmark.extra_info["matmul"] = f"{name}: {rate / 1e9:.1f} GFLOP/s"
        benchmark.extra_info["percent_of_matmul_rate"] = {
            n: round(100 * flops / m / rate, 1) for n, m in medians.items()
        }
        _RESULTS[group]["matmul_rate"] = rate
        return rate

    return _record


@pytest.fixture(scope="session")
def describe_device():
    return device_name


@pytest.fixture(scope="session")
def sync():
    return synchronised


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    terminalreporter.section("fastmini: interleaved medians, ratio against the baseline of the same run")
    for group, result in sorted(_RESULTS.items()):
        medians, baseline, flops, tokens = result["medians"], result["baseline"], result["flops"], result["tokens"]
        rate = result.get("matmul_rate")
        for name, median in sorted(medians.items(), key=lambda item: item[1]):
            gflops = f"{flops / median / 1e9:7.1f} GFLOP/s" if flops else ""
            gflops += f" ({100 * flops / median / rate:3.0f}% of matmul)" if flops and rate else ""
            tokens_per_s = f"  {tokens / median:9.0f} tokens/s" if tokens else ""
            ratio = medians[baseline] / median
            line = f"{group:28s} {name:20s} {median * 1e3:9.3f} ms {gflops}{tokens_per_s}  x{ratio:.2f}"
            terminalreporter.write_line(line)
