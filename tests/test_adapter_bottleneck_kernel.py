"""The Triton adapter_bottleneck kernels against adapter_bottleneck_ref: output and every gradient.

Every test runs on the GPU when there is one (compiled kernels; the whole module is then marked gpu, so
`pytest -m gpu` runs all of it) and otherwise on the CPU in the Triton interpreter (tests/conftest.py),
so shapes stay small; the GPU-only tests at the end add the real sizes.
"""

from __future__ import annotations

import pytest
import torch

from fastmini.ops import adapter_bottleneck, adapter_bottleneck_ref
from fastmini.ops.adapter_bottleneck import _VERIFIED_ON_GPU, _triton_pays_off_on_gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
EPS = 1e-5
# (H, R): the tiny tester config (r=4), MiniALBERT-312 at r=16 and r=4, BERT-base width at r=16.
SHAPES = [(36, 9), (312, 19), (312, 78), (768, 48)]
ROW_COUNTS = [1, 7, 130]
GRAD_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "norm_weight", "norm_bias")
# (atol, rtol) of low-precision activations against the fp64 reference of the same (upcast) inputs.
# Parameter gradients are sums over rows (magnitudes up to ~100 here), so every gradient is compared after
# dividing both sides by its largest magnitude; fp32 uses (1e-5, 1e-5) on that scale.
LOW_PRECISION_TOLERANCES = {torch.bfloat16: (2e-2, 1e-2), torch.float16: (3e-3, 2e-3)}
forward_op = torch.ops.fastmini.adapter_bottleneck_forward
backward_op = torch.ops.fastmini.adapter_bottleneck_backward


def make_inputs(shape, bottleneck, dtype=torch.float32, parameter_dtype=None, seed=0, requires_grad=True):
    """x and the six parameters, scaled so that GELU works in its curved region and the adapter branch is as
    large as the residual (a kernel that dropped either would fail), plus an upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    hidden = shape[-1]

    def randn(*size, scale=1.0, shift=0.0):
        return torch.randn(size, generator=generator, dtype=torch.float64) * scale + shift

    x = randn(*shape, scale=1.5, shift=0.3)
    parameters = [
        randn(bottleneck, hidden, scale=1.5 / hidden**0.5),
        randn(bottleneck, scale=0.5),
        randn(hidden, bottleneck, scale=1.5 / bottleneck**0.5),
        randn(hidden, scale=0.5),
        randn(hidden, scale=0.5, shift=1.0),
        randn(hidden, scale=0.5),
    ]
    grad_output = randn(*shape)
    x = x.to(DEVICE, dtype).requires_grad_(requires_grad)
    parameters = [p.to(DEVICE, parameter_dtype or dtype).requires_grad_(requires_grad) for p in parameters]
    return [x, *parameters], grad_output.to(DEVICE)


@pytest.fixture(params=["columns", "gemm", "split-k"])
def backward_path(request, monkeypatch):
    """Runs a test through each backward design (fastmini.kernels.adapter_bottleneck.BACKWARD_PATHS) as the op's
    default: what the op computes must not depend on which one a GPU sweep makes the default."""
    from fastmini.kernels import adapter_bottleneck as kernels

    assert request.param in kernels.BACKWARD_PATHS
    monkeypatch.setattr(kernels, "BACKWARD_PATH", request.param)
    return request.param


def triton_adapter(*tensors):
    return adapter_bottleneck(*tensors, EPS, backend="triton")


def reference_adapter(*tensors):
    return adapter_bottleneck_ref(*tensors, EPS)


def forward_and_grads(function, tensors, grad_output):
    y = function(*tensors)
    return y, torch.autograd.grad(y, tensors, grad_output.to(y.dtype))


def exact(tensors, grad_output):
    """The fp64 reference on the same (upcast) values."""
    upcast = [t.detach().double().requires_grad_() for t in tensors]
    return forward_and_grads(reference_adapter, upcast, grad_output)


def assert_matches(actual, expected, atol, rtol):
    y, grads = actual
    expected_y, expected_grads = expected
    torch.testing.assert_close(y.double(), expected_y.double(), atol=atol, rtol=rtol)
    for name, grad, expected_grad in zip(GRAD_NAMES, grads, expected_grads, strict=True):
        scale = expected_grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(
            grad.double() / scale,
            expected_grad.double() / scale,
            atol=atol,
            rtol=rtol,
            msg=lambda m, n=name: f"d{n}: {m}",
        )


def assert_within_twice_torch_error(kernel, torch_own, truth, atol=1e-3):
    """flash-attention's rule for low precision: the kernel's error against fp64 stays within 2x the error of
    torch's own low-precision composition, plus a small atol (errors relative to each tensor's largest value)."""
    names = ("y", *GRAD_NAMES)
    kernel, torch_own, truth = ([y, *grads] for y, grads in (kernel, torch_own, truth))
    for name, got, torch_value, true_value in zip(names, kernel, torch_own, truth, strict=True):
        scale = true_value.abs().max().item()
        kernel_error = (got.double() - true_value).abs().max().item() / scale
        torch_error = (torch_value.double() - true_value).abs().max().item() / scale
        assert kernel_error <= 2 * torch_error + atol, f"{name}: kernel {kernel_error:.2e}, torch {torch_error:.2e}"


# ---------------------------------------------------------------- fp32 and fp64: the reference exactly


@pytest.mark.usefixtures("backward_path")
@pytest.mark.parametrize("hidden, bottleneck", SHAPES, ids=[f"H{h}-R{r}" for h, r in SHAPES])
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_fp32_matches_reference_with_every_gradient(rows, hidden, bottleneck):
    check_fp32_against_reference(rows, hidden, bottleneck)


def check_fp32_against_reference(rows, hidden, bottleneck):
    tensors, grad_output = make_inputs((rows, hidden), bottleneck)
    y, grads = forward_and_grads(triton_adapter, tensors, grad_output)
    expected_y, expected_grads = forward_and_grads(reference_adapter, tensors, grad_output)
    assert y.dtype == torch.float32 and y.shape == expected_y.shape
    assert [(g.dtype, g.shape) for g in grads] == [(g.dtype, g.shape) for g in expected_grads]
    assert_matches((y, grads), (expected_y, expected_grads), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("backward_path")
def test_leading_dimensions_are_flattened_into_rows():
    tensors, grad_output = make_inputs((2, 3, 5, 36), 9)
    y, grads = forward_and_grads(triton_adapter, tensors, grad_output)
    assert y.shape == (2, 3, 5, 36) and grads[0].shape == (2, 3, 5, 36)
    assert_matches((y, grads), forward_and_grads(reference_adapter, tensors, grad_output), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("backward_path")
def test_non_contiguous_inputs_and_gradients():
    tensors, grad_output = make_inputs((7, 36), 9)

    def column_major(tensor):
        return tensor.detach().t().contiguous().t().requires_grad_(tensor.requires_grad)

    x, up_weight, grad_output = column_major(tensors[0]), column_major(tensors[3]), column_major(grad_output)
    tensors = [x, tensors[1], tensors[2], up_weight, *tensors[4:]]
    assert not x.is_contiguous() and not up_weight.is_contiguous() and not grad_output.is_contiguous()
    assert_matches(
        forward_and_grads(triton_adapter, tensors, grad_output),
        forward_and_grads(reference_adapter, tensors, grad_output),
        atol=1e-5,
        rtol=1e-5,
    )


def test_other_tilings_give_the_same_result():
    """The launchers' tile overrides (what a GPU tuning sweep changes): several row blocks per row group,
    several column tiles, R=19 padded to 32, chunks that split H=312 unevenly, and 16-row blocks."""
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_backward, adapter_bottleneck_forward

    tensors, grad_output = make_inputs((70, 312), 19, requires_grad=False)
    y, mean, rstd, h = adapter_bottleneck_forward(
        *tensors, EPS, True, tiles={"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4}
    )
    grads = adapter_bottleneck_backward(
        grad_output.float(),
        *tensors,
        h,
        mean,
        rstd,
        row_tiles={"BLOCK_M": 16, "BLOCK_K": 32},
        column_tiles={"BLOCK_M": 16, "BLOCK_N": 128},
        splits=3,
    )
    assert_matches((y, grads), exact(tensors, grad_output), atol=1e-5, rtol=1e-5)


def _tile_candidates():
    from fastmini.kernels.adapter_bottleneck import BACKWARD_TILE_CANDIDATES, FORWARD_TILE_CANDIDATES

    return [("forward", name) for name in FORWARD_TILE_CANDIDATES if name != "default"] + [
        ("backward", name) for name in BACKWARD_TILE_CANDIDATES if name != "default"
    ]


@pytest.mark.parametrize("sweep_settings", [False, True], ids=["fp32-H312-R19", "bf16-H768-R48"])
@pytest.mark.parametrize("direction, candidate", _tile_candidates())
def test_every_tile_candidate_of_the_gpu_sweep_gives_the_same_result(direction, candidate, sweep_settings):
    """The sweep in benchmarks/test_adapter_bottleneck.py times these; a candidate the sweep finds faster can
    only become a default if it is also right (on a GPU this module runs compiled). At the sweep's own
    settings (bf16, H=768, R=48: the overrides land on the 16-bit defaults) and at an uneven fp32 shape."""
    from fastmini.kernels.adapter_bottleneck import (
        BACKWARD_TILE_CANDIDATES,
        FORWARD_TILE_CANDIDATES,
        adapter_bottleneck_backward,
        adapter_bottleneck_forward,
    )

    if sweep_settings:
        tensors, grad_output = make_inputs((40, 768), 48, dtype=torch.bfloat16, requires_grad=False)
    else:
        tensors, grad_output = make_inputs((70, 312), 19, requires_grad=False)
    forward_tiles = FORWARD_TILE_CANDIDATES[candidate] if direction == "forward" else None
    y, mean, rstd, h = adapter_bottleneck_forward(*tensors, EPS, True, tiles=forward_tiles)
    backward_options = BACKWARD_TILE_CANDIDATES[candidate] if direction == "backward" else {}
    upstream = grad_output.to(tensors[0].dtype)
    grads = adapter_bottleneck_backward(upstream, *tensors, h, mean, rstd, **backward_options)
    if sweep_settings:
        torch_own = forward_and_grads(reference_adapter, [t.detach().requires_grad_() for t in tensors], upstream)
        assert_within_twice_torch_error((y, grads), torch_own, exact(tensors, upstream))
    else:
        assert_matches((y, grads), exact(tensors, grad_output), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("backward_path")
def test_the_backward_makes_no_zero_gradients_for_the_saved_values():
    """mean, rstd and h are outputs of the forward op that nothing differentiates: autograd must not fill zero
    gradients for them on every backward (it did: three zeros kernels a step per adapter)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    tensors, grad_output = make_inputs((5, 36), 9)
    y = triton_adapter(*tensors)
    with Ops() as ops:
        y.backward(grad_output)
    assert not [name for name in ops.names if "zeros" in name], ops.names
    assert all(t.grad is not None for t in tensors)


def test_zero_rows():
    tensors, grad_output = make_inputs((0, 36), 9)
    y, grads = forward_and_grads(triton_adapter, tensors, grad_output)
    assert y.shape == (0, 36) and grads[0].shape == (0, 36)
    for grad, parameter in zip(grads[1:], tensors[1:], strict=True):
        assert grad.shape == parameter.shape and torch.all(grad == 0)


@pytest.mark.usefixtures("backward_path")
def test_gradcheck_float64():
    check_gradcheck_float64()


def check_gradcheck_float64():
    tensors, _ = make_inputs((3, 20), 5, dtype=torch.float64)
    # fast_mode checks random projections of the Jacobian: the full one is ~600 interpreted launches.
    assert torch.autograd.gradcheck(triton_adapter, tensors, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.usefixtures("backward_path")
def test_float64_is_float64_accurate_across_several_column_chunks():
    check_float64_across_column_chunks()


def check_float64_across_column_chunks():
    """H=312 spans several BLOCK_K chunks, whose LayerNorm statistics are merged: fp64 inputs must stay
    at fp64 accuracy there too (gradcheck above runs a single chunk)."""
    tensors, grad_output = make_inputs((7, 312), 19, dtype=torch.float64)
    y, grads = forward_and_grads(triton_adapter, tensors, grad_output)
    assert_matches((y, grads), forward_and_grads(reference_adapter, tensors, grad_output), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- low precision and autocast


@pytest.mark.usefixtures("backward_path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_the_fp64_reference(dtype):
    tensors, grad_output = make_inputs((130, 768), 48, dtype=dtype)
    y, grads = forward_and_grads(triton_adapter, tensors, grad_output)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    atol, rtol = LOW_PRECISION_TOLERANCES[dtype]
    assert_matches((y, grads), exact(tensors, grad_output), atol=atol, rtol=rtol)


@pytest.mark.usefixtures("backward_path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_within_twice_torch_own(dtype):
    check_low_precision_within_twice_torch_own((130, 312), 19, dtype)


def check_low_precision_within_twice_torch_own(shape, bottleneck, dtype):
    tensors, grad_output = make_inputs(shape, bottleneck, dtype=dtype)
    assert_within_twice_torch_error(
        forward_and_grads(triton_adapter, tensors, grad_output),
        forward_and_grads(reference_adapter, tensors, grad_output),
        exact(tensors, grad_output),
    )


@pytest.mark.usefixtures("backward_path")
def test_autocast_bf16_activation_with_fp32_weights():
    """Under autocast the activation arrives in bf16 while the parameters stay fp32: y comes back in bf16 and
    each gradient in its own input's dtype."""
    tensors, grad_output = make_inputs((7, 312), 19, parameter_dtype=torch.float32)
    x = tensors[0].detach().bfloat16().requires_grad_()
    tensors = [x, *tensors[1:]]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, grads = forward_and_grads(triton_adapter, tensors, grad_output)
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 6
    atol, rtol = LOW_PRECISION_TOLERANCES[torch.bfloat16]
    assert_matches((y, grads), exact(tensors, grad_output), atol=atol, rtol=rtol)


# ---------------------------------------------------------------- custom ops, torch.compile, dispatch


def test_opcheck_forward_and_backward():
    tensors, grad_output = make_inputs((7, 36), 9)
    detached = [t.detach() for t in tensors]
    torch.library.opcheck(forward_op, (*tensors, EPS, True))
    torch.library.opcheck(forward_op, (*detached, EPS, False))
    _y, mean, rstd, h = forward_op(*detached, EPS, True)
    assert mean.shape == (7,) and rstd.shape == (7,) and h.shape == (7, 9)
    torch.library.opcheck(backward_op, (grad_output.float(), *detached, h, mean, rstd))


def test_inference_keeps_nothing_for_backward(monkeypatch):
    import fastmini.kernels.adapter_bottleneck as kernels

    seen = []
    original = kernels.adapter_bottleneck_forward

    def spy(*args, **kwargs):
        outputs = original(*args, **kwargs)
        seen.append((args[-1], [t.numel() for t in outputs[1:]]))
        return outputs

    monkeypatch.setattr(kernels, "adapter_bottleneck_forward", spy)
    tensors, _ = make_inputs((7, 36), 9)
    with torch.no_grad():
        y = triton_adapter(*tensors)
    triton_adapter(*tensors)
    assert seen == [(False, [0, 0, 0]), (True, [7, 7, 63])]
    torch.testing.assert_close(y, reference_adapter(*tensors), atol=1e-5, rtol=1e-5)
    _y, mean, rstd, h = forward_op(*[t.detach().requires_grad_() for t in tensors], EPS, False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        _y.sum().backward()


def test_torch_compile_forward_and_backward():
    tensors, grad_output = make_inputs((7, 312), 19)
    compiled = torch.compile(triton_adapter, backend="aot_eager", fullgraph=True)
    assert_matches(
        forward_and_grads(compiled, tensors, grad_output),
        forward_and_grads(triton_adapter, tensors, grad_output),
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.fixture
def kernel_calls(monkeypatch):
    import fastmini.kernels.adapter_bottleneck as kernels

    calls = []
    original = kernels.adapter_bottleneck_forward
    monkeypatch.setattr(kernels, "adapter_bottleneck_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_dispatch_reaches_the_kernel(monkeypatch, kernel_calls):
    tensors, _ = make_inputs((7, 36), 9)
    adapter_bottleneck(*tensors, EPS, backend="triton")
    assert len(kernel_calls) == 1
    adapter_bottleneck(*tensors, EPS, backend="torch")
    assert len(kernel_calls) == 1
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    adapter_bottleneck(*tensors, EPS)
    assert len(kernel_calls) == 2
    monkeypatch.delenv("FASTMINI_BACKEND")
    adapter_bottleneck(*tensors, EPS)
    # Automatic: CPU tensors take the kernel under the interpreter (on here, tests/conftest.py); CUDA tensors
    # only once a GPU run has marked it verified, and where its measured rule says it pays off.
    automatic_is_triton = DEVICE.type == "cpu" or ("triton" in _VERIFIED_ON_GPU and _triton_pays_off_on_gpu(tensors[0]))
    assert len(kernel_calls) == 2 + automatic_is_triton


def test_the_adapter_module_runs_through_the_kernel(monkeypatch, kernel_calls):
    from fastmini.modules.adapter import BottleneckAdapter

    adapter = BottleneckAdapter(36, 9, EPS).to(DEVICE)
    x = torch.randn(2, 7, 36, device=DEVICE)
    expected = adapter(x)
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    torch.testing.assert_close(adapter(x), expected, atol=1e-5, rtol=1e-5)
    assert len(kernel_calls) == 1


# ---------------------------------------------------------------- bad input


def _replace(tensors, index, value):
    return [value if i == index else t for i, t in enumerate(tensors)]


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (1, torch.randn(36, 9), r"down_weight must be \(R, H\) = \(R, 36\)"),
        (1, torch.randn(9), "down_weight must be"),
        (2, torch.randn(8), r"down_bias must have shape \(9,\)"),
        (3, torch.randn(9, 36), r"up_weight must have shape \(36, 9\)"),
        (4, torch.randn(35), r"up_bias must have shape \(36,\)"),
        (5, torch.randn(1, 36), r"norm_weight must have shape \(36,\)"),
        (6, torch.randn(37), r"norm_bias must have shape \(36,\)"),
    ],
)
def test_wrong_shapes_are_named(index, bad, message):
    tensors, _ = make_inputs((7, 36), 9, requires_grad=False)
    with pytest.raises(ValueError, match=message):
        triton_adapter(*_replace(tensors, index, bad.to(DEVICE)))


def test_bad_x_and_dtypes_are_named():
    tensors, _ = make_inputs((7, 36), 9, requires_grad=False)
    with pytest.raises(ValueError, match=r"x must be \(..., H\)"):
        triton_adapter(*_replace(tensors, 0, torch.tensor(1.0, device=DEVICE)))
    with pytest.raises(ValueError, match=r"down_weight must be \(R, H\) = \(R, 35\)"):
        triton_adapter(*_replace(tensors, 0, torch.randn(7, 35, device=DEVICE)))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        triton_adapter(*_replace(tensors, 0, torch.ones(7, 36, dtype=torch.int64, device=DEVICE)))


# ---------------------------------------------------------------- GPU: the real sizes

GPU_CASES = [
    (16384, 768, 48, torch.bfloat16),
    (16384, 768, 48, torch.float32),
    (4096, 768, 48, torch.float16),
    (4099, 312, 19, torch.bfloat16),
    (4099, 312, 78, torch.float32),
    (1031, 36, 9, torch.bfloat16),
    (1, 768, 48, torch.bfloat16),
]


@pytest.mark.parametrize(
    "rows, hidden, bottleneck, dtype", GPU_CASES, ids=[f"{m}x{h}-R{r}-{str(d)[6:]}" for m, h, r, d in GPU_CASES]
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_reference(rows, hidden, bottleneck, dtype):
    tensors, grad_output = make_inputs((rows, hidden), bottleneck, dtype=dtype)
    kernel = forward_and_grads(triton_adapter, tensors, grad_output)
    truth = exact(tensors, grad_output)
    if dtype == torch.float32:
        assert_matches(kernel, truth, atol=1e-4, rtol=1e-4)
    else:
        assert_within_twice_torch_error(kernel, forward_and_grads(reference_adapter, tensors, grad_output), truth)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_torch_compile_and_autocast():
    """Under bf16 autocast the kernel multiplies bf16 copies of the fp32 weights, as torch's autocast linear
    layers do: held to flash-attention's rule against torch's own autocast composition (a fixed tolerance
    against fp64 of the fp32 weights failed on 4 of 1.5M outputs on an H200, by 0.03 against 0.02).
    On equal terms: torch's autocast LayerNorm returns fp32, so its y is rounded to the kernel's bf16, and every
    side gets the same bf16-valued upstream gradient (an fp32 one would spare torch's bias gradients the
    rounding of dy that the kernel's bf16 y imposes)."""
    tensors, grad_output = make_inputs((2048, 768), 48, parameter_dtype=torch.float32)
    grad_output = grad_output.bfloat16().double()
    compiled = torch.compile(triton_adapter, fullgraph=True)
    x = tensors[0].detach().bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, grads = forward_and_grads(compiled, [x, *tensors[1:]], grad_output)
        torch_y, torch_grads = forward_and_grads(reference_adapter, [x, *tensors[1:]], grad_output)
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 6
    torch_own = (torch_y.bfloat16(), torch_grads)
    assert_within_twice_torch_error((y, grads), torch_own, exact([x, *tensors[1:]], grad_output))


def test_few_rows_take_whole_rows_in_one_chunk(monkeypatch):
    """On a GPU, a forward too small to give every SM a 64-row block shrinks BLOCK_M to 16 and, in 16-bit, takes
    whole rows in one chunk (FORWARD_FEW_ROWS_TILES: 2.1x at 1024 rows on the H200); large inputs keep the
    128-wide chunks; fp32 weights take the fp32 tiles; explicit tiles win over all."""
    from types import SimpleNamespace

    from fastmini.kernels import adapter_bottleneck as kernel

    monkeypatch.setattr(kernel, "streaming_multiprocessors", lambda device: 132)

    def forward_tiles(rows, element_size=2, overrides=None, device="cuda", weight_size=None):
        x = SimpleNamespace(shape=(rows, 768), device=torch.device(device), element_size=lambda: element_size)
        weight = SimpleNamespace(element_size=lambda: weight_size or element_size)
        few_rows = kernel.FORWARD_FEW_ROWS_TILES
        tiles = kernel._tiles(
            kernel.FORWARD_TILES, overrides, x, (weight, weight), rows, 48, by_rows=True, few_rows_table=few_rows
        )
        return tiles["BLOCK_M"], tiles["BLOCK_K"]

    assert forward_tiles(1024) == (16, 1024)
    assert forward_tiles(16384) == (64, 128)
    assert forward_tiles(8192) == (32, 128)  # 256 blocks of 32 rows: every SM has one
    assert forward_tiles(1024, element_size=4) == (16, 64)
    # autocast: bf16 x, fp32 weights take the fp32 tiles (1024-wide fp32 chunks overflowed shared memory)
    assert forward_tiles(1024, weight_size=4) == (16, 64)
    assert forward_tiles(16384, weight_size=4) == (32, 64)
    assert forward_tiles(1024, overrides={"BLOCK_K": 64}) == (16, 64)
    assert forward_tiles(1024, overrides={"BLOCK_M": 64}) == (64, 128)
    assert forward_tiles(1024, device="cpu") == (64, 128)  # the interpreter: the table as written


def test_an_unknown_backward_path_is_named():
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_backward, adapter_bottleneck_forward

    tensors, grad_output = make_inputs((3, 36), 9, requires_grad=False)
    _y, mean, rstd, h = adapter_bottleneck_forward(*tensors, EPS, True)
    with pytest.raises(ValueError, match="path must be one of .*'columns'.*'gemm'.*got 'rows'"):
        adapter_bottleneck_backward(grad_output.float(), *tensors, h, mean, rstd, path="rows")


# ---------------------------------------------------------------- the CUDA-core forward for few rows


@pytest.fixture
def rows_kernel(monkeypatch):
    """The op's forward through kernels/adapter_bottleneck_rows.py at any row count (ROWS_KERNEL_UP_TO), its
    backward the default one, fed with what the rows kernel saved."""
    from fastmini.kernels import adapter_bottleneck as kernels

    monkeypatch.setattr(kernels, "ROWS_KERNEL_UP_TO", 1 << 30)


# The rows kernel runs a program per 2 rows, each interpreted on the CPU: 33 rows give many programs and an uneven
# last one at a quarter of 130's cost.
ROWS_KERNEL_ROW_COUNTS = [1, 7, 33]


@pytest.mark.usefixtures("rows_kernel")
@pytest.mark.parametrize("hidden, bottleneck", SHAPES, ids=[f"H{h}-R{r}" for h, r in SHAPES])
@pytest.mark.parametrize("rows", ROWS_KERNEL_ROW_COUNTS)
def test_rows_kernel_fp32_matches_reference_with_every_gradient(rows, hidden, bottleneck):
    check_fp32_against_reference(rows, hidden, bottleneck)


@pytest.mark.usefixtures("rows_kernel")
def test_rows_kernel_float64_gradcheck_and_accuracy_across_column_chunks():
    check_gradcheck_float64()
    check_float64_across_column_chunks()  # 3 chunks of 128, the last uneven


@pytest.mark.usefixtures("rows_kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rows_kernel_low_precision_error_within_twice_torch_own(dtype):
    check_low_precision_within_twice_torch_own((33, 768), 48, dtype)


@pytest.mark.usefixtures("rows_kernel")
def test_rows_kernel_takes_a_bf16_activation_with_fp32_weights():
    tensors, grad_output = make_inputs((9, 312), 19, parameter_dtype=torch.float32)
    x = tensors[0].detach().bfloat16().requires_grad_()
    y, grads = forward_and_grads(triton_adapter, [x, *tensors[1:]], grad_output)
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 6
    atol, rtol = LOW_PRECISION_TOLERANCES[torch.bfloat16]
    assert_matches((y, grads), exact([x, *tensors[1:]], grad_output), atol=atol, rtol=rtol)


@pytest.mark.parametrize("parameter_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weights", "fp32-weights"])
def test_rows_kernel_rounds_like_the_tensor_core_kernel(parameter_dtype):
    """A bf16 input: the rows kernel rounds g = GELU(h) and the weights to bf16 as the tensor-core kernel rounds its
    dot operands, so both give the same y and saved values (up to the order of fp32 sums): the backward, which
    rounds alike, can take either kernel's mean and rstd, and a row's output does not depend on which kernel its
    batch's row count picked. With g kept in fp32, 121 of 384 outputs here were a bf16 step apart."""
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_forward

    tensors, _ = make_inputs((6, 64), 16, dtype=torch.bfloat16, parameter_dtype=parameter_dtype, requires_grad=False)
    by_kernel = {
        kernel: adapter_bottleneck_forward(*tensors, EPS, True, tiles={"kernel": kernel})
        for kernel in ("tensor cores", "rows")
    }
    (y, mean, rstd, h), (rows_y, rows_mean, rows_rstd, rows_h) = by_kernel.values()
    assert (rows_y != y).sum() <= y.numel() // 100  # an fp32 sum's last bit may still flip a rounding
    torch.testing.assert_close(rows_y, y, atol=0, rtol=2**-7)  # and then by one bf16 step
    for saved, rows_saved in ((mean, rows_mean), (rstd, rows_rstd), (h, rows_h)):
        torch.testing.assert_close(rows_saved, saved, atol=1e-5, rtol=1e-5)


def test_the_op_takes_the_rows_kernel_up_to_its_row_limit(monkeypatch):
    """ROWS_KERNEL_UP_TO picks the forward kernel by row count (0 by default: the rows kernel is unverified on a
    GPU); an explicit ``kernel`` tile wins, and an unknown one is named."""
    from fastmini.kernels import adapter_bottleneck as kernels

    launched = []
    original = kernels.launch_forward_rows
    monkeypatch.setattr(kernels, "launch_forward_rows", lambda *a, **k: launched.append(1) or original(*a, **k))
    tensors, _ = make_inputs((7, 36), 9, requires_grad=False)
    assert kernels.ROWS_KERNEL_UP_TO == 0
    kernels.adapter_bottleneck_forward(*tensors, EPS, False)
    assert launched == []
    monkeypatch.setattr(kernels, "ROWS_KERNEL_UP_TO", 7)
    rows_y = kernels.adapter_bottleneck_forward(*tensors, EPS, False)[0]
    assert launched == [1]
    tensor_core_y = kernels.adapter_bottleneck_forward(*tensors, EPS, False, tiles={"kernel": "tensor cores"})[0]
    assert launched == [1]
    torch.testing.assert_close(rows_y, tensor_core_y, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(kernels, "ROWS_KERNEL_UP_TO", 6)
    kernels.adapter_bottleneck_forward(*tensors, EPS, False)
    assert launched == [1]
    with pytest.raises(ValueError, match="kernel must be one of .*'tensor cores'.*'rows'.*got 'cuda cores'"):
        kernels.adapter_bottleneck_forward(*tensors, EPS, False, tiles={"kernel": "cuda cores"})


@pytest.mark.parametrize("rows", [128, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rows_kernel_matches_reference(rows_kernel, rows, dtype):
    tensors, grad_output = make_inputs((rows, 768), 48, dtype=dtype)
    kernel = forward_and_grads(triton_adapter, tensors, grad_output)
    truth = exact(tensors, grad_output)
    if dtype == torch.float32:
        assert_matches(kernel, truth, atol=1e-4, rtol=1e-4)
    else:
        assert_within_twice_torch_error(kernel, forward_and_grads(reference_adapter, tensors, grad_output), truth)
