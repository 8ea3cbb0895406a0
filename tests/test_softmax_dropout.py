"""``softmax_dropout``: softmax then F.dropout eagerly; under torch.compile the ``fastmini::softmax_dropout``
custom op, which inductor runs as torch's kernels instead of fusing them (fastmini/ops/softmax_dropout.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmini.ops.softmax_dropout import softmax_dropout

OP = torch.ops.fastmini.softmax_dropout.default


def scores(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, 5, generator=generator).to(dtype).requires_grad_()


def test_eagerly_it_is_softmax_then_f_dropout_draw_for_draw():
    x = scores()
    torch.manual_seed(3)
    probabilities = x.softmax(-1)
    expected = F.dropout(probabilities, p=0.3, training=True)
    torch.manual_seed(3)
    got_probabilities, got = softmax_dropout(x, 0.3)
    assert torch.equal(got_probabilities, probabilities) and torch.equal(got, expected)
    kept, same = softmax_dropout(x, 0.0)
    assert same is kept


def test_the_custom_op_schema_fake_and_autograd_registration():
    for test in ("test_schema", "test_faketensor", "test_autograd_registration"):
        torch.library.opcheck(OP, (scores(), 0.3, torch.float32), test_utils=test)


def graph_targets(function, *inputs) -> list:
    """The call targets of the graph dynamo hands its backend for ``function(*inputs)``."""
    targets = []

    def capture(graph_module, _example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(function, backend=capture, fullgraph=True)(*inputs)
    return targets


def test_under_compile_the_graph_calls_the_custom_op_and_no_softmax_or_dropout_of_its_own():
    targets = graph_targets(lambda x: softmax_dropout(x, 0.3), scores())
    assert OP in targets
    assert not [t for t in targets if t is not OP and ("dropout" in str(t) or "softmax" in str(t))]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_forward_and_backward_against_the_formula_with_the_drawn_mask(dtype):
    """Both outputs carry a gradient: the maps (the attention loss reads them) and the dropped ones."""
    p, x = 0.4, scores(seed=1)
    compiled = torch.compile(lambda t: softmax_dropout(t, p, dtype), backend="aot_eager", fullgraph=True)
    probabilities, dropped = compiled(x)
    expected = x.softmax(-1, dtype=dtype)
    torch.testing.assert_close(probabilities, expected)
    keep = dropped != 0
    assert 0 < int(keep.sum()) < keep.numel()
    torch.testing.assert_close(dropped[keep], (expected / (1 - p))[keep])
    generator = torch.Generator().manual_seed(2)
    upstream = [torch.randn(x.shape, generator=generator).to(expected.dtype) for _ in range(2)]
    (grad,) = torch.autograd.grad((probabilities, dropped), x, upstream)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream[0] + upstream[1] * keep / (1 - p))
    torch.testing.assert_close(grad, expected_grad)


def test_under_autocast_the_op_returns_what_softmax_would():
    """CUDA's autocast returns softmax in fp32, the CPU's in the input's dtype: the op is told which."""
    x = scores(dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        compiled = torch.compile(lambda t: softmax_dropout(t, 0.3), backend="aot_eager", fullgraph=True)
        probabilities, dropped = compiled(x)
        eager_probabilities, _ = softmax_dropout(x, 0.3)
    assert probabilities.dtype == dropped.dtype == eager_probabilities.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_under_cuda_autocast_the_compiled_maps_are_fp32_as_eager():
    x = scores(dtype=torch.bfloat16).detach().cuda().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        compiled = torch.compile(lambda t: softmax_dropout(t, 0.3), fullgraph=True)
        probabilities, dropped = compiled(x)
        eager_probabilities, _ = softmax_dropout(x, 0.3)
    assert probabilities.dtype == dropped.dtype == eager_probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, eager_probabilities)
    probabilities.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
