"""The public fused ops as a user meets them: misuse is one clear ValueError/TypeError naming the argument, the
same on every backend, before any backend runs; inputs that both backends take give the oracle's result.

On CPU the Triton backend runs in the interpreter (tests/conftest.py), so every shape here is tiny.
"""

from __future__ import annotations

import pytest
import torch

from fastmini.ops import (
    adapter_bottleneck,
    adapter_bottleneck_ref,
    add_layer_norm,
    add_layer_norm_ref,
    linear_gelu,
    linear_gelu_ref,
)

HIDDEN, BOTTLENECK, INTERMEDIATE, ROWS = 8, 3, 6, 5
EPS = 1e-5
BACKENDS = ["torch", "triton"]


def adapter_inputs():
    generator = torch.Generator().manual_seed(0)
    shapes = [(ROWS, HIDDEN), (BOTTLENECK, HIDDEN), (BOTTLENECK,), (HIDDEN, BOTTLENECK)] + [(HIDDEN,)] * 3
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    tensors[5] = 1 + 0.1 * tensors[5]
    return tensors


def add_layer_norm_inputs():
    generator = torch.Generator().manual_seed(1)
    shapes = [(ROWS, HIDDEN), (ROWS, HIDDEN), (HIDDEN,), (HIDDEN,)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def linear_gelu_inputs():
    generator = torch.Generator().manual_seed(2)
    shapes = [(ROWS, HIDDEN), (INTERMEDIATE, HIDDEN), (INTERMEDIATE,)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def call_adapter(tensors, backend, eps=EPS):
    return adapter_bottleneck(*tensors, eps, backend=backend)


def call_add_layer_norm(tensors, backend, eps=EPS, dropout_p=0.0):
    return add_layer_norm(*tensors, eps, dropout_p, backend=backend)


def call_linear_gelu(tensors, backend):
    return linear_gelu(*tensors, backend=backend)


OPS = {
    "adapter_bottleneck": (adapter_inputs, call_adapter),
    "add_layer_norm": (add_layer_norm_inputs, call_add_layer_norm),
    "linear_gelu": (linear_gelu_inputs, call_linear_gelu),
}
REFERENCES = {
    "adapter_bottleneck": lambda *tensors: adapter_bottleneck_ref(*tensors, EPS),
    "add_layer_norm": lambda *tensors: add_layer_norm_ref(*tensors, EPS),
    "linear_gelu": lambda *tensors: linear_gelu_ref(*tensors, "none"),
}
ARGUMENT_NAMES = {
    "adapter_bottleneck": ["x", "down_weight", "down_bias", "up_weight", "up_bias", "norm_weight", "norm_bias"],
    "add_layer_norm": ["x", "residual", "weight", "bias"],
    "linear_gelu": ["x", "weight", "bias"],
}
EVERY_ARGUMENT = [(op, index, name) for op, names in ARGUMENT_NAMES.items() for index, name in enumerate(names)]


def replaced(tensors, index, value):
    return [value if i == index else tensor for i, tensor in enumerate(tensors)]


# ---------------------------------------------------------------- misuse: one clear error, whichever backend


# Shape errors that torch's own ops reported obscurely ("mat1 and mat2 shapes cannot be multiplied", an IndexError)
# or not at all (a (1, H) residual broadcast on the torch backend, refused by the Triton one).
BAD_SHAPES = [
    ("adapter_bottleneck", 1, (BOTTLENECK, HIDDEN + 1), r"down_weight must be \(R, H\) = \(R, 8\)"),
    ("adapter_bottleneck", 2, (BOTTLENECK + 1,), r"down_bias must have shape \(3,\)"),
    ("adapter_bottleneck", 3, (HIDDEN, BOTTLENECK + 1), r"up_weight must have shape \(8, 3\)"),
    ("adapter_bottleneck", 6, (1, HIDDEN), r"norm_bias must have shape \(8,\)"),
    ("adapter_bottleneck", 0, (), r"x must be \(..., H\) with H > 0"),
    ("adapter_bottleneck", 0, (ROWS, 0), r"x must be \(..., H\) with H > 0"),
    ("add_layer_norm", 1, (1, HIDDEN), r"residual must have x's shape \(5, 8\)"),
    ("add_layer_norm", 2, (HIDDEN - 1,), r"weight must have shape \(8,\)"),
    ("add_layer_norm", 0, (), r"x must be \(..., H\) with H > 0"),
    ("linear_gelu", 1, (INTERMEDIATE, HIDDEN + 1), "x's last dimension must be the weight's hidden size 9"),
    ("linear_gelu", 2, (INTERMEDIATE + 1,), r"bias must have shape \(6,\)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, index, shape, message", BAD_SHAPES)
def test_wrong_shapes_are_named(op, index, shape, message, backend):
    make, call = OPS[op]
    tensors = make()
    if op == "add_layer_norm" and index == 0:  # residual follows x
        tensors = replaced(replaced(tensors, 0, torch.randn(shape)), 1, torch.randn(shape))
    else:
        tensors = replaced(tensors, index, torch.randn(shape))
    with pytest.raises(ValueError, match=f"{op}: {message}"):
        call(tensors, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, index, name", EVERY_ARGUMENT)
def test_a_tensor_on_another_device_is_named(op, index, name, backend):
    """The torch backend computed garbage from uninitialised memory with a meta weight next to a CPU x."""
    make, call = OPS[op]
    tensors = make()
    if index == 0:  # x on meta, everything else on the CPU: the first other argument is named
        tensors = replaced(tensors, 0, tensors[0].to("meta"))
        message = f"{op}: {ARGUMENT_NAMES[op][1]} is on cpu but x is on meta"
    else:
        tensors = replaced(tensors, index, tensors[index].to("meta"))
        message = f"{op}: {name} is on meta but x is on cpu"
    with pytest.raises(ValueError, match=message):
        call(tensors, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, index, name", EVERY_ARGUMENT)
def test_none_and_non_tensors_are_named(op, index, name, backend):
    """The Triton backend failed with AttributeError on a None bias, the torch one took it; neither takes it now."""
    make, call = OPS[op]
    with pytest.raises(TypeError, match=f"{op}: {name} must be a torch.Tensor, got NoneType"):
        call(replaced(make(), index, None), backend)
    with pytest.raises(TypeError, match=f"{op}: {name} must be a torch.Tensor, got list"):
        call(replaced(make(), index, make()[index].tolist()), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, index, name", EVERY_ARGUMENT)
def test_integer_tensors_are_named(op, index, name, backend):
    make, call = OPS[op]
    tensors = make()
    with pytest.raises(TypeError, match=f"{op}: {name} must be float16, bfloat16, float32 or float64, got torch.int64"):
        call(replaced(tensors, index, tensors[index].long()), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["adapter_bottleneck", "add_layer_norm"])
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_eps_must_be_finite_and_positive(op, eps, backend):
    """eps <= 0 or NaN ran and gave NaN/inf (constant rows with eps = 0, every row with NaN)."""
    make, call = OPS[op]
    with pytest.raises(ValueError, match=f"{op}: eps must be a finite number > 0"):
        call(make(), backend, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["adapter_bottleneck", "add_layer_norm"])
@pytest.mark.parametrize("eps", [torch.tensor(1e-5), "1e-5", True])
def test_eps_must_be_a_python_number(op, eps, backend):
    """A tensor eps would have to be read (a sync on a GPU); "1e-5" ran through the Triton backend's float()."""
    make, call = OPS[op]
    with pytest.raises(TypeError, match=f"{op}: eps must be a Python float"):
        call(make(), backend, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_p_must_be_a_python_number_in_range(backend):
    tensors = add_layer_norm_inputs()
    for dropout_p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"add_layer_norm: dropout_p must be in \[0, 1\)"):
            call_add_layer_norm(tensors, backend, dropout_p=dropout_p)
    with pytest.raises(TypeError, match="add_layer_norm: dropout_p must be a Python float"):
        call_add_layer_norm(tensors, backend, dropout_p=torch.tensor(0.1))


def test_a_backend_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match="backend must be a str or None, got int"):
        call_linear_gelu(linear_gelu_inputs(), 1)


@pytest.mark.parametrize("backend", ["Triton", "cuda ", "xla", ""])
def test_unknown_backend_names_are_refused(backend):
    with pytest.raises(ValueError, match="unknown backend="):
        call_adapter(adapter_inputs(), backend)


# ---------------------------------------------------------------- what both backends take, they agree on


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "activation_dtype, parameter_dtype, tolerance",
    [
        (torch.bfloat16, torch.float32, 5e-2),
        (torch.float16, torch.float32, 1e-2),
        (torch.float64, torch.float32, 1e-5),
        (torch.float32, torch.float64, 1e-5),
    ],
)
def test_parameters_in_another_dtype_follow_the_activation(op, activation_dtype, parameter_dtype, tolerance, backend):
    """The Triton backend took fp32 weights next to bf16/fp16/fp64 x (as under autocast); the torch backend
    failed inside F.linear ("mat1 and mat2 must have the same dtype")."""
    make, call = OPS[op]
    tensors = make()
    activations = 2 if op == "add_layer_norm" else 1
    mixed = [t.to(activation_dtype if i < activations else parameter_dtype) for i, t in enumerate(tensors)]
    for tensor in mixed:
        tensor.requires_grad_(True)
    out = call(mixed, backend)
    assert out.dtype == activation_dtype
    leaves = [t.detach().double().requires_grad_() for t in mixed]
    expected = REFERENCES[op](*leaves)
    torch.testing.assert_close(out.double(), expected.detach(), atol=tolerance, rtol=tolerance)
    grads = torch.autograd.grad(out.float().sum(), mixed)
    assert [g.dtype for g in grads] == [t.dtype for t in mixed]
    # and their values, against the fp64 reference; parameter gradients sum over rows, so the
    # tolerance is relative to the largest entry of each gradient (and absolute below 1)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for name, grad, reference in zip(ARGUMENT_NAMES[op], grads, expected_grads, strict=True):
        scale = max(reference.abs().max().item(), 1.0)
        torch.testing.assert_close(
            grad.double() / scale, reference / scale, atol=tolerance, rtol=tolerance, msg=lambda m, n=name: f"d{n}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_an_fp64_activation_under_autocast_keeps_its_fp32_parameters_in_fp64(op, backend):
    """Autocast leaves fp64 alone but would cast fp32 weights to bf16: the torch backend left the cast to it and
    F.linear failed ("mat1 and mat2 must have the same dtype") where the Triton backend computed in fp64."""
    make, call = OPS[op]
    tensors = make()
    activations = 2 if op == "add_layer_norm" else 1
    mixed = [t.double() if i < activations else t for i, t in enumerate(tensors)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(mixed, backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, REFERENCES[op](*(t.double() for t in tensors)), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gelu_of_zero_features_is_gelu_of_the_bias(backend):
    """H = 0 passes the op's checks; the Triton backend's reshape(-1, 0) was ambiguous and raised."""
    bias = torch.randn(INTERMEDIATE)
    out = linear_gelu(torch.randn(2, 3, 0), torch.randn(INTERMEDIATE, 0), bias, backend=backend)
    torch.testing.assert_close(out, torch.nn.functional.gelu(bias).expand(2, 3, INTERMEDIATE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("leading", [(), (2, 3), (1, 1, ROWS)])
def test_any_leading_dimensions_zero_rows_and_views(op, leading, backend):
    make, call = OPS[op]
    tensors = make()
    activations = 2 if op == "add_layer_norm" else 1
    for shape in (leading, (0,)):
        x_like = [torch.randn(*shape, HIDDEN) for _ in range(activations)]
        out = call(x_like + tensors[activations:], backend)
        assert out.shape[:-1] == shape
    # a transposed (non-contiguous) x against the torch backend on a contiguous copy
    views = [torch.randn(HIDDEN, ROWS).t() for _ in range(activations)]
    assert not views[0].is_contiguous()
    expected = call([v.contiguous() for v in views] + tensors[activations:], "torch")
    torch.testing.assert_close(call(views + tensors[activations:], backend), expected, atol=1e-5, rtol=1e-5)


def test_checks_trace_into_a_fullgraph_compile():
    x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias = adapter_inputs()
    residual, weight, bias = torch.randn(ROWS, HIDDEN), torch.ones(HIDDEN), torch.zeros(HIDDEN)
    intermediate_weight, intermediate_bias = torch.randn(INTERMEDIATE, HIDDEN), torch.randn(INTERMEDIATE)

    def block(x):
        y = adapter_bottleneck(x, down_weight, down_bias, up_weight, up_bias, norm_weight, norm_bias, EPS, "torch")
        y = add_layer_norm(y, residual, weight, bias, EPS, backend="torch")
        return linear_gelu(y, intermediate_weight, intermediate_bias, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["adapter_bottleneck", "add_layer_norm"])
def test_low_precision_changes_nothing_without_autocast_and_keeps_16_bit_under_it(op, backend):
    """``low_precision=True``: no autocast, the same result; under autocast (the CPU's, which leaves LayerNorm
    in the input's dtype) bf16 in, bf16 out on both backends, close to the default's result."""
    tensors = OPS[op][0]()
    kind = "adapter" if op == "adapter_bottleneck" else "norm"

    def run(tensors, low_precision):
        if kind == "adapter":
            return adapter_bottleneck(*tensors, EPS, backend=backend, low_precision=low_precision)
        return add_layer_norm(*tensors, EPS, backend=backend, low_precision=low_precision)

    assert torch.equal(run(tensors, True), run(tensors, False))
    activations = 1 if kind == "adapter" else 2
    half = [t.bfloat16() for t in tensors[:activations]] + tensors[activations:]
    with torch.autocast("cpu", torch.bfloat16):
        low, default = run(half, True), run(half, False)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), default.float(), rtol=0.02, atol=0.02)
