"""Fused residual add (+ dropout) + LayerNorm: the Triton kernels vs the unfused torch composition.

Baseline: ``add_layer_norm_ref`` (F.dropout, then ``residual + x``, then F.layer_norm: three
or four kernels), measured interleaved in the same process. Forward is timed in inference mode
(no dropout, nothing kept for backward); forward+backward is one training step of the op, with
and without dropout. H = 768 (MiniALBERT-128), rows = tokens. Target: forward+backward at least
2x the baseline.

The op is memory-bound, so each case reports the bytes it must move at least and the GB/s
achieved against the measured device-to-device copy bandwidth. The minimum, per pass, reads
every input once and writes every output once:
  forward:  read x, residual; write out
  backward: read d(out) and one saved (rows, H) activation; write d(residual), plus d(x) when
            dropout makes it differ from d(residual)
  training forward: the forward, plus writing the saved activation
(weight, bias and the per-row statistics are a few KB and left out).
"""

from __future__ import annotations

import pytest
import torch

from fastmini.baselines.original import PUBLISHED_MINIALBERT_128
from fastmini.models.configuration import FastMiniConfig
from fastmini.ops import add_layer_norm, add_layer_norm_ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CPU path is the torch reference; fused kernels are timed on CUDA only"
)

HIDDEN = PUBLISHED_MINIALBERT_128["hidden_size"]  # 768
EPS = FastMiniConfig.layer_norm_eps  # the shared layer's two LayerNorms, at the config's default
ROWS = [16384, 1024]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (mode, dropout_p): inference never drops; training is timed both ways
CASES = [("forward", 0.0), ("forward+backward", 0.0), ("forward+backward", 0.1)]


def minimum_bytes(mode: str, dropout_p: float, rows: int, element_size: int) -> int:
    activation = rows * HIDDEN * element_size
    if mode == "forward":
        return 3 * activation
    training_forward = 4 * activation  # x, residual in; out, saved activation out
    backward = (2 + (2 if dropout_p > 0 else 1)) * activation
    return training_forward + backward


def make_step(implementation, mode: str, dropout_p: float, tensors, grad_out):
    if mode == "forward":

        def forward():
            with torch.inference_mode():
                return implementation(*tensors, EPS, dropout_p)

        return forward

    def forward_backward():
        out = implementation(*tensors, EPS, dropout_p)
        return torch.autograd.grad(out, tensors, grad_out)

    return forward_backward


@pytest.mark.parametrize("mode, dropout_p", CASES, ids=[f"{mode}-p{p}" for mode, p in CASES])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("rows", ROWS)
def test_add_layer_norm(
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
    dropout_p,
):
    device = torch.device("cuda")
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device=device).manual_seed(0)
    x, residual, grad_out = (
        torch.randn(rows, HIDDEN, device=device, dtype=dtype, generator=generator) for _ in range(3)
    )
    weight = torch.ones(HIDDEN, device=device, dtype=dtype) + 0.1 * torch.randn(
        HIDDEN, device=device, dtype=dtype, generator=generator
    )
    bias = 0.1 * torch.randn(HIDDEN, device=device, dtype=dtype, generator=generator)
    tensors = [t.requires_grad_(mode != "forward") for t in (x, residual, weight, bias)]

    def triton_implementation(*args):
        return add_layer_norm(*args, backend="triton")

    steps = {
        "triton": make_step(triton_implementation, mode, dropout_p, tensors, grad_out),
        "torch": make_step(add_layer_norm_ref, mode, dropout_p, tensors, grad_out),
    }
    if dropout_p > 0.0:  # each dropout RNG scheme (kernels/add_layer_norm.py, DROPOUT_RNG_SCHEMES) in the same run
        from fastmini.kernels import add_layer_norm as kernels

        for scheme in kernels.DROPOUT_RNG_SCHEMES:
            if scheme != kernels.DROPOUT_RNG:
                steps[f"triton-{scheme}"] = with_setting(kernels, "DROPOUT_RNG", scheme, steps["triton"])
    contenders = {name: sync(step, device) for name, step in steps.items()}
    rounds = 200 if rows <= 1024 else 50
    benchmark.pedantic(contenders["triton"], rounds=rounds, warmup_rounds=5)
    medians = compare(
        benchmark,
        group=f"add_layer_norm {mode} p={dropout_p} {rows}x{HIDDEN} {dtype_name}",
        contenders=contenders,
        baseline="torch",
        flops=None,
        rounds=rounds,
        shape=f"rows={rows} H={HIDDEN}",
        dtype=dtype_name,
        dropout_p=dropout_p,
        mode=mode,
        backend="triton: fastmini.kernels.add_layer_norm; torch: add_layer_norm_ref (unfused)",
        device=describe_device(device),
        torch_version=torch.__version__,
    )
    record_bandwidth(benchmark, medians, minimum_bytes(mode, dropout_p, rows, x.element_size()), device, steps)
    if mode != "forward" and rows == 16384 and dtype_name == "bf16":  # the backward's kernels, its reduction's too
        for name, step in steps.items():
            record_kernel_profile(benchmark, name, step)


@pytest.mark.parametrize(
    "rows, dropout_p", [(16384, 0.0), (1024, 0.0), (16384, 0.1)], ids=["16384", "1024", "16384-dropout"]
)
def test_add_layer_norm_backward_sweep(time_launch_candidates, rows, dropout_p):
    """The backward kernel alone (rows x 768 bf16; without dropout, and with it at 16384 rows, where the mask is
    drawn again) with each launch candidate (kernels/add_layer_norm.py, BACKWARD_CANDIDATES); the default is the
    baseline."""
    from fastmini.kernels.add_layer_norm import BACKWARD_CANDIDATES, add_layer_norm_backward, add_layer_norm_forward

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    x, residual, grad_out = (
        torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(3)
    )
    weight, bias = torch.ones(HIDDEN, device=device), torch.zeros(HIDDEN, device=device)
    _out, total, mean, rstd = add_layer_norm_forward(x, residual, weight, bias, EPS, dropout_p, 0, True)

    def backward_with(options):
        return lambda: add_layer_norm_backward(grad_out, total, weight, mean, rstd, dropout_p, 0, **options)

    steps = {name: backward_with(options) for name, options in BACKWARD_CANDIDATES.items()}
    # read d(out) and the saved sum, write d(residual) (and d(x) with dropout): the minimum of the backward
    time_launch_candidates(
        steps,
        (3 if dropout_p == 0.0 else 4) * rows * HIDDEN * 2,
        group=f"add_layer_norm backward launches {rows}x{HIDDEN} bf16 p={dropout_p}",
        shape=f"rows={rows} H={HIDDEN}",
        dtype="bf16",
        backend="triton (the backward launcher, one launch candidate each)",
    )
