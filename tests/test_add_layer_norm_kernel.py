"""The Triton add_layer_norm kernels against add_layer_norm_ref: output, every gradient, dropout.

Every test runs on the GPU when there is one (compiled kernels; the whole module is then marked gpu, so
`pytest -m gpu` runs all of it) and otherwise on the CPU in the Triton interpreter (tests/conftest.py),
so shapes stay small; the GPU-only tests at the end add the real sizes.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from fastmini.ops import BackendUnavailableError, add_layer_norm, add_layer_norm_ref
from fastmini.ops.add_layer_norm import _VERIFIED_ON_GPU, _triton_pays_off_on_gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
EPS = 1e-5
HIDDEN_SIZES = [36, 312, 768]
ROW_COUNTS = [1, 7, 130]
# (atol, rtol) for low-precision activations against the fp32 reference of the same (upcast) inputs.
LOW_PRECISION_TOLERANCES = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
forward_op = torch.ops.fastmini.add_layer_norm_forward
backward_op = torch.ops.fastmini.add_layer_norm_backward


def make_inputs(shape, dtype=torch.float32, parameter_dtype=None, seed=0, requires_grad=True, device=DEVICE):
    """x, residual, weight, bias (drawn on the CPU, so every device sees the same values) and an upstream
    gradient (fp32), on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    parameter_dtype = parameter_dtype or dtype
    x = torch.randn(shape, generator=generator).to(device, dtype)
    residual = torch.randn(shape, generator=generator).to(device, dtype)
    # weight away from zero and bias large enough that a wrong affine shows
    weight = (1 + 0.5 * torch.randn(hidden, generator=generator)).to(device, parameter_dtype)
    bias = torch.randn(hidden, generator=generator).to(device, parameter_dtype)
    grad_out = torch.randn(shape, generator=generator).to(device)
    tensors = [t.requires_grad_(requires_grad) for t in (x, residual, weight, bias)]
    return tensors, grad_out


def forward_and_grads(function, tensors, grad_out):
    out = function(*tensors)
    grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
    return out, grads


def triton_op(dropout_p=0.0):
    return lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS, dropout_p, backend="triton")


def reference_op(x, r, w, b):
    return add_layer_norm_ref(x, r, w, b, EPS)


def seed_tensor(value):
    """The forward op's seed: a 0-dim CPU int64 whatever the device of the other inputs."""
    return torch.tensor(value, dtype=torch.int64)


@pytest.fixture(params=["per-element", "four-per-call"])
def dropout_rng(request, monkeypatch):
    """Runs a test under each dropout RNG scheme (fastmini.kernels.add_layer_norm.DROPOUT_RNG_SCHEMES)."""
    from fastmini.kernels import add_layer_norm as kernels

    assert request.param in kernels.DROPOUT_RNG_SCHEMES
    monkeypatch.setattr(kernels, "DROPOUT_RNG", request.param)
    return request.param


def keep_mask(seed, rows, hidden, dropout_p):
    from fastmini.kernels.add_layer_norm import dropout_keep_mask

    return dropout_keep_mask(seed, rows, hidden, dropout_p, DEVICE)


# ---------------------------------------------------------------- no dropout: the reference exactly


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_fp32_matches_reference_with_every_gradient(rows, hidden):
    tensors, grad_out = make_inputs((rows, hidden))
    out, grads = forward_and_grads(triton_op(), tensors, grad_out)
    expected_out, expected_grads = forward_and_grads(reference_op, tensors, grad_out)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for name, grad, expected in zip(("x", "residual", "weight", "bias"), grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def _backward_candidates():
    from fastmini.kernels.add_layer_norm import BACKWARD_CANDIDATES

    return [name for name in BACKWARD_CANDIDATES if name != "default"]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("candidate", _backward_candidates())
def test_every_backward_launch_candidate_of_the_gpu_sweep_gives_the_same_gradients(candidate, dropout_p):
    """benchmarks/test_add_layer_norm.py times these; one the sweep finds faster can become the default only
    if it is also right: the same gradients to fp32 summation order (more warps a row change the order of a
    row's sums: on an H200 the 4- and 8-row tiles' d(residual) differed from the default's in last bits)."""
    from fastmini.kernels.add_layer_norm import BACKWARD_CANDIDATES, add_layer_norm_backward, add_layer_norm_forward

    (x, residual, weight, bias), grad_out = make_inputs((70, 768), requires_grad=False)
    _out, total, mean, rstd = add_layer_norm_forward(x, residual, weight, bias, EPS, dropout_p, 5, True)
    default = add_layer_norm_backward(grad_out, total, weight, mean, rstd, dropout_p, 5)
    candidate = add_layer_norm_backward(grad_out, total, weight, mean, rstd, dropout_p, 5,
                                        **BACKWARD_CANDIDATES[candidate])  # fmt: skip
    for got, expected in zip(candidate, default, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_leading_dimensions_are_flattened_into_rows():
    tensors, grad_out = make_inputs((2, 5, 36))
    out, grads = forward_and_grads(triton_op(), tensors, grad_out)
    expected_out, expected_grads = forward_and_grads(reference_op, tensors, grad_out)
    assert out.shape == (2, 5, 36)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.shape == expected.shape
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    (x, residual, weight, bias), grad_out = make_inputs((9, 36))
    # leaves stored transposed, so the (9, 36) views the op sees have strides (1, 9)
    x_storage, residual_storage = (t.detach().t().contiguous().requires_grad_() for t in (x, residual))
    tensors = [x_storage.t(), residual_storage.t(), weight, bias]
    assert not tensors[0].is_contiguous()
    leaves = [x_storage, residual_storage, weight, bias]
    out = triton_op()(*tensors)
    grads = torch.autograd.grad(out, leaves, grad_out.t().contiguous().t())
    expected_out = reference_op(*tensors)
    expected_grads = torch.autograd.grad(expected_out, leaves, grad_out)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_the_fp32_reference(dtype):
    atol, rtol = LOW_PRECISION_TOLERANCES[dtype]
    tensors, grad_out = make_inputs((7, 312), dtype=dtype)
    out, grads = forward_and_grads(triton_op(), tensors, grad_out)
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [dtype] * 4
    upcast = [t.detach().float().requires_grad_() for t in tensors]
    expected_out, expected_grads = forward_and_grads(reference_op, upcast, grad_out.to(dtype).float())
    torch.testing.assert_close(out.float(), expected_out, atol=atol, rtol=rtol)
    for grad, expected in zip(grads, expected_grads, strict=True):
        # dweight/dbias sum over rows, so their absolute error grows with the row count
        torch.testing.assert_close(grad.float(), expected, atol=atol * 4, rtol=rtol)
    # and no further from fp32 than torch's own low-precision composition, plus rounding slack
    torch_out, torch_grads = forward_and_grads(reference_op, tensors, grad_out)
    names = ("out", "dx", "dresidual", "dweight", "dbias")
    results, torch_results, references = (out, *grads), (torch_out, *torch_grads), (expected_out, *expected_grads)
    for name, result, torch_result, expected in zip(names, results, torch_results, references, strict=True):
        error = (result.float() - expected).abs().max().item()
        torch_error = (torch_result.float() - expected).abs().max().item()
        assert error <= 2 * torch_error + atol / 4, f"{name}: error {error} vs torch's own {torch_error}"


def test_autocast_mix_keeps_every_gradient_in_its_input_dtype():
    """Under autocast the branch arrives in bf16 while the residual and LayerNorm parameters are fp32."""
    (x, residual, weight, bias), grad_out = make_inputs((7, 36))
    x_half = x.detach().bfloat16().requires_grad_()
    tensors = [x_half, residual, weight, bias]
    out, grads = forward_and_grads(triton_op(), tensors, grad_out)
    expected_out, expected_grads = forward_and_grads(reference_op, tensors, grad_out)
    assert out.dtype == expected_out.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    # dx is rounded to bf16 (one step's tolerance); the fp32 gradients are fp32-accurate (a bf16 rounding of the
    # sum or of dz would show as ~1e-3 here)
    torch.testing.assert_close(grads[0], expected_grads[0], atol=1e-2, rtol=2**-7)
    for name, grad, expected in zip(("residual", "weight", "bias"), grads[1:], expected_grads[1:], strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_bf16_activations_with_fp32_parameters():
    atol, rtol = LOW_PRECISION_TOLERANCES[torch.bfloat16]
    tensors, grad_out = make_inputs((7, 36), dtype=torch.bfloat16, parameter_dtype=torch.float32)
    out, grads = forward_and_grads(triton_op(), tensors, grad_out)
    grad_x, grad_residual, grad_weight, grad_bias = grads
    assert out.dtype == grad_x.dtype == grad_residual.dtype == torch.bfloat16
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    torch.testing.assert_close(grad_bias, grad_out.bfloat16().float().sum(0), atol=1e-4, rtol=1e-4)
    # every value against the fp32 reference of the same (upcast) inputs
    upcast = [t.detach().float().requires_grad_() for t in tensors]
    expected_out, expected_grads = forward_and_grads(reference_op, upcast, grad_out.bfloat16().float())
    torch.testing.assert_close(out.float(), expected_out, atol=atol, rtol=rtol)
    for name, grad, expected in zip(("x", "residual"), grads[:2], expected_grads[:2], strict=True):
        torch.testing.assert_close(grad.float(), expected, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")
    # dweight/dbias sum over rows: the same allowance as test_low_precision_against_the_fp32_reference
    for name, grad, expected in zip(("weight", "bias"), grads[2:], expected_grads[2:], strict=True):
        torch.testing.assert_close(grad, expected, atol=atol * 4, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def test_empty_batch():
    tensors, grad_out = make_inputs((0, 36))
    out, (grad_x, grad_residual, grad_weight, grad_bias) = forward_and_grads(triton_op(), tensors, grad_out)
    assert out.shape == grad_x.shape == grad_residual.shape == (0, 36)
    zeros = torch.zeros(36, device=DEVICE)
    assert torch.equal(grad_weight, zeros) and torch.equal(grad_bias, zeros)


def test_gradcheck_float64():
    tensors, _ = make_inputs((2, 12), dtype=torch.float64)
    assert torch.autograd.gradcheck(triton_op(), tensors)


@pytest.mark.usefixtures("dropout_rng")
def test_gradcheck_float64_with_a_fixed_dropout_mask():
    tensors, _ = make_inputs((2, 12), dtype=torch.float64)
    seed = seed_tensor(1234)

    def with_fixed_seed(x, r, w, b):
        return forward_op(x, r, w, b, EPS, 0.4, seed, True)[0]

    assert torch.autograd.gradcheck(with_fixed_seed, tensors)


# ---------------------------------------------------------------- dropout


@pytest.mark.usefixtures("dropout_rng")
def test_same_seed_same_output_and_gradients_and_other_seeds_differ():
    tensors, grad_out = make_inputs((7, 312))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(forward_and_grads(triton_op(0.3), tensors, grad_out))
    (out_a, grads_a), (out_b, grads_b), (out_c, _) = runs
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert not torch.equal(out_a, out_c)


@pytest.mark.usefixtures("dropout_rng")
def test_the_forward_kernel_uses_the_mask_that_dropout_keep_mask_reports():
    """With x = 1 the saved sum is residual + keep / (1 - p): the kernel's own mask, read back."""
    rows, hidden, dropout_p, seed = 7, 312, 0.25, 99
    residual = torch.randn(rows, hidden, device=DEVICE)
    ones = torch.ones(rows, hidden, device=DEVICE)
    weight, bias = torch.ones(hidden, device=DEVICE), torch.zeros(hidden, device=DEVICE)
    _out, total, _mean, _rstd = forward_op(ones, residual, weight, bias, EPS, dropout_p, seed_tensor(seed), True)
    keep = keep_mask(seed, rows, hidden, dropout_p)
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(total - residual, keep / (1 - dropout_p))


@pytest.mark.usefixtures("dropout_rng")
@pytest.mark.parametrize("hidden", [36, 768])
def test_dropout_output_and_gradients_match_the_reference_with_the_same_mask(hidden):
    rows, dropout_p, seed = 7, 0.3, 2024
    tensors, grad_out = make_inputs((rows, hidden))
    fixed_seed = seed_tensor(seed)
    out, grads = forward_and_grads(
        lambda x, r, w, b: forward_op(x, r, w, b, EPS, dropout_p, fixed_seed, True)[0], tensors, grad_out
    )
    keep = keep_mask(seed, rows, hidden, dropout_p)
    assert 0 < keep.sum() < keep.numel()

    def reference_with_mask(x, r, w, b):
        return F.layer_norm(r + x * keep / (1 - dropout_p), (hidden,), w, b, EPS)

    expected_out, expected_grads = forward_and_grads(reference_with_mask, tensors, grad_out)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(grads[0][~keep] == 0)


@pytest.mark.usefixtures("dropout_rng")
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p_and_the_mask_has_no_row_or_column_pattern(dropout_p):
    rows, hidden = 256, 1024
    keep = keep_mask(7, rows, hidden, dropout_p).float()
    # 262144 Bernoulli draws: the standard deviation of the fraction is below 0.001
    assert abs(keep.mean().item() - (1 - dropout_p)) < 0.005
    assert (keep.mean(1) - (1 - dropout_p)).abs().max() < 0.1  # every row, 1024 draws each
    assert (keep.mean(0) - (1 - dropout_p)).abs().max() < 0.15  # every column, 256 draws each
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, keep_mask(8, rows, hidden, dropout_p).float())
    # Independent neighbours: each Philox call serves four adjacent columns (one lane each), and a row of an
    # H that is no multiple of 4 must not share a call with the next row. Two independent draws agree with
    # probability p^2 + (1 - p)^2 (standard deviation of these rates < 0.002).
    independent = dropout_p**2 + (1 - dropout_p) ** 2
    for first, second in itertools.combinations(range(5), 2):  # every pair of lanes, and lane 0 of the next call
        same = (keep[:, first : hidden - 4 : 4] == keep[:, second : hidden - 4 + second - first : 4]).float()
        assert abs(same.mean().item() - independent) < 0.01, (first, second)
    odd = keep_mask(7, 4096, 37, dropout_p).float()
    assert abs((odd[:-1, -1] == odd[1:, 0]).float().mean().item() - independent) < 0.03


def test_public_function_draws_its_seed_from_torch_default_generator():
    tensors, _ = make_inputs((7, 36), requires_grad=False)
    torch.manual_seed(11)
    first = add_layer_norm(*tensors, EPS, 0.5, backend="triton")
    torch.manual_seed(11)
    torch.rand(1)  # advances the default generator: a different seed, a different mask
    second = add_layer_norm(*tensors, EPS, 0.5, backend="triton")
    assert not torch.equal(first, second)


@pytest.mark.usefixtures("dropout_rng")
def test_seeds_have_63_bits_and_the_high_half_changes_the_mask(monkeypatch):
    """31-bit seeds would repeat a mask every ~50K calls (birthday bound); Philox takes the whole 64-bit key."""
    op_module = importlib.import_module("fastmini.ops.add_layer_norm")  # the package's name is the function's
    drawn = []
    forward = op_module._forward_op

    def recording(*args):
        drawn.append(int(args[6].item()))
        return forward(*args)

    monkeypatch.setattr(op_module, "_forward_op", recording)
    tensors, _ = make_inputs((3, 36), requires_grad=False)
    for _ in range(8):
        add_layer_norm(*tensors, EPS, 0.5, backend="triton")
    assert all(2**32 <= seed < 2**63 for seed in drawn) and max(drawn) >= 2**62  # P(fail) = 2^-8
    low = 12345
    assert not torch.equal(keep_mask(low, 4, 64, 0.5), keep_mask(low + 2**40, 4, 64, 0.5))


# ---------------------------------------------------------------- custom ops, compile, dispatch


@pytest.mark.parametrize("dropout_p, keep_sum", [(0.0, True), (0.0, False), (0.3, True)])
def test_opcheck_forward(dropout_p, keep_sum):
    (x, residual, weight, bias), _ = make_inputs((7, 36), requires_grad=keep_sum)
    seed = seed_tensor(5) if dropout_p > 0 else None
    torch.library.opcheck(forward_op, (x, residual, weight, bias, EPS, dropout_p, seed, keep_sum))


def test_only_the_output_is_differentiable():
    tensors, _ = make_inputs((7, 36))
    outputs = forward_op(*tensors, EPS, 0.0, None, True)
    assert [output.requires_grad for output in outputs] == [True, False, False, False]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_backward(dropout_p):
    (x, residual, weight, bias), grad_out = make_inputs((7, 36), requires_grad=False)
    seed = seed_tensor(5) if dropout_p > 0 else None
    _out, total, mean, rstd = forward_op(x, residual, weight, bias, EPS, dropout_p, seed, True)
    torch.library.opcheck(backward_op, (grad_out, total, weight, mean, rstd, dropout_p, seed))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(dropout_p):
    tensors, grad_out = make_inputs((7, 36))
    compiled = torch.compile(triton_op(dropout_p), backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out, grads = forward_and_grads(compiled, tensors, grad_out)
    torch.manual_seed(0)
    expected_out, expected_grads = forward_and_grads(triton_op(dropout_p), tensors, grad_out)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-6)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-6)
    if dropout_p > 0:  # the seed is drawn when the graph runs, not frozen when it was traced
        assert not torch.equal(compiled(*tensors), compiled(*tensors))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records every call of the forward host launcher (and the keep_sum it was given)."""
    import fastmini.kernels.add_layer_norm as kernels

    calls = []
    launch = kernels.add_layer_norm_forward

    def recording(*args):
        calls.append({"keep_sum": args[-1]})
        return launch(*args)

    monkeypatch.setattr(kernels, "add_layer_norm_forward", recording)
    return calls


def test_dispatch_reaches_the_kernel_by_argument_and_by_environment(kernel_calls, monkeypatch):
    tensors, _ = make_inputs((7, 36))
    add_layer_norm(*tensors, EPS)  # conftest sets FASTMINI_BACKEND=torch
    assert kernel_calls == []
    add_layer_norm(*tensors, EPS, backend="triton")
    assert len(kernel_calls) == 1
    monkeypatch.setenv("FASTMINI_BACKEND", "triton")
    add_layer_norm(*tensors, EPS)
    assert len(kernel_calls) == 2
    monkeypatch.delenv("FASTMINI_BACKEND")
    add_layer_norm(*tensors, EPS)
    # Automatic: CPU tensors take the kernel under the interpreter (on here, tests/conftest.py); CUDA tensors
    # only once a GPU run has marked it verified, and where its measured rule says it pays off.
    automatic_is_triton = DEVICE.type == "cpu" or ("triton" in _VERIFIED_ON_GPU and _triton_pays_off_on_gpu(tensors[0]))
    assert len(kernel_calls) == 2 + automatic_is_triton


def test_inference_keeps_nothing_for_backward(kernel_calls):
    tensors, _ = make_inputs((7, 36), requires_grad=False)
    add_layer_norm(*tensors, EPS, backend="triton")
    (x, residual, weight, bias), _ = make_inputs((7, 36))
    with torch.no_grad():
        add_layer_norm(x, residual, weight, bias, EPS, backend="triton")
    add_layer_norm(x, residual, weight, bias, EPS, backend="triton")
    assert [call["keep_sum"] for call in kernel_calls] == [False, False, True]


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    tensors, _ = make_inputs((7, 36), device=torch.device("cpu"))  # CPU tensors on a GPU machine too
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA tensor"):
        add_layer_norm(*tensors, EPS, backend="triton")


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((7, 36), (7, 35), (36,), (36,)), "residual must have x's shape"),
        (((7, 36), (7, 36), (35,), (36,)), r"weight must have shape \(36,\)"),
        (((7, 36), (7, 36), (36,), (1, 36)), r"bias must have shape \(36,\)"),
    ],
)
def test_wrong_shapes_are_clear_errors(shapes, message):
    tensors = [torch.randn(shape, device=DEVICE) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        add_layer_norm(*tensors, EPS, backend="triton")


def test_other_bad_input_is_a_clear_error():
    x = torch.randn(2, 36, device=DEVICE)
    weight, bias = torch.ones(36, device=DEVICE), torch.zeros(36, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        add_layer_norm(x.long(), x, weight, bias, EPS, backend="triton")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        add_layer_norm(x, x, weight, bias, EPS, dropout_p=1.0, backend="triton")
    too_wide = torch.randn(1, 16385, device=DEVICE)
    wide_weight, wide_bias = torch.ones(16385, device=DEVICE), torch.zeros(16385, device=DEVICE)
    with pytest.raises(ValueError, match="support H <= 16384"):
        add_layer_norm(too_wide, too_wide, wide_weight, wide_bias, EPS, backend="triton")


@pytest.mark.parametrize("weight_dtype, bias_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_parameters_of_two_dtypes_beside_16_bit_input(weight_dtype, bias_dtype, backend):
    """Each is taken alone (fp32 beside bf16 input); together torch's CPU kernel refused them ("mixed dtype")."""
    generator = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(4, 36, generator=generator).bfloat16().to(DEVICE) for _ in range(2))
    weight = torch.randn(36, generator=generator).to(DEVICE, weight_dtype)
    bias = torch.randn(36, generator=generator).to(DEVICE, bias_dtype)
    out = add_layer_norm(x, residual, weight, bias, EPS, backend=backend)
    expected = torch.nn.functional.layer_norm((x + residual).float(), (36,), weight.float(), bias.float(), EPS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_the_automatic_choice_leaves_rows_too_wide_for_the_kernel_to_torch(monkeypatch, triton_launches):
    """Asked for by name the kernel refuses H > 16384 (above); chosen automatically (here the interpreter's
    choice, on a GPU while a graph records) such rows go to torch instead of failing."""
    monkeypatch.delenv("FASTMINI_BACKEND")  # tests/conftest.py sets torch for every test
    too_wide = torch.randn(1, 16385, device=DEVICE)
    wide_weight, wide_bias = torch.ones(16385, device=DEVICE), torch.zeros(16385, device=DEVICE)
    out = add_layer_norm(too_wide, too_wide, wide_weight, wide_bias, EPS)
    torch.testing.assert_close(out, add_layer_norm_ref(too_wide, too_wide, wide_weight, wide_bias, EPS))
    assert triton_launches["add_layer_norm"] == 0


# ---------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden", [(16384, 768), (1024, 312), (333, 4096)])
def test_gpu_sweep_at_real_sizes(rows, hidden, dtype):
    tensors, grad_out = make_inputs((rows, hidden), dtype=dtype)
    out, grads = forward_and_grads(triton_op(), tensors, grad_out)
    upcast = [t.detach().float().requires_grad_() for t in tensors]
    expected_out, expected_grads = forward_and_grads(reference_op, upcast, grad_out.to(dtype).float())
    atol, rtol = LOW_PRECISION_TOLERANCES.get(dtype, (1e-5, 1e-5))
    torch.testing.assert_close(out.float(), expected_out, atol=atol, rtol=rtol)
    for grad, expected in zip(grads[:2], expected_grads[:2], strict=True):
        torch.testing.assert_close(grad.float(), expected, atol=atol, rtol=rtol)
    # dweight/dbias sum `rows` terms: compare relative to their size
    for grad, expected in zip(grads[2:], expected_grads[2:], strict=True):
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad.float() / scale, expected / scale, atol=max(atol, 1e-5), rtol=rtol)


@pytest.mark.usefixtures("dropout_rng")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dropout_at_real_size():
    rows, hidden, dropout_p, seed = 16384, 768, 0.1, 77
    tensors, grad_out = make_inputs((rows, hidden))
    fixed_seed = seed_tensor(seed)
    out, grads = forward_and_grads(
        lambda x, r, w, b: forward_op(x, r, w, b, EPS, dropout_p, fixed_seed, True)[0], tensors, grad_out
    )
    keep = keep_mask(seed, rows, hidden, dropout_p)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.002
    expected_out, expected_grads = forward_and_grads(
        lambda x, r, w, b: F.layer_norm(r + x * keep / (1 - dropout_p), (hidden,), w, b, EPS), tensors, grad_out
    )
    torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
    for grad, expected in zip(grads, expected_grads, strict=True):
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(grad / scale, expected / scale, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("dropout_rng")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "other_dtype", [torch.float32, torch.bfloat16], ids=["fp32-residual-and-parameters", "all-bf16"]
)
def test_gpu_public_op_with_bf16_dropout_at_real_size(other_dtype, monkeypatch):
    """Training under autocast: the branch x arrives in bf16 and goes through dropout, while the residual and
    LayerNorm parameters stay fp32 (or, in a bf16 model, are bf16 too), through the public op, whose seed is
    drawn on the CPU. The seed it hands the kernel is read back, and output and gradients must match the fp32
    reference (on the same values) with that seed's mask."""
    # the module, not the function that fastmini.ops exports under the same name
    add_layer_norm_module = importlib.import_module("fastmini.ops.add_layer_norm")
    rows, hidden, dropout_p = 16384, 768, 0.1
    tensors, grad_out = make_inputs((rows, hidden), dtype=other_dtype)
    x = tensors[0].detach().bfloat16().requires_grad_()
    tensors = [x, *tensors[1:]]
    seeds = []
    forward = add_layer_norm_module._forward_op

    def recording_the_seed(*args):
        seeds.append(args[6])  # (x, residual, weight, bias, eps, dropout_p, seed, keep_sum)
        return forward(*args)

    monkeypatch.setattr(add_layer_norm_module, "_forward_op", recording_the_seed)
    out, grads = forward_and_grads(triton_op(dropout_p), tensors, grad_out)
    [seed] = seeds
    assert seed.device.type == "cpu" and out.dtype == other_dtype
    assert [g.dtype for g in grads] == [torch.bfloat16] + [other_dtype] * 3
    keep = keep_mask(int(seed), rows, hidden, dropout_p)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.002
    assert torch.all(grads[0][~keep] == 0)

    def reference_with_mask(x, r, w, b):
        return F.layer_norm(r + x * keep / (1 - dropout_p), (hidden,), w, b, EPS)

    upcast = [t.detach().float().requires_grad_() for t in tensors]
    expected_out, expected_grads = forward_and_grads(reference_with_mask, upcast, grad_out.to(out.dtype).float())
    # fp32 results are the fp32 reference's to rounding; bf16 ones are rounded once (and an all-bf16 sum too)
    atol, rtol = LOW_PRECISION_TOLERANCES[torch.bfloat16] if other_dtype == torch.bfloat16 else (1e-4, 1e-4)
    torch.testing.assert_close(out.float(), expected_out, atol=atol, rtol=rtol)
    names = ("x", "residual", "weight", "bias")
    for name, grad, expected in zip(names, grads, expected_grads, strict=True):
        # dweight/dbias sum `rows` terms: every gradient is compared relative to its size
        grad_atol, grad_rtol = (
            LOW_PRECISION_TOLERANCES[torch.bfloat16] if grad.dtype == torch.bfloat16 else (atol, rtol)
        )
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(
            grad.float() / scale, expected / scale, atol=grad_atol, rtol=grad_rtol, msg=lambda m, n=name: f"d{n}: {m}"
        )


def test_gradients_of_x_and_residual_accumulate_separately():
    """Without dropout d(x) = d(residual): the two leaves' .grad must still be two tensors, or a second
    backward (gradient accumulation) and any in-place change to one grad would reach the other."""
    generator = torch.Generator().manual_seed(0)
    x, residual, grad = (torch.randn(4, 36, generator=generator).to(DEVICE) for _ in range(3))
    x.requires_grad_(), residual.requires_grad_()
    weight, bias = torch.ones(36, device=DEVICE), torch.zeros(36, device=DEVICE)
    for _ in range(2):
        add_layer_norm(x, residual, weight, bias, EPS, backend="triton").backward(grad)
    once = torch.autograd.grad(add_layer_norm(x, residual, weight, bias, EPS, backend="torch"), x, grad)[0]
    torch.testing.assert_close(x.grad, 2 * once)
    torch.testing.assert_close(residual.grad, 2 * once)
    x.grad.mul_(0.5)
    torch.testing.assert_close(residual.grad, 2 * once)


def test_bf16_sum_and_output_round_to_nearest_like_torch():
    """Rows far from zero (x + 300), where rounding the sum by truncation (the interpreter's own cast)
    moves every normalised value: the kernel must round as torch's composition does."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 312, generator=generator) + 300).to(DEVICE, torch.bfloat16)
    residual = torch.randn(16, 312, generator=generator).to(DEVICE, torch.bfloat16)
    weight = torch.ones(312, dtype=torch.bfloat16, device=DEVICE)
    bias = torch.zeros(312, dtype=torch.bfloat16, device=DEVICE)
    fused = add_layer_norm(x, residual, weight, bias, EPS, backend="triton")
    composed = add_layer_norm(x, residual, weight, bias, EPS, backend="torch")
    assert (fused.float() - composed.float()).abs().max().item() <= 2**-7  # one bf16 step near 1


def test_x_and_residual_of_different_dtypes_each_get_a_full_precision_gradient():
    """fp32 x with a bf16 residual: x's gradient must not pass through the residual's dtype."""
    (x, residual, weight, bias), grad_out = make_inputs((8, 64))
    residual = residual.detach().to(torch.bfloat16).requires_grad_()
    tensors = (x, residual, weight, bias)
    grads = torch.autograd.grad(add_layer_norm(*tensors, EPS, backend="triton"), tensors, grad_out)
    expected = torch.autograd.grad(add_layer_norm_ref(*tensors, EPS), tensors, grad_out)
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(grads[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], expected[1])
    # the sum is fp32 (x's dtype), so the fp32 parameters' gradients are the reference's to fp32 rounding
    for name, grad, reference in zip(("weight", "bias"), grads[2:], expected[2:], strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_the_dropout_rng_schemes_draw_different_masks_and_an_unknown_one_is_named(monkeypatch):
    from fastmini.kernels import add_layer_norm as kernels

    masks = {}
    for scheme in kernels.DROPOUT_RNG_SCHEMES:
        monkeypatch.setattr(kernels, "DROPOUT_RNG", scheme)
        masks[scheme] = keep_mask(7, 16, 64, 0.5)
    assert not torch.equal(*masks.values())
    monkeypatch.setattr(kernels, "DROPOUT_RNG", "per-row")
    with pytest.raises(ValueError, match="DROPOUT_RNG must be one of .*got 'per-row'"):
        keep_mask(7, 16, 64, 0.5)
