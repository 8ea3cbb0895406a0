"""Fused bottleneck adapter, ``LayerNorm(x + Up(GELU(Down(x))))``: the Triton kernels vs the unfused torch composition.

Baseline: ``adapter_bottleneck_ref`` (two F.linear, F.gelu, the residual add and F.layer_norm: five
kernels forward, about ten backward), measured interleaved in the same process. Forward is timed in
inference mode (nothing kept for backward); forward+backward is one training step of the op. H = 768,
r = 16 (MiniALBERT-128: R = 48), rows = tokens; every tensor in the case's dtype. Targets (issue): forward
at 16384 x 768 bf16 at >= 80% of the measured copy bandwidth; forward+backward >= 3x the baseline.

The op is memory-bound (the two GEMMs are 4HR FLOPs per row, R = 48), so each case reports the bytes it
must move at least and the GB/s achieved against the measured device-to-device copy bandwidth. The
minimum reads every input once and writes every output once:
  forward:          read x and the parameters; write y
  forward+backward: the forward, plus writing what backward needs beyond x (mean, rstd: 2 fp32 a row;
                    h: R fp32 a row); then read dy, x, those saved values and the parameters; write dx
                    and the parameter gradients
The fused backward itself reads x and dy twice (a row kernel, then a column kernel), so it moves about
5/3 of this minimum: the ratio of achieved to copy bandwidth shows what is left. Forward+backward also times
the backward's other design(s) beside the default ("triton-gemm-backward": one row kernel writing dx and dz,
the weight gradients as two GEMMs; about 2x the minimum).
"""

from __future__ import annotations

import pytest
import torch

from fastmini.baselines.original import PUBLISHED_MINIALBERT_128
from fastmini.models.configuration import MINIALBERT_FIXED_LAYER_NORM_EPS, FastMiniConfig
from fastmini.ops import adapter_bottleneck, adapter_bottleneck_ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CPU path is the torch reference; fused kernels are timed on CUDA only"
)

PUBLISHED = FastMiniConfig(**PUBLISHED_MINIALBERT_128)
HIDDEN = PUBLISHED.hidden_size  # 768
BOTTLENECK = PUBLISHED.adapter_size  # 768 / 16 = 48
EPS = MINIALBERT_FIXED_LAYER_NORM_EPS  # the adapters' LayerNorm eps in every MiniALBERT checkpoint
ROWS = [16384, 1024]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ["forward", "forward+backward"]


def parameter_count() -> int:
    return 2 * HIDDEN * BOTTLENECK + BOTTLENECK + 3 * HIDDEN


def minimum_bytes(mode: str, rows: int, element_size: int) -> int:
    activation = rows * HIDDEN * element_size
    parameters = parameter_count() * element_size
    if mode == "forward":
        return 2 * activation + parameters
    saved = rows * (2 + BOTTLENECK) * 4
    training_forward = 2 * activation + parameters + saved
    backward = 3 * activation + saved + 2 * parameters
    return training_forward + backward


def useful_flops(mode: str, rows: int) -> int:
    """DESIGN.md's adapter count: 2 * 2 * H * R a row forward (two GEMMs), twice that backward."""
    forward = 4 * rows * HIDDEN * BOTTLENECK
    return forward if mode == "forward" else 3 * forward


def make_inputs(rows: int, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(shape, device=device, generator=generator) * scale + shift

    tensors = [
        randn(rows, HIDDEN),
        randn(BOTTLENECK, HIDDEN, scale=HIDDEN**-0.5),
        randn(BOTTLENECK, scale=0.1),
        randn(HIDDEN, BOTTLENECK, scale=BOTTLENECK**-0.5),
        randn(HIDDEN, scale=0.1),
        randn(HIDDEN, scale=0.1, shift=1.0),
        randn(HIDDEN, scale=0.1),
    ]
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in tensors]
    return tensors, randn(rows, HIDDEN).to(dtype)


def make_step(implementation, mode: str, tensors, grad_output):
    if mode == "forward":

        def forward():
            with torch.inference_mode():
                return implementation(*tensors, EPS)

        return forward

    def forward_backward():
        y = implementation(*tensors, EPS)
        return torch.autograd.grad(y, tensors, grad_output)

    return forward_backward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("rows", ROWS)
def test_adapter_bottleneck(
    benchmark,
    compare,
    describe_device,
    sync,
    record_bandwidth,
    record_kernel_profile,
    with_setting,
    rows,
    dtype_name,
    mode,
):
    device = torch.device("cuda")
    tensors, grad_output = make_inputs(rows, DTYPES[dtype_name], device, requires_grad=mode != "forward")

    def triton_implementation(*args):
        return adapter_bottleneck(*args, backend="triton")

    steps = {
        "triton": make_step(triton_implementation, mode, tensors, grad_output),
        "torch": make_step(adapter_bottleneck_ref, mode, tensors, grad_output),
    }
    if mode != "forward":  # each backward design (kernels/adapter_bottleneck.py, BACKWARD_PATHS) in the same run
        from fastmini.kernels import adapter_bottleneck as kernels

        for path in kernels.BACKWARD_PATHS:
            if path != kernels.BACKWARD_PATH:
                steps[f"triton-{path}-backward"] = with_setting(kernels, "BACKWARD_PATH", path, steps["triton"])
    contenders = {name: sync(step, device) for name, step in steps.items()}
    rounds = 200 if rows <= 1024 else 50
    benchmark.pedantic(contenders["triton"], rounds=rounds, warmup_rounds=5)
    medians = compare(
        benchmark,
        group=f"adapter_bottleneck {mode} {rows}x{HIDDEN} {dtype_name}",
        contenders=contenders,
        baseline="torch",
        flops=useful_flops(mode, rows),
        rounds=rounds,
        shape=f"rows={rows} H={HIDDEN} R={BOTTLENECK}",
        dtype=dtype_name,
        mode=mode,
        backend="triton: fastmini.kernels.adapter_bottleneck; torch: adapter_bottleneck_ref (unfused)",
        device=describe_device(device),
        torch_version=torch.__version__,
        target="forward >= 80% of copy bandwidth (16384 x 768 bf16, device time); forward+backward >= 3x torch",
    )
    record_bandwidth(benchmark, medians, minimum_bytes(mode, rows, tensors[0].element_size()), device, steps)
    if mode != "forward" and rows == 16384 and dtype_name == "bf16":  # which kernel of each backward is slow
        for name, step in steps.items():
            record_kernel_profile(benchmark, name, step)


@pytest.mark.parametrize(
    "direction, rows",
    [("forward", 16384), ("forward", 4608), ("forward", 1024), ("forward", 128), ("backward", 16384)],
    ids=["forward", "forward-4608", "forward-1024", "forward-128", "backward"],
)
def test_adapter_bottleneck_tile_sweep(time_launch_candidates, direction, rows):
    """rows x 768 bf16 through the launchers with each tile candidate (kernels/adapter_bottleneck.py,
    *_TILE_CANDIDATES); the default is the baseline. The forward also times the op's torch composition
    ("torch composition"), which the op picks between 2048 and 16384 rows (ops.adapter_bottleneck's
    _triton_pays_off_on_gpu): 4608 rows is the ragged benchmark's token bucket, in that range."""
    from fastmini.kernels.adapter_bottleneck import (
        BACKWARD_TILE_CANDIDATES,
        FORWARD_TILE_CANDIDATES,
        adapter_bottleneck_backward,
        adapter_bottleneck_forward,
    )

    device = torch.device("cuda")
    tensors, grad_output = make_inputs(rows, torch.bfloat16, device, requires_grad=False)
    _y, mean, rstd, h = adapter_bottleneck_forward(*tensors, EPS, True)

    def forward_with(tiles):
        return lambda: adapter_bottleneck_forward(*tensors, EPS, False, tiles=tiles)

    def backward_with(options):
        return lambda: adapter_bottleneck_backward(grad_output, *tensors, h, mean, rstd, **options)

    if direction == "forward":
        steps = {name: forward_with(tiles) for name, tiles in FORWARD_TILE_CANDIDATES.items()}
        steps["torch composition"] = lambda: adapter_bottleneck(*tensors, EPS, backend="torch", check_inputs=False)
        bytes_moved = minimum_bytes("forward", rows, 2)
    else:
        steps = {name: backward_with(options) for name, options in BACKWARD_TILE_CANDIDATES.items()}
        activation = rows * HIDDEN * 2
        bytes_moved = 3 * activation + rows * (2 + BOTTLENECK) * 4 + 2 * parameter_count() * 2
    time_launch_candidates(
        steps,
        bytes_moved,
        group=f"adapter_bottleneck tiles {direction} {rows}x{HIDDEN} bf16",
        shape=f"rows={rows} H={HIDDEN} R={BOTTLENECK}",
        dtype="bf16",
        backend="triton (the kernel's launchers, one tile candidate each)",
    )


@pytest.mark.parametrize("rows", [16384, 4608, 1024, 128])
def test_add_layer_norm_adapter_fusion(time_launch_candidates, with_setting, rows):
    """ops.add_layer_norm_adapter's fused inference kernel (the shared layer's residual + LayerNorm folded into the
    adapter forward) against the two ops it replaces, rows x 768 bf16, device time: "default" is the two Triton
    kernels (what a CUDA graph of the model records up to 2048 and from 16384 rows), "two ops as a CUDA graph picks
    them" the ops' automatic choice while a graph records (at 4608 rows: add_layer_norm's kernel, then torch's
    composition for the adapter). Decides where the op's automatic choice should take the fused kernel (the encoder
    calls the op; _VERIFIED_ON_GPU and the adapter kernel's row rule decide what it runs)."""
    from fastmini.kernels import adapter_bottleneck as kernels

    from fastmini.ops import add_layer_norm, add_layer_norm_adapter
    from fastmini.ops.dispatch import recording_cuda_graph

    device = torch.device("cuda")
    adapter_tensors, residual = make_inputs(rows, torch.bfloat16, device, requires_grad=False)
    x, *adapter = adapter_tensors
    norm_weight, norm_bias = adapter[4], adapter[5]  # LayerNorm-like parameters of the right shape
    layer_norm_eps = PUBLISHED.layer_norm_eps

    def two_ops(backend):
        def step():
            with torch.inference_mode():
                normalised = add_layer_norm(x, residual, norm_weight, norm_bias, layer_norm_eps, backend=backend)
                return adapter_bottleneck(normalised, *adapter, EPS, backend=backend)

        return step

    def two_ops_as_a_graph_records():
        with recording_cuda_graph():
            return two_ops(None)()

    def fused():
        with torch.inference_mode():
            return add_layer_norm_adapter(
                x, residual, norm_weight, norm_bias, layer_norm_eps, *adapter, EPS, backend="triton"
            )

    steps = {
        "default": two_ops("triton"),
        "two ops as a CUDA graph picks them": two_ops_as_a_graph_records,
        "fused": fused,
    }
    if rows <= 4608:
        steps["fused, rows kernel"] = with_setting(kernels, "ROWS_KERNEL_UP_TO", rows, fused)
    activation = rows * HIDDEN * 2
    time_launch_candidates(
        steps,
        3 * activation + parameter_count() * 2,  # read x and the residual, write y
        group=f"add_layer_norm_adapter {rows}x{HIDDEN} bf16",
        shape=f"rows={rows} H={HIDDEN} R={BOTTLENECK}",
        dtype="bf16",
        backend="default: add_layer_norm + adapter_bottleneck, Triton; fused: ops.add_layer_norm_adapter",
    )
