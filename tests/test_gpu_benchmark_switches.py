"""The switches the GPU benchmarks turn on for their experimental contenders (benchmarks/test_encoder_forward_gpu.py)
still name real settings with allowed values: a renamed switch would otherwise fail only on a GPU machine, as an
"unavailable" contender, or worse patch nothing and time the default twice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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

    for (owner, name, value), allowed in (
        (benchmark_module.CUDNN_VARLEN, attention.VARLEN_KERNELS),
        (benchmark_module.BOOL_SDPA_MASK, attention.SDPA_MASKS),
    ):
        assert (
            owner is attention and hasattr(attention, name) and value in allowed and getattr(attention, name) != value
        )


def test_the_rows_adapter_switch_reaches_the_kernel_module(benchmark_module):
    from fastmini.kernels import adapter_bottleneck as kernels

    owner, name, value = benchmark_module.ROWS_ADAPTER_KERNEL
    assert owner is kernels and kernels.ROWS_KERNEL_UP_TO == 0 and value >= 128  # (1, 128)'s 128 rows take it
    with benchmark_module.Settings(benchmark_module.ROWS_ADAPTER_KERNEL):
        assert kernels.ROWS_KERNEL_UP_TO == value
    assert kernels.ROWS_KERNEL_UP_TO == 0


def test_settings_are_restored_even_when_the_call_fails(benchmark_module):
    from fastmini.ops import attention

    with pytest.raises(RuntimeError, match="inside"):
        with benchmark_module.Settings(benchmark_module.BOOL_SDPA_MASK, benchmark_module.CUDNN_VARLEN):
            assert attention.SDPA_MASK == "bool" and attention.VARLEN_KERNEL == "cudnn"
            raise RuntimeError("inside")
    assert attention.SDPA_MASK == "additive" and attention.VARLEN_KERNEL == "flash"


def test_the_fused_norm_switch_patches_the_op_module(benchmark_module):
    import importlib

    module = importlib.import_module("fastmini.ops.add_layer_norm_adapter")
    rule = module._adapter_kernel_pays_off_on_gpu
    assert module._VERIFIED_ON_GPU == ()
    with benchmark_module.fused_norm_adapters():
        assert module._VERIFIED_ON_GPU == ("triton",)
    with benchmark_module.all_latency_experiments():
        assert module._VERIFIED_ON_GPU == ("triton",)
        from fastmini.kernels import adapter_bottleneck as kernels

        from fastmini.ops import attention

        assert kernels.ROWS_KERNEL_UP_TO > 0
    with benchmark_module.all_ragged_experiments():
        assert module._VERIFIED_ON_GPU == ("triton",) and attention.VARLEN_KERNEL == "cudnn"
    assert module._VERIFIED_ON_GPU == () and kernels.ROWS_KERNEL_UP_TO == 0 and attention.VARLEN_KERNEL == "flash"
    assert module._adapter_kernel_pays_off_on_gpu is rule


@pytest.mark.parametrize("rows", [128, 4352, 4608])
def test_under_the_fused_norm_switch_a_recorded_graph_takes_the_fused_kernel_at_the_benchmarks_rows(
    benchmark_module, monkeypatch, rows
):
    """The ragged batch's ~4.5K tokens (its token buckets: 4352 with 16 steps, 4608 with 8) lie where the adapter
    kernel's own row rule picks torch: the switch must make the fused op's automatic choice the kernel there too,
    or the ragged fused-norm contenders would time the default path under another name."""
    import importlib
    from types import SimpleNamespace

    from fastmini.ops.dispatch import recording_cuda_graph, resolve_backend

    module = importlib.import_module("fastmini.ops.add_layer_norm_adapter")
    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    x = SimpleNamespace(is_cuda=True, device="cuda:0", dtype=torch.bfloat16, shape=(rows, 768))

    def choice():
        return resolve_backend("op", x, None, module._BACKENDS, module._VERIFIED_ON_GPU,
                               module._adapter_kernel_pays_off_on_gpu)  # fmt: skip

    with benchmark_module.fused_norm_adapters(), recording_cuda_graph():
        assert choice() == "triton"
    with recording_cuda_graph():
        assert choice() == "torch"  # unverified by default
