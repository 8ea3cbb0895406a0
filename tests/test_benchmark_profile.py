"""benchmarks/conftest.py's kernel_profile, on the CPU's profiler (the GPU benchmarks use CUDA's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

CONFTEST = Path(__file__).resolve().parent.parent / "benchmarks" / "conftest.py"


def load_benchmark_conftest():
    spec = importlib.util.spec_from_file_location("benchmark_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_profile_sums_the_time_and_names_the_largest_first():
    conftest = load_benchmark_conftest()
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def step():
        for _ in range(3):
            a @ b
        torch.relu(a)

    profile = conftest.kernel_profile(step, activity="cpu", top=2)
    assert profile["kernel_ms"] > 0 and len(profile["top"]) == 2
    assert profile["kernels"] >= 4  # three matmuls and a relu, at least (CPU ops count their children too)
    assert profile["top"][0].startswith("aten::") and profile["top"][0].endswith(")")
    times = [float(row.split(": ")[-1].split(" ms")[0]) for row in profile["top"]]
    assert times == sorted(times, reverse=True) and sum(times) <= profile["kernel_ms"] + 1e-3


def test_range_times_give_each_named_range_the_time_of_what_ran_inside_it():
    conftest = load_benchmark_conftest()
    a = torch.randn(384, 384)

    def step():
        with torch.profiler.record_function("outer"):
            with torch.profiler.record_function("inner"):
                for _ in range(4):
                    a @ a
            a @ a
        torch.relu(a)

    times = conftest.range_times(step, ("outer", "inner", "absent"), activity="cpu")
    assert 0 < times["inner"] < times["outer"] < times["all"] and times["absent"] == 0.0


def test_long_kernel_names_are_shortened_to_their_start():
    conftest = load_benchmark_conftest()
    templated = "void at::native::elementwise_kernel<128, 4, " + "x" * 3000 + ">"
    short = conftest._shortened(templated)
    assert len(short) == conftest.KERNEL_NAME_CHARACTERS and short.endswith("...")
    assert short.startswith("void at::native::elementwise_kernel<128, 4, ")
    assert conftest._shortened("ampere_sgemm") == "ampere_sgemm"


def test_sync_warnings_name_the_caller_of_each_synchronising_op():
    """host_syncs' bookkeeping, fed the warnings CUDA's sync debug mode raises (here raised by hand)."""
    import warnings

    conftest = load_benchmark_conftest()

    def step():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # this line, twice
        warnings.warn("something else", UserWarning, stacklevel=1)  # not a sync

    found = conftest.sync_warnings(step)
    line = step.__code__.co_firstlineno + 2
    assert found == {"count": 2, "where": {f"{Path(__file__).name}:{line}": 2}}


def test_with_setting_runs_the_step_under_the_setting_and_restores_the_default_even_on_error():
    conftest = load_benchmark_conftest()
    with_setting = conftest.with_setting.__wrapped__()  # the fixture's function, outside pytest's fixture system
    module = type("Kernels", (), {"PATH": "columns"})
    seen = []

    def step():
        seen.append(module.PATH)
        if len(seen) == 2:
            raise RuntimeError("kernel failed")
        return module.PATH

    contender = with_setting(module, "PATH", "gemm", step)
    assert contender() == "gemm" and module.PATH == "columns"
    with pytest.raises(RuntimeError, match="kernel failed"):
        contender()
    assert seen == ["gemm", "gemm"] and module.PATH == "columns"
