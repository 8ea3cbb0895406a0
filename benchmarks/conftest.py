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


_COPY_BANDWIDTH: dict[tuple[str, int], float] = {}
DRAM_COPY_BYTES = 512 * 2**20  # read 256 MiB + write 256 MiB: far beyond any L2, so DRAM bound


def copy_bandwidth(device: torch.device, bytes_moved: int = DRAM_COPY_BYTES) -> float:
    """Bytes/s of a device-to-device copy that reads ``bytes_moved / 2`` bytes and writes as many (measured
    once per size and session): the roofline that memory-bound kernels are reported against."""
    key = (str(device), bytes_moved)
    if key not in _COPY_BANDWIDTH:
        copy, moved = copy_step(device, bytes_moved)
        _COPY_BANDWIDTH[key] = moved / median_seconds(synchronised(copy, device), runs=20)
    return _COPY_BANDWIDTH[key]


def copy_step(device: torch.device, bytes_moved: int) -> tuple[Callable, int]:
    """A device-to-device copy reading ``bytes_moved / 2`` bytes and writing as many, and the bytes it moves."""
    source = torch.empty(max(1, bytes_moved // 2), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return (lambda: target.copy_(source)), 2 * source.numel()


L2_FLUSH_BYTES = 256 * 2**20  # written before each timed call: more than any GPU's L2, so inputs come from DRAM
SM_CLOCK_HZ_CEILING = 2.0e9  # above an H100/H200's boost clock: a spin of n cycles lasts at least n / this


def device_and_host_seconds(fn: Callable, reps: int = 20) -> tuple[float, float]:
    """(median GPU time of ``fn``, its host time to enqueue) in seconds: ``fn`` (not synchronised) timed
    between CUDA events, from DRAM, without launch gaps.

    Before each timed call the L2 cache is overwritten, then the GPU spins (``torch.cuda._sleep``) for twice
    the host time that enqueuing ``fn`` takes, so that every kernel of ``fn`` is queued before the start event
    fires. (Triton's do_bench leaves only the cache flush, ~85 us, as a head start: an op whose launches take
    longer, a forward+backward through autograd for one, would be timed with the host's gaps between its
    kernels.) What is left is what the kernels take, as they would in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        fn()
    host_seconds = (time.perf_counter() - start) / 5
    torch.cuda.synchronize()
    spin_cycles = int(2 * host_seconds * SM_CLOCK_HZ_CEILING)
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        flush.zero_()
        torch.cuda._sleep(spin_cycles)
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in events) / 1e3, host_seconds


@pytest.fixture
def record_bandwidth():
    """record_bandwidth(benchmark, medians, bytes_moved, device, steps=None, baseline="torch"): achieved GB/s
    of each contender for the minimum traffic ``bytes_moved``, as a % of a copy moving the same bytes (a fair
    roofline whatever the size: small cases fit in L2 or cache, and so does their copy) and of a DRAM-sized
    copy. ``medians`` are wall-clock (launch and synchronisation included, as an eager caller sees them). On
    CUDA, ``steps`` (the contenders without synchronisation) are also timed on the device itself
    (device_and_host_seconds: cold L2, no launch gaps), against a copy of the same bytes timed the same way:
    the figures the bandwidth targets are read from."""

    def _record(benchmark, medians, bytes_moved: int, device: torch.device, steps=None, baseline="torch") -> None:
        same_size, dram = copy_bandwidth(device, bytes_moved), copy_bandwidth(device)
        info = benchmark.extra_info
        info["minimum_bytes"] = bytes_moved
        info["copy_bandwidth_gb_per_s"] = round(same_size / 1e9, 1)
        info["dram_copy_bandwidth_gb_per_s"] = round(dram / 1e9, 1)
        info["achieved_gb_per_s"] = {n: round(bytes_moved / m / 1e9, 1) for n, m in medians.items()}
        info["percent_of_copy_bandwidth"] = {n: round(100 * bytes_moved / m / same_size, 1) for n, m in medians.items()}
        info["percent_of_dram_copy_bandwidth"] = {n: round(100 * bytes_moved / m / dram, 1) for n, m in medians.items()}
        if device.type == "cuda" and steps:
            try:  # a failure here must not lose the wall-clock figures above
                _record_device_times(info, steps, bytes_moved, device, baseline)
            except Exception as error:  # noqa: BLE001 - reported in the results
                info["device_timing_error"] = f"{type(error).__name__}: {str(error)[:300]}"

    return _record


def _record_device_times(info: dict, steps: dict[str, Callable], bytes_moved: int, device, baseline: str) -> None:
    copy_fn, copied = copy_step(device, bytes_moved)
    copy = copied / device_and_host_seconds(copy_fn)[0]
    measured = {name: device_and_host_seconds(step) for name, step in steps.items()}
    times = {name: device for name, (device, _host) in measured.items()}
    info["device_median_us"] = {n: round(t * 1e6, 2) for n, t in times.items()}
    # Above the device time, an eager caller waits for the host: what a CUDA graph would save.
    info["host_launch_us"] = {n: round(host * 1e6, 2) for n, (_device, host) in measured.items()}
    info["device_copy_bandwidth_gb_per_s"] = round(copy / 1e9, 1)
    info["device_percent_of_copy_bandwidth"] = {n: round(100 * bytes_moved / t / copy, 1) for n, t in times.items()}
    if baseline in times:
        info[f"device_speedup_vs_{baseline}"] = {
            n: round(times[baseline] / t, 3) for n, t in times.items() if n != baseline
        }


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


def kernel_profile(step: Callable, activity: str = "cuda", top: int = 12) -> dict:
    """Where one run of ``step`` spends its device time (torch.profiler): the summed time of every kernel, and
    the ``top`` kernels by total time as "name: ms (calls)". Against the step's wall-clock median this says
    whether it is bound by the GPU (kernel time close to it) or by the host launching kernels (far below)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA if activity == "cuda" else ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        step()
        if activity == "cuda":
            torch.cuda.synchronize()

    def device_us(event) -> float:  # torch renamed cuda_time_total to device_time_total; CPU runs use cpu_time
        if activity != "cuda":
            return event.self_cpu_time_total
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    rows = sorted(((device_us(e), e.key, e.count) for e in profiler.key_averages()), reverse=True)
    rows = [row for row in rows if row[0] > 0]
    return {
        "kernel_ms": round(sum(us for us, _, _ in rows) / 1e3, 3),
        "kernels": sum(calls for _, _, calls in rows),  # launches (or graph nodes) that ran: a latency floor's count
        "top": [f"{_shortened(name)}: {us / 1e3:.3f} ms ({calls})" for us, name, calls in rows[:top]],
    }


def range_times(step: Callable, names: tuple[str, ...], activity: str = "cuda") -> dict[str, float]:
    """The device time (ms; on the CPU its time) of the kernels each ``torch.profiler.record_function`` range
    named in ``names`` launched in one run of ``step``, its nested ops' included (FunctionEvent's
    device_time_total), and under "all" that of every kernel (on the CPU: every outermost op): where a step's
    GPU time goes, phase by phase. Ops that another thread runs (autograd's backward on a GPU) are not inside a
    range opened in this one."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if activity == "cuda" else [])]
    with profile(activities=activities) as profiler:
        step()
        if activity == "cuda":
            torch.cuda.synchronize()
    totals = dict.fromkeys((*names, "all"), 0.0)
    for event in profiler.events():
        on_host = event.device_type == torch.autograd.DeviceType.CPU
        if on_host and event.name in names:
            totals[event.name] += event.device_time_total if activity == "cuda" else event.cpu_time_total
        if activity == "cuda" and not on_host and not getattr(event, "is_user_annotation", False):
            totals["all"] += event.device_time_total  # a kernel, copy or memset (a range's GPU span is not)
        elif activity != "cuda" and event.cpu_parent is None:
            totals["all"] += event.cpu_time_total
    return {name: round(us / 1e3, 3) for name, us in totals.items()}


KERNEL_NAME_CHARACTERS = 160  # a templated kernel's name runs to thousands; its start says what it does


def _shortened(name: str) -> str:
    return name if len(name) <= KERNEL_NAME_CHARACTERS else name[: KERNEL_NAME_CHARACTERS - 3] + "..."


def host_syncs(step: Callable) -> dict:
    """How many times one run of ``step`` makes the host wait for the GPU (``item()``, ``nonzero``, boolean
    indexing, copies to the host...), as torch's CUDA sync debug mode reports them, and where (see
    sync_warnings). ``step`` should not end with a synchronisation of its own."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        found = sync_warnings(step)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return found


def sync_warnings(step: Callable, top: int = 8) -> dict:
    """{"count": warnings about a synchronising operation raised while ``step`` runs, "where": the code that
    called each (file name:line of the innermost frame outside torch and this file), most frequent first}."""
    import os
    import traceback
    import warnings
    from collections import Counter

    places: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        outside = [
            frame for frame in traceback.extract_stack()[:-1]
            if f"{os.sep}torch{os.sep}" not in frame.filename and frame.filename not in (__file__, warnings.__file__)
        ]  # fmt: skip
        frame = outside[-1] if outside else traceback.FrameSummary(filename, lineno, "?")
        places[f"{os.path.basename(frame.filename)}:{frame.lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        step()
    return {"count": sum(places.values()), "where": dict(places.most_common(top))}


def _recorder(prefix: str, measure: Callable[[Callable], object]) -> Callable:
    """record(benchmark, name, step): extra_info["<prefix>_<name>"] = measure(step); a failure (a profiler or
    debug mode the machine does not support) is recorded instead of failing the benchmark."""

    def _record(benchmark, name: str, step: Callable) -> None:
        try:
            benchmark.extra_info[f"{prefix}_{name}"] = measure(step)
        except Exception as error:  # noqa: BLE001 - reported in the results
            benchmark.extra_info[f"{prefix}_{name}"] = f"{type(error).__name__}: {str(error)[:200]}"

    return _record


@pytest.fixture
def record_host_syncs():
    """record_host_syncs(benchmark, name, step): extra_info["host_syncs_<name>"] = host_syncs(step) (CUDA)."""
    return _recorder("host_syncs", host_syncs)


@pytest.fixture
def record_kernel_profile():
    """record_kernel_profile(benchmark, name, step): extra_info["profile_<name>"] = kernel_profile(step) (CUDA)."""
    return _recorder("profile", kernel_profile)


@pytest.fixture
def record_phase_times():
    """record_phase_times(benchmark, name, measure): extra_info["phase_ms_<name>"] = measure(range_times), a
    failure recorded instead (see range_times)."""
    return _recorder("phase_ms", lambda measure: measure(range_times))


@pytest.fixture(scope="session")
def with_setting():
    """with_setting(module, name, value, step): ``step`` run with ``module.name`` set to ``value`` (restored after
    each call): a contender for a kernel module's design switch (e.g. kernels/adapter_bottleneck.py's
    BACKWARD_PATH) timed beside its default."""

    def _with_setting(module, name: str, value, step: Callable) -> Callable:
        def run():
            default = getattr(module, name)
            setattr(module, name, value)
            try:
                return step()
            finally:
                setattr(module, name, default)

        return run

    return _with_setting


@pytest.fixture(scope="session")
def describe_device():
    return device_name


@pytest.fixture(scope="session")
def sync():
    return synchronised


@pytest.fixture
def time_launch_candidates(benchmark, compare, record_bandwidth):
    """time_launch_candidates(steps, minimum_bytes, group, rounds=50, **info): a kernel sweep on CUDA, ``steps``
    (candidate name -> unsynchronised call, one of them "default") timed interleaved against "default" (which
    pytest-benchmark also times), with the bandwidth of each for ``minimum_bytes`` (device time included, the
    figure a sweep is read from). ``info`` goes to compare (shape, dtype, backend...)."""

    def _time(steps: dict[str, Callable], minimum_bytes: int, group: str, rounds: int = 50, **info) -> None:
        device = torch.device("cuda")
        contenders = {name: synchronised(step, device) for name, step in steps.items()}
        benchmark.pedantic(contenders["default"], rounds=rounds, warmup_rounds=5)
        medians = compare(benchmark, group=group, contenders=contenders, baseline="default", flops=None,
                          rounds=rounds, device=device_name(device), **info)  # fmt: skip
        record_bandwidth(benchmark, medians, minimum_bytes, device, steps, baseline="default")

    return _time


@pytest.fixture
def time_loss_backends(benchmark, compare, record_bandwidth):
    """time_loss_backends(loss_of, student, minimum_bytes, group, rounds=50, **info) -> medians: a loss op's
    forward+backward, the gradient of ``loss_of(backend)`` (a tensor, or a tuple of tensors summed) with respect
    to ``student``, "triton" timed against "torch" interleaved (the Triton one also by pytest-benchmark), with
    its bandwidth for ``minimum_bytes`` recorded. ``info`` goes to compare (shape, dtype, backend...)."""

    def _time(loss_of, student: torch.Tensor, minimum_bytes: int, group: str, rounds: int = 50, **info):
        def step_of(backend):
            def step():
                loss = loss_of(backend)
                return torch.autograd.grad(sum(loss) if isinstance(loss, tuple) else loss, student)

            return step

        steps = {"triton": step_of("triton"), "torch": step_of("torch")}
        contenders = {name: synchronised(step, student.device) for name, step in steps.items()}
        benchmark.pedantic(contenders["triton"], rounds=rounds, warmup_rounds=3)
        medians = compare(
            benchmark, group=group, contenders=contenders, baseline="torch", flops=None, rounds=rounds,
            mode="forward+backward", device=device_name(student.device), torch_version=torch.__version__, **info,
        )  # fmt: skip
        record_bandwidth(benchmark, medians, minimum_bytes, student.device, steps)
        return medians

    return _time


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Drop benchmarks stopped (by run_gpu.py's budget or pytest-timeout) before their first timed round,
    ahead of pytest-benchmark's own session end: it cannot summarise an empty sample and would raise, losing
    the --benchmark-json of every benchmark that did finish."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [
            bench for bench in benchmark_session.benchmarks if getattr(getattr(bench, "stats", None), "data", None)
        ]
    yield


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
