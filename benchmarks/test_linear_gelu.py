"""The FFN up-projection with bias + GELU on CUDA: both Triton code paths against linear_gelu_ref.

Contenders, timed interleaved in one process by the ``compare`` fixture:
- ``bias_gelu``: cuBLAS GEMM (torch.matmul, no bias) + the fused bias-GELU kernel (the default path);
- ``fused_gemm``: the Triton GEMM with bias + GELU in its epilogue;
- ``reference``: linear_gelu_ref, i.e. F.linear (cuBLAS with the bias) then F.gelu.
Shapes: rows 16384 (throughput) and 1024 (a small batch), BERT-base FFN H=768, I=3072, bf16 and fp32
(fp32 GEMMs at torch's default precision, no TF32, in all three), exact GELU. "forward" runs in
inference mode (no pre-activation kept); "forward+backward" also computes dx, dW and db.

Work: 2 * rows * H * I FLOPs per GEMM (one forward, three forward + backward), reported as TFLOP/s.
Bytes: the minimum traffic (x, W, b and dy read once; y, dx, dW, db written once), reported as GB/s
and as a share of the measured copy bandwidth: the GEMMs make this op compute-bound, so this share
only shows how much the elementwise passes of each path cost. These numbers choose the default path
of kernels/linear_gelu.py.
"""

from __future__ import annotations

import pytest
import torch

from fastmini.baselines.original import PUBLISHED_MINIALBERT_128
from fastmini.ops import linear_gelu_ref

# The kernel module (for its code paths) needs triton, a dev extra: without it there is nothing to time.
linear_gelu_kernels = pytest.importorskip("fastmini.kernels.linear_gelu", reason="the Triton kernels need triton")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CPU path is the torch reference; fused kernels are timed on CUDA only"
)

DEVICE = torch.device("cuda")
HIDDEN = PUBLISHED_MINIALBERT_128["hidden_size"]  # 768
INTERMEDIATE = PUBLISHED_MINIALBERT_128["intermediate_size"]  # 3072
ROWS = [16384, 1024]
DTYPES = [torch.bfloat16, torch.float32]
PASSES = ["forward", "forward+backward"]
PATHS = linear_gelu_kernels.PATHS


def make_inputs(rows: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, HIDDEN, generator=generator)
    weight = torch.randn(INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5
    bias = 0.5 * torch.randn(INTERMEDIATE, generator=generator)
    grad_y = torch.randn(rows, INTERMEDIATE, generator=generator)
    leaves = [tensor.to(DEVICE, dtype).requires_grad_() for tensor in (x, weight, bias)]
    return leaves, grad_y.to(DEVICE, dtype)


def kernel_path(path: str, approximate: str):
    """linear_gelu through the Triton custom op with one code path of the kernel module."""

    def run(x, weight, bias, save_pre):
        return torch.ops.fastmini.linear_gelu_forward(x, weight, bias, approximate, save_pre, path)[0]

    return run


def reference(approximate: str):
    def run(x, weight, bias, save_pre):
        return linear_gelu_ref(x, weight, bias, approximate)

    return run


def timed(implementation, which_pass: str, leaves, grad_y):
    if which_pass == "forward":

        def forward():
            with torch.inference_mode():
                return implementation(*leaves, save_pre=False)

        return forward

    def forward_backward():
        y = implementation(*leaves, save_pre=True)
        return torch.autograd.grad(y, leaves, grad_y)

    return forward_backward


def minimum_bytes(rows: int, dtype: torch.dtype, which_pass: str) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    inputs = rows * HIDDEN + INTERMEDIATE * HIDDEN + INTERMEDIATE  # x, W, b
    outputs = rows * INTERMEDIATE  # y
    if which_pass == "forward+backward":
        inputs += rows * INTERMEDIATE  # dy
        outputs += rows * HIDDEN + INTERMEDIATE * HIDDEN + INTERMEDIATE  # dx, dW, db
    return (inputs + outputs) * size


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("which_pass", PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("rows", ROWS)
def test_linear_gelu(benchmark, compare, describe_device, sync, record_bandwidth, rows, dtype, which_pass, approximate):
    if approximate == "tanh" and (rows, dtype) != (ROWS[0], torch.bfloat16):
        pytest.skip("gelu_new (tanh) is timed at the largest bf16 shape only: the published config uses exact GELU")
    leaves, grad_y = make_inputs(rows, dtype)
    steps = {path: timed(kernel_path(path, approximate), which_pass, leaves, grad_y) for path in PATHS}
    steps["reference"] = timed(reference(approximate), which_pass, leaves, grad_y)
    contenders = {name: sync(step, DEVICE) for name, step in steps.items()}
    rounds = 30 if rows > 4096 else 100
    gemms = 1 if which_pass == "forward" else 3
    flops = gemms * 2 * rows * HIDDEN * INTERMEDIATE
    moved = minimum_bytes(rows, dtype, which_pass)

    benchmark.pedantic(contenders["bias_gelu"], rounds=rounds, warmup_rounds=3)
    dtype_name = str(dtype).removeprefix("torch.")
    medians = compare(
        benchmark,
        group=f"linear_gelu {approximate} {which_pass} {rows}x{HIDDEN}x{INTERMEDIATE} {dtype_name}",
        contenders=contenders,
        baseline="reference",
        flops=flops,
        rounds=rounds,
        shape=f"rows={rows} H={HIDDEN} I={INTERMEDIATE} approximate={approximate}",
        dtype=str(dtype),
        backend="bias_gelu: cuBLAS + Triton bias-GELU; fused_gemm: Triton GEMM+epilogue; reference: F.linear, F.gelu",
        device=describe_device(DEVICE),
        fp32_matmul_precision=torch.get_float32_matmul_precision(),
        flop_count=flops,
    )
    benchmark.extra_info["tflop_per_s"] = {name: round(flops / m / 1e12, 1) for name, m in medians.items()}
    record_bandwidth(benchmark, medians, moved, DEVICE, steps, baseline="reference")
    device_seconds = {name: us / 1e6 for name, us in benchmark.extra_info.get("device_median_us", {}).items()}
    if device_seconds:  # the path choice (cuBLAS + bias-GELU or the fused GEMM) is read from these
        benchmark.extra_info["device_tflop_per_s"] = {n: round(flops / t / 1e12, 1) for n, t in device_seconds.items()}
