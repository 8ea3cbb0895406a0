"""ops.add_layer_norm_adapter, ``Adapter(LayerNorm(residual + x))``: its fused inference kernel (both adapter
forwards with kernels/adapter_pre_norm.py folded in) against add_layer_norm_adapter_ref and against the two ops
it replaces, and the cases it hands to those two ops (gradients, mixed dtypes, backend="torch").

On the CPU the kernels run in the Triton interpreter (tests/conftest.py); on a GPU the module runs compiled and
is marked gpu, and the GPU-only test at the end adds the published sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastmini.ops import adapter_bottleneck, add_layer_norm, add_layer_norm_adapter, add_layer_norm_adapter_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
EPS, ADAPTER_EPS = 1e-6, 1e-5  # different, so that swapping them fails
SHAPES = [(36, 9), (312, 19), (312, 78), (768, 48)]  # (H, R), as the adapter kernel's tests
ROW_COUNTS = {"tensor cores": [1, 7, 130], "rows": [1, 7, 33]}  # the rows kernel: a program per 2 rows, interpreted


def make_inputs(rows, hidden, bottleneck, dtype=torch.float32, seed=0, requires_grad=False):
    """x, residual, the LayerNorm's weight and bias, the adapter's six parameters: scaled so that the LayerNorm
    and the adapter's GELU both do real work (a kernel that skipped either would fail)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0, shift=0.0):
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale + shift
        return values.to(DEVICE, dtype).requires_grad_(requires_grad)

    return [
        randn(rows, hidden, scale=2.0, shift=0.5),
        randn(rows, hidden, scale=1.5),
        randn(hidden, scale=0.3, shift=1.0),
        randn(hidden, scale=0.3),
        randn(bottleneck, hidden, scale=1.5 / hidden**0.5),
        randn(bottleneck, scale=0.5),
        randn(hidden, bottleneck, scale=1.5 / bottleneck**0.5),
        randn(hidden, scale=0.5),
        randn(hidden, scale=0.5, shift=1.0),
        randn(hidden, scale=0.5),
    ]


def call(function, tensors, **options):
    x, residual, weight, bias, *adapter = tensors
    return function(x, residual, weight, bias, EPS, *adapter, ADAPTER_EPS, **options)


def two_ops(tensors, backend="triton"):
    x, residual, weight, bias, *adapter = tensors
    normalised = add_layer_norm(x, residual, weight, bias, EPS, backend=backend)
    return adapter_bottleneck(normalised, *adapter, ADAPTER_EPS, backend=backend)


@pytest.fixture
def fused_launches(monkeypatch):
    """The adapter forward launches made with the LayerNorm folded in, by kernel ("tensor cores" or "rows")."""
    from fastmini.kernels import adapter_bottleneck as kernels

    launches = []
    original = kernels.adapter_bottleneck_forward

    def spy(*args, pre_norm=None, tiles=None, **options):
        if pre_norm is not None:
            rows = args[0].numel() // args[0].shape[-1]
            launches.append("rows" if rows <= kernels.ROWS_KERNEL_UP_TO else "tensor cores")
        return original(*args, pre_norm=pre_norm, tiles=tiles, **options)

    monkeypatch.setattr(kernels, "adapter_bottleneck_forward", spy)
    return launches


@pytest.mark.parametrize("hidden, bottleneck", SHAPES, ids=[f"H{h}-R{r}" for h, r in SHAPES])
@pytest.mark.parametrize("kernel, rows", [(kernel, rows) for kernel, counts in ROW_COUNTS.items() for rows in counts])
def test_fp32_inference_is_one_fused_launch_that_matches_the_reference(
    monkeypatch, fused_launches, rows, hidden, bottleneck, kernel
):
    from fastmini.kernels import adapter_bottleneck as kernels

    monkeypatch.setattr(kernels, "ROWS_KERNEL_UP_TO", 1 << 30 if kernel == "rows" else 0)
    tensors = make_inputs(rows, hidden, bottleneck)
    with torch.inference_mode():
        y = call(add_layer_norm_adapter, tensors, backend="triton")
    assert fused_launches == [kernel]
    torch.testing.assert_close(y, call(add_layer_norm_adapter_ref, tensors), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["tensor cores", "rows"])
def test_float64_is_float64_accurate_across_several_column_chunks(monkeypatch, fused_launches, kernel):
    from fastmini.kernels import adapter_bottleneck as kernels

    monkeypatch.setattr(kernels, "ROWS_KERNEL_UP_TO", 1 << 30 if kernel == "rows" else 0)
    tensors = make_inputs(7, 312, 19, dtype=torch.float64)  # 312 columns: several chunks, the last one uneven
    with torch.no_grad():
        y = call(add_layer_norm_adapter, tensors, backend="triton")
    assert fused_launches == [kernel]
    torch.testing.assert_close(y, call(add_layer_norm_adapter_ref, tensors), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_sees_what_the_two_ops_see(fused_launches, dtype):
    """The LayerNorm's sum and output are rounded to the activation dtype as add_layer_norm rounds them, so the
    fused kernel and the two ops agree to the last bit or two; both stay near the fp64 truth."""
    tensors = make_inputs(33, 768, 48, dtype=dtype)
    with torch.no_grad():
        fused, separate = call(add_layer_norm_adapter, tensors, backend="triton"), two_ops(tensors)
        truth = call(add_layer_norm_adapter_ref, [t.double() for t in tensors])
    assert fused.dtype == dtype and fused_launches == ["tensor cores"]
    step = torch.finfo(dtype).eps * fused.double().abs().max()
    assert (fused.double() - separate.double()).abs().max() <= 2 * step
    torch.testing.assert_close(fused.double(), truth, atol=4 * step.item(), rtol=0)


def test_what_needs_gradients_runs_the_two_ops_with_their_backwards(fused_launches):
    tensors = make_inputs(7, 312, 19, requires_grad=True)
    y = call(add_layer_norm_adapter, tensors, backend="triton")
    grads = torch.autograd.grad(y.sum(), tensors)
    expected_y = call(add_layer_norm_adapter_ref, tensors)
    expected_grads = torch.autograd.grad(expected_y.sum(), tensors)
    assert fused_launches == []
    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)


def test_a_residual_of_another_dtype_and_backend_torch_take_the_two_ops(monkeypatch, fused_launches):
    tensors = make_inputs(5, 36, 9)
    mixed = [tensors[0].bfloat16(), *tensors[1:]]
    with torch.no_grad():
        call(add_layer_norm_adapter, mixed, backend="triton")
        assert fused_launches == []
        from fastmini.kernels import adapter_bottleneck as kernels

        monkeypatch.setattr(kernels, "adapter_bottleneck_forward", None)  # the torch backend never reaches a kernel
        y = call(add_layer_norm_adapter, tensors, backend="torch")
    torch.testing.assert_close(y, call(add_layer_norm_adapter_ref, tensors), atol=1e-6, rtol=1e-6)


def test_automatic_fuses_under_the_interpreter_and_never_on_an_unverified_gpu(monkeypatch, fused_launches):
    from fastmini.ops.add_layer_norm_adapter import _VERIFIED_ON_GPU

    monkeypatch.delenv("FASTMINI_BACKEND")  # tests/conftest.py sets torch for every test

    tensors = make_inputs(5, 36, 9)
    with torch.no_grad():
        call(add_layer_norm_adapter, tensors)
    assert fused_launches == ([] if DEVICE.type == "cuda" and "triton" not in _VERIFIED_ON_GPU else ["tensor cores"])


def test_the_launcher_refuses_what_the_pre_norm_kernel_cannot_do():
    """Below the op, whose checks route these cases to the two ops: the kernel keeps nothing for a backward, and it
    rounds residual + x to the residual's dtype but the LayerNorm to x's."""
    from fastmini.kernels.adapter_bottleneck import adapter_bottleneck_forward

    x, residual, weight, bias, *adapter = make_inputs(3, 36, 9)
    with pytest.raises(ValueError, match="pre_norm is for inference; save_for_backward must be False"):
        adapter_bottleneck_forward(x, *adapter, ADAPTER_EPS, True, pre_norm=(residual, weight, bias, EPS))
    with pytest.raises(ValueError, match="pre_norm's residual must have x's dtype torch.float32, got torch.float64"):
        adapter_bottleneck_forward(x, *adapter, ADAPTER_EPS, False, pre_norm=(residual.double(), weight, bias, EPS))


def test_once_verified_on_a_gpu_it_is_chosen_where_the_adapters_kernel_is(monkeypatch):
    """The automatic choice on CUDA goes through the adapter kernel's measured rule (in a CUDA graph, at the row
    counts where it beats torch's composition), so that verifying the fused kernel is a one-flag change: not
    chosen eagerly, where a Triton custom op loses on host cost (ops/dispatch.py)."""
    op = importlib.import_module("fastmini.ops.add_layer_norm_adapter")
    from fastmini.ops.adapter_bottleneck import _triton_pays_off_on_gpu

    rules = []
    monkeypatch.setattr(op, "resolve_backend", lambda *args: rules.append(args[-1]) or "torch")
    call(add_layer_norm_adapter, make_inputs(5, 36, 9))
    assert rules == [_triton_pays_off_on_gpu]


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (1, lambda t: t[:, :-1], "add_layer_norm_adapter (its LayerNorm): residual must have x's shape"),
        (3, lambda t: t[:-1], "add_layer_norm_adapter (its LayerNorm): bias"),
        (6, lambda t: t.t(), "add_layer_norm_adapter (its adapter): up_weight"),
    ],
)
def test_wrong_shapes_are_named_with_the_op_they_belong_to(index, bad, message):
    tensors = make_inputs(5, 36, 9)
    tensors[index] = bad(tensors[index])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(add_layer_norm_adapter, tensors)


def test_a_bad_adapter_eps_is_named():
    x, residual, weight, bias, *adapter = make_inputs(5, 36, 9)
    with pytest.raises(ValueError, match=r"add_layer_norm_adapter \(its adapter\): eps must be a finite number > 0"):
        add_layer_norm_adapter(x, residual, weight, bias, EPS, *adapter, -1.0)


def test_opcheck_and_torch_compile_of_the_fused_forward():
    tensors = make_inputs(7, 36, 9)
    x, residual, weight, bias, *adapter = tensors
    torch.library.opcheck(
        torch.ops.fastmini.add_layer_norm_adapter_forward.default,
        (x, residual, weight, bias, EPS, *adapter, ADAPTER_EPS),
        test_utils=("test_schema", "test_faketensor"),
    )

    def fused(*args):
        return call(add_layer_norm_adapter, args, backend="triton")

    with torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True)(*tensors)
    torch.testing.assert_close(compiled, call(add_layer_norm_adapter_ref, tensors), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [128, 4608])
@pytest.mark.parametrize("kernel", ["tensor cores", "rows"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_matches_the_two_ops_at_the_published_size(monkeypatch, fused_launches, rows, kernel):
    from fastmini.kernels import adapter_bottleneck as kernels

    monkeypatch.setattr(kernels, "ROWS_KERNEL_UP_TO", 1 << 30 if kernel == "rows" else 0)
    tensors = make_inputs(rows, 768, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        fused, separate = call(add_layer_norm_adapter, tensors, backend="triton"), two_ops(tensors)
        truth = call(add_layer_norm_adapter_ref, [t.double() for t in tensors])
    assert fused_launches == [kernel]
    fused_error = (fused.double() - truth).abs().max().item()
    separate_error = (separate.double() - truth).abs().max().item()
    assert fused_error <= 2 * separate_error + 1e-3, f"fused {fused_error:.3e}, two ops {separate_error:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_the_environment_switch_does_not_reach_the_unverified_kernel(monkeypatch, fused_launches):
    from fastmini.ops.add_layer_norm_adapter import _VERIFIED_ON_GPU

    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    with torch.no_grad():
        call(add_layer_norm_adapter, make_inputs(128, 768, 48, dtype=torch.bfloat16))
    assert fused_launches == ([] if "triton" not in _VERIFIED_ON_GPU else ["tensor cores"])
