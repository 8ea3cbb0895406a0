"""The switches the GPU benchmarks turn on for their experimental contenders (benchmarks/test_encoder_forward_gpu.py)
still name real settings with allowed values: a renamed switch would otherwise fail only on a GPU machine, as an
"unavailable" contender, or worse patch nothing and time the default twice."""

from __future__ import annotations

import importlib.util
import sys
import unittest.mock
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "test_encoder_forward_gpu.py"


@pytest.fixture(scope="module")
def benchmark_module():
    spec = importlib.util.spec_from_file_location("encoder_forward_gpu_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name)


def test_attention_switches_name_settings_and_allowed_values(benchmark_module):
    from fastmini.ops import attention

    for (name, value), allowed in (
        (benchmark_module.CUDNN_VARLEN, attention.VARLEN_KERNELS),
        (benchmark_module.ADDITIVE_SDPA_MASK, attention.SDPA_MASKS),
    ):
        assert hasattr(attention, name) and value in allowed and getattr(attention, name) != value


def test_the_rows_adapter_switch_reaches_the_kernel_module(benchmark_module):
    from fastmini.kernels import adapter_bottleneck as kernels

    target, value = benchmark_module.ROWS_ADAPTER_KERNEL
    assert kernels.ROWS_KERNEL_UP_TO == 0 and value >= 128  # the (1, 128) latency group's 128 rows take it
    with unittest.mock.patch(target, value):
        assert kernels.ROWS_KERNEL_UP_TO == value
    assert kernels.ROWS_KERNEL_UP_TO == 0


def test_the_fused_norm_switch_patches_the_op_module(benchmark_module):
    import importlib

    module = importlib.import_module("fastmini.ops.add_layer_norm_adapter")
    assert module._VERIFIED_ON_GPU == ()
    with benchmark_module.fused_norm_adapters():
        assert module._VERIFIED_ON_GPU == ("triton",)
    with benchmark_module.all_latency_experiments():
        assert module._VERIFIED_ON_GPU == ("triton",)
        from fastmini.kernels import adapter_bottleneck as kernels

        from fastmini.ops import attention

        assert kernels.ROWS_KERNEL_UP_TO > 0 and attention.SDPA_MASK == "additive"
    with benchmark_module.all_ragged_experiments():
        assert module._VERIFIED_ON_GPU == ("triton",) and attention.VARLEN_KERNEL == "cudnn"
    assert module._VERIFIED_ON_GPU == () and attention.SDPA_MASK == "bool" and attention.VARLEN_KERNEL == "flash"
