"""The Triton backend of fastmini.ops.linear_gelu against linear_gelu_ref: output and every gradient.

Both code paths of the kernel module ("bias_gelu": cuBLAS + the fused bias-GELU kernel, the default;
"fused_gemm": the Triton GEMM with the epilogue fused) are reached through the forward custom op's
``path`` argument. On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU
machine the same tests run on CUDA tensors (the whole module is then marked gpu, so `pytest -m gpu` runs
all of it), and the GPU-only tests at the end add the real sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastmini.ops import BackendUnavailableError, linear_gelu, linear_gelu_ref
from fastmini.ops.linear_gelu import _VERIFIED_ON_GPU, _triton_pays_off_on_gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
PATHS = ("bias_gelu", "fused_gemm")
APPROXIMATIONS = ("none", "tanh")
# (rows, hidden, intermediate): the tiny tester config, MiniALBERT-ish 312/1248 and BERT-base 768/3072
SHAPES = [(1, 36, 37), (7, 36, 37), (130, 36, 37), (7, 312, 1248), (130, 312, 1248), (1, 768, 3072), (7, 768, 3072)]
# (atol, rtol) against an fp64 reference on the same (rounded) inputs; atol is relative to the largest
# magnitude of the tensor compared, because dW and db sum over every row and their small entries come
# from cancellation. The 16-bit rows allow for the GEMM output, dz and every result being rounded once
# each, and for the interpreter rounding fp32 -> bf16 towards zero (a GPU rounds to nearest).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2), torch.float16: (1e-3, 3e-3)}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(rows, hidden, intermediate, dtype=torch.float32, seed=0, weight_dtype=None, device=DEVICE):
    """Pre-activations ~ N(0.3, 1.1): GELU's curved region, both signs, where the two approximations differ.
    Drawn on the CPU, so every device sees the same values, then moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(intermediate, hidden, generator=generator) / hidden**0.5
    bias = 0.5 * torch.randn(intermediate, generator=generator) + 0.3
    grad_y = torch.randn(rows, intermediate, generator=generator)
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    leaves = [
        x.to(device, dtype).requires_grad_(),
        weight.to(device, weight_dtype).requires_grad_(),
        bias.to(device, weight_dtype).requires_grad_(),
    ]
    return leaves, grad_y.to(device, dtype)


def run_path(path, x, weight, bias, approximate, grad_y):
    """Output and (dx, dW, db) of one kernel path, through the custom op's autograd."""
    y, _pre = torch.ops.fastmini.linear_gelu_forward(x, weight, bias, approximate, True, path)
    return (y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad_y))


def run_reference(x, weight, bias, approximate, grad_y, dtype=torch.float64):
    """linear_gelu_ref's output and gradients, computed in ``dtype`` on the same input values."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
    y = linear_gelu_ref(*leaves, approximate)
    return (y.detach(), *torch.autograd.grad(y, leaves, grad_y.to(dtype)))


def assert_all_close(results, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    for name, result, reference in zip(("y", "dx", "dW", "db"), results, expected, strict=True):
        reference = reference.double()
        scaled_atol = atol * reference.abs().max().item()
        torch.testing.assert_close(
            result.double(), reference, atol=scaled_atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


def half_ulp(magnitude, dtype):
    """Half the spacing of ``dtype``'s values around ``magnitude``: the largest error of one rounding there."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude)) / 2


def assert_within_torch_error(results, x, weight, bias, approximate, grad_y, atol):
    """flash-attention's rule: the kernel's error against an fp64 reference stays within twice torch's
    own error in the inputs' dtype, plus ``atol`` (dW and db sum over all rows, so a fixed tolerance
    would have to grow with the row count).

    y also gets one more rounding of its largest value. The bias_gelu path rounds twice by design (the
    GEMM's output x W^T, then GELU(that + bias)), and at the largest |y| the two errors add up to about
    one ulp. torch's composition rounds twice too, but its first rounding is of z = x W^T + b, and for
    large z GELU(z) ~ z is already representable, so its second costs almost nothing there: its largest
    error is about half an ulp, and twice that left no margin (emulated: ~3% at 16384 x 768 x 3072 bf16)."""
    torch_own = run_reference(x, weight, bias, approximate, grad_y, dtype=x.dtype)
    exact = run_reference(x, weight, bias, approximate, grad_y)
    for name, result, own, reference in zip(("y", "dx", "dW", "db"), results, torch_own, exact, strict=True):
        kernel_error = (result.double() - reference).abs().max().item()
        torch_error = (own.double() - reference).abs().max().item()
        allowed = 2 * torch_error + atol
        if name == "y":
            allowed += half_ulp(reference.abs().max().item(), result.dtype)
        assert kernel_error <= allowed, (
            f"{name}: kernel {kernel_error:.3g} vs torch {torch_error:.3g} (allowed {allowed:.3g})"
        )


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows, hidden, intermediate", SHAPES, ids=[f"{r}x{h}x{i}" for r, h, i in SHAPES])
def test_fp32_matches_reference(path, approximate, rows, hidden, intermediate):
    (x, weight, bias), grad_y = make_inputs(rows, hidden, intermediate)
    results = run_path(path, x, weight, bias, approximate, grad_y)
    assert [r.dtype for r in results] == [torch.float32] * 4
    assert results[0].shape == (rows, intermediate)
    assert_all_close(results, run_reference(x, weight, bias, approximate, grad_y), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows, hidden, intermediate", [(7, 36, 37), (130, 312, 1248)], ids=["7x36x37", "130x312x1248"])
def test_low_precision_matches_reference(path, approximate, dtype, rows, hidden, intermediate):
    (x, weight, bias), grad_y = make_inputs(rows, hidden, intermediate, dtype)
    results = run_path(path, x, weight, bias, approximate, grad_y)
    assert [r.dtype for r in results] == [dtype] * 4
    assert_all_close(results, run_reference(x, weight, bias, approximate, grad_y), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_activation_with_fp32_weights(path):
    """As under autocast: y and dx in bf16, dW and db in the parameters' fp32."""
    (x, weight, bias), grad_y = make_inputs(130, 312, 1248, torch.bfloat16, weight_dtype=torch.float32)
    results = run_path(path, x, weight, bias, "none", grad_y)
    assert [r.dtype for r in results] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    reference = run_reference(x, weight.bfloat16(), bias, "none", grad_y)  # the GEMM runs on the bf16 weight
    assert_all_close(results, reference, torch.bfloat16)


def test_autocast_runs_the_kernel_in_the_autocast_dtype():
    (x, weight, bias), grad_y = make_inputs(7, 36, 37)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = linear_gelu(x, weight, bias, backend="triton")
    assert y.dtype == torch.bfloat16
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), grad_y.bfloat16())
    assert (dx.dtype, dweight.dtype, dbias.dtype) == (torch.float32,) * 3
    reference = run_reference(x.bfloat16(), weight.bfloat16(), bias, "none", grad_y)
    assert_all_close((y, dx, dweight, dbias), reference, torch.bfloat16)


def test_bias_gradient_over_several_row_blocks_per_program(monkeypatch):
    """At real sizes each backward program walks several row blocks before writing its partial sum;
    cap the partials at 2 so that 130 rows take that loop here (the last block half masked)."""
    from fastmini.kernels import linear_gelu as kernels

    monkeypatch.setattr(kernels, "_MAX_BIAS_PARTIALS", 2)
    (x, weight, bias), grad_y = make_inputs(130, 36, 37)
    results = run_path("bias_gelu", x, weight, bias, "none", grad_y)
    assert_all_close(results, run_reference(x, weight, bias, "none", grad_y), torch.float32)


def test_fused_gemm_with_many_small_tiles(monkeypatch):
    """Real sizes have many tile groups; 16 x 16 x 16 tiles in groups of 2 give 130 x 37 x 36 nine row
    tiles (a partial last group), three column tiles and three K steps, each edge masked."""
    from fastmini.kernels import linear_gelu as kernels

    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
    monkeypatch.setattr(kernels, "_gemm_blocks", lambda *shape: small)
    (x, weight, bias), grad_y = make_inputs(130, 36, 37)
    results = run_path("fused_gemm", x, weight, bias, "tanh", grad_y)
    assert_all_close(results, run_reference(x, weight, bias, "tanh", grad_y), torch.float32)


@pytest.mark.parametrize("path", PATHS)
def test_inference_skips_the_pre_activation(path):
    (x, weight, bias), grad_y = make_inputs(7, 36, 37)
    training_y, training_pre = torch.ops.fastmini.linear_gelu_forward(x, weight, bias, "none", True, path)
    with torch.no_grad():
        inference_y, inference_pre = torch.ops.fastmini.linear_gelu_forward(x, weight, bias, "none", False, path)
    assert training_pre.shape == (7, 37) and inference_pre.numel() == 0
    torch.testing.assert_close(training_pre, (x @ weight.T).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inference_y, training_y.detach(), atol=0, rtol=0)


def test_public_op_under_no_grad_matches_reference():
    (x, weight, bias), _ = make_inputs(130, 36, 37)
    with torch.inference_mode():
        y = linear_gelu(x, weight, bias, "tanh", backend="triton")
        torch.testing.assert_close(y, linear_gelu_ref(x, weight, bias, "tanh"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", [("weight", "bias"), ("x",)], ids=["frozen_weights", "frozen_input"])
def test_only_the_gradients_asked_for(frozen, monkeypatch):
    """A frozen shared layer (adapter tuning) gets no weight gradients, and the dW GEMM is skipped."""
    (x, weight, bias), grad_y = make_inputs(7, 36, 37)
    leaves = {"x": x, "weight": weight, "bias": bias}
    expected = dict(zip(leaves, run_reference(x, weight, bias, "none", grad_y)[1:], strict=True))
    for name in frozen:
        leaves[name].requires_grad_(False)
    from fastmini.kernels import linear_gelu as kernels

    asked = []
    original = kernels.linear_gelu_backward

    def spy(*args):
        asked.append(args[-3:])  # needs_input_grad, needs_weight_grad, needs_bias_grad
        return original(*args)

    monkeypatch.setattr(kernels, "linear_gelu_backward", spy)
    trainable = [name for name, leaf in leaves.items() if leaf.requires_grad]
    y = linear_gelu(x, weight, bias, backend="triton")
    grads = torch.autograd.grad(y, [leaves[name] for name in trainable], grad_y)
    for name, grad in zip(trainable, grads, strict=True):
        torch.testing.assert_close(grad.double(), expected[name], atol=1e-5, rtol=1e-5)
    assert asked == [tuple(name not in frozen for name in leaves)]


def test_leading_dimensions_and_non_contiguous_input():
    (x, weight, bias), grad_y = make_inputs(14, 36, 37)
    x3d = x.detach().reshape(7, 2, 36).transpose(0, 1).requires_grad_()  # (2, 7, 36), not contiguous
    y = linear_gelu(x3d, weight, bias, backend="triton")
    assert y.shape == (2, 7, 37)
    expected_y = linear_gelu_ref(x3d, weight, bias, "none")
    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
    grad = grad_y.reshape(2, 7, 37)
    torch.testing.assert_close(
        torch.autograd.grad(y, x3d, grad)[0], torch.autograd.grad(expected_y, x3d, grad)[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("path", PATHS)
def test_no_rows(path):
    (x, weight, bias), _ = make_inputs(0, 36, 37)
    y, _pre = torch.ops.fastmini.linear_gelu_forward(x, weight, bias, "none", True, path)
    assert y.shape == (0, 37)
    dx, dweight, dbias = torch.autograd.grad(y.sum(), (x, weight, bias))
    assert dx.shape == (0, 36) and not dweight.any() and not dbias.any()


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_float64(path, approximate):
    """The kernels' own derivative of gelu (fp64 for fp64 inputs) against finite differences."""
    (x, weight, bias), _ = make_inputs(3, 5, 6, torch.float64)

    def output(x, weight, bias):
        return torch.ops.fastmini.linear_gelu_forward(x, weight, bias, approximate, True, path)[0]

    assert torch.autograd.gradcheck(output, (x, weight, bias))


@pytest.mark.parametrize("path", PATHS)
def test_opcheck_forward(path):
    (x, weight, bias), _ = make_inputs(7, 36, 37)
    torch.library.opcheck(torch.ops.fastmini.linear_gelu_forward, (x, weight, bias, "tanh", True, path))
    with torch.no_grad():
        torch.library.opcheck(torch.ops.fastmini.linear_gelu_forward, (x, weight, bias, "none", False, path))


def test_opcheck_backward():
    (x, weight, bias), grad_y = make_inputs(7, 36, 37)
    x, weight, bias = (t.detach() for t in (x, weight, bias))
    pre = x @ weight.T
    torch.library.opcheck(
        torch.ops.fastmini.linear_gelu_backward, (grad_y, x, weight, bias, pre, "none", True, True, True)
    )
    torch.library.opcheck(
        torch.ops.fastmini.linear_gelu_backward, (grad_y, x, weight, bias, pre, "tanh", False, True, False)
    )


def test_torch_compile_fullgraph_forward_and_backward():
    """The custom ops stay opaque to dynamo (no graph break) and AOTAutograd traces their backward."""
    (x, weight, bias), grad_y = make_inputs(2 * 7, 36, 37)
    x, grad_y = x.detach().reshape(2, 7, 36).requires_grad_(), grad_y.reshape(2, 7, 37)
    compiled = torch.compile(
        lambda x, weight, bias: linear_gelu(x, weight, bias, "tanh", backend="triton"),
        backend="aot_eager",
        fullgraph=True,
    )
    y = compiled(x, weight, bias)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    assert_all_close((y, *grads), run_reference(x, weight, bias, "tanh", grad_y), torch.float32)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the kernel module's forward launcher."""
    from fastmini.kernels import linear_gelu as kernels

    calls = []
    original = kernels.linear_gelu_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("path"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "linear_gelu_forward", spy)
    return calls


def test_backend_argument_reaches_the_kernel(kernel_calls):
    (x, weight, bias), _ = make_inputs(7, 36, 37)
    linear_gelu(x, weight, bias, backend="torch")
    assert kernel_calls == []
    linear_gelu(x, weight, bias, backend="triton")
    assert kernel_calls == [None]  # the launcher's default path


def test_environment_variable_reaches_the_kernel(kernel_calls, monkeypatch):
    (x, weight, bias), _ = make_inputs(7, 36, 37)
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    torch.testing.assert_close(linear_gelu(x, weight, bias), linear_gelu_ref(x, weight, bias, "none"))
    assert len(kernel_calls) == 1


def test_launcher_default_path_is_bias_gelu():
    from fastmini.kernels import linear_gelu as kernels

    assert kernels.DEFAULT_PATH == "bias_gelu" and kernels.PATHS == PATHS


def test_automatic_choice_reaches_the_kernel_where_it_may(kernel_calls, monkeypatch):
    (x, weight, bias), _ = make_inputs(7, 36, 37)
    monkeypatch.delenv("FASTMINI_BACKEND")
    torch.testing.assert_close(linear_gelu(x, weight, bias), linear_gelu_ref(x, weight, bias, "none"))
    # CPU tensors take the kernel under the interpreter (on here, tests/conftest.py); CUDA tensors only once a
    # GPU run has marked it verified, and where its measured rule says it pays off.
    automatic_is_triton = DEVICE.type == "cpu" or ("triton" in _VERIFIED_ON_GPU and _triton_pays_off_on_gpu(x))
    assert len(kernel_calls) == automatic_is_triton


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    (x, weight, bias), _ = make_inputs(7, 36, 37, device=torch.device("cpu"))  # CPU tensors on a GPU machine too
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA tensor"):
        linear_gelu(x, weight, bias, backend="triton")


@pytest.mark.parametrize(
    "x_shape, weight_shape, bias_shape, message",
    [
        ((7, 35), (37, 36), (37,), "x's last dimension must be the weight's hidden size 36"),
        ((7, 36), (37 * 36,), (37,), "weight must be 2-D"),
        ((7, 36), (37, 36), (36,), r"bias must have shape \(37,\)"),
        ((7, 36), (37, 36), (1, 37), r"bias must have shape \(37,\)"),
    ],
)
def test_bad_shapes_are_clear_errors(x_shape, weight_shape, bias_shape, message):
    x, weight, bias = (torch.randn(shape, device=DEVICE) for shape in (x_shape, weight_shape, bias_shape))
    with pytest.raises(ValueError, match=message):
        linear_gelu(x, weight, bias, backend="triton")


def test_bad_approximation_and_path_are_clear_errors():
    (x, weight, bias), _ = make_inputs(7, 36, 37)
    with pytest.raises(ValueError, match="approximate must be one of"):
        linear_gelu(x, weight, bias, "erf", backend="triton")
    with pytest.raises(ValueError, match="path must be one of"):
        torch.ops.fastmini.linear_gelu_forward(x, weight, bias, "none", True, "cutlass")


def test_integer_input_is_a_clear_error():
    (_, weight, bias), _ = make_inputs(7, 36, 37)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        linear_gelu(torch.ones(7, 36, dtype=torch.long, device=DEVICE), weight, bias, backend="triton")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_real_sizes(path, approximate, dtype):
    """BERT-base FFN at 16384 rows. Error against an fp64 reference stays within twice torch's own
    error in the same dtype, plus a small atol (flash-attention's rule)."""
    (x, weight, bias), grad_y = make_inputs(16384, 768, 3072, dtype)
    results = run_path(path, x, weight, bias, approximate, grad_y)
    assert_within_torch_error(results, x, weight, bias, approximate, grad_y, atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", PATHS)
def test_gpu_autocast_bf16_at_real_size(path, monkeypatch):
    """Training under autocast at the BERT-base FFN size: fp32 x, weight and bias into the public op, which
    hands the kernel bf16 x; the GEMM runs on the bf16-cast weight with the bias in fp32, y comes back in bf16
    and each gradient in its leaf's fp32."""
    from fastmini.kernels import linear_gelu as kernels

    monkeypatch.setattr(kernels, "DEFAULT_PATH", path)  # the public op runs the launcher's default path
    (x, weight, bias), grad_y = make_inputs(16384, 768, 3072)
    grad_y = grad_y.bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = linear_gelu(x, weight, bias, backend="triton")
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), grad_y)
    assert y.dtype == torch.bfloat16 and (dx.dtype, dweight.dtype, dbias.dtype) == (torch.float32,) * 3
    reference = run_reference(x.bfloat16(), weight.bfloat16(), bias, "none", grad_y)
    assert_all_close((y, dx, dweight, dbias), reference, torch.bfloat16)


def test_opcheck_backward_of_transposed_inputs():
    """Gradients are fresh contiguous tensors whatever the strides of x and weight; the fake
    implementation must say so, or inductor's stride checks fail on a transposed input or tied weight."""
    (x, weight, bias), grad_y = make_inputs(8, 36, 40)
    x, weight, bias = x.detach().T.contiguous().T, weight.detach().T.contiguous().T, bias.detach()
    assert not x.is_contiguous() and not weight.is_contiguous()
    pre = x @ weight.T
    torch.library.opcheck(
        torch.ops.fastmini.linear_gelu_backward, (grad_y, x, weight, bias, pre, "none", True, True, True)
    )


@pytest.mark.parametrize("path", PATHS)
def test_bf16_outputs_round_to_nearest_like_torch(path):
    """Large pre-activations, where a cast that truncates (the interpreter's own) and one that rounds
    differ in about half the elements: pre and y = GELU(pre + bias) must round as torch rounds them."""
    (x, weight, bias), _ = make_inputs(64, 36, 37, torch.bfloat16)
    x, bias = x.detach() * 40, bias.detach() + 100
    with torch.no_grad():
        y, pre = torch.ops.fastmini.linear_gelu_forward(x, weight, bias, "none", True, path)
    # pre = x @ W^T on both paths, rounded once from an fp32 product computed here (not the kernel's pre);
    # bias_gelu adds the bias to that rounded GEMM output, fused_gemm to its fp32 accumulator
    exact_pre = x.float() @ weight.detach().float().T
    gelu_input = exact_pre.to(torch.bfloat16).float() if path == "bias_gelu" else exact_pre
    expected = (exact_pre.to(torch.bfloat16), torch.nn.functional.gelu(gelu_input + bias.float()).to(torch.bfloat16))
    for result, reference in zip((pre, y), expected, strict=True):
        assert (result != reference).float().mean().item() < 0.01
