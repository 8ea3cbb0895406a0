"""``opaque_dropout``: F.dropout eagerly; under torch.compile the ``fastmini::dropout`` custom op, which inductor
runs as torch's kernel instead of fusing it (fastmini/ops/opaque_dropout.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmini.ops.opaque_dropout import opaque_dropout


def maps(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, 5, generator=generator).softmax(-1).requires_grad_()


def test_eagerly_it_is_f_dropout_draw_for_draw():
    x = maps()
    torch.manual_seed(3)
    expected = F.dropout(x, p=0.3, training=True)
    torch.manual_seed(3)
    assert torch.equal(opaque_dropout(x, 0.3), expected)
    assert opaque_dropout(x, 0.0) is x


def test_the_custom_op_schema_fake_and_autograd_registration():
    x = maps()
    for test in ("test_schema", "test_faketensor", "test_autograd_registration"):
        torch.library.opcheck(torch.ops.fastmini.dropout.default, (x, 0.3), test_utils=test)


def graph_targets(function, *inputs) -> list:
    """The call targets of the graph dynamo hands its backend for ``function(*inputs)``."""
    targets = []

    def capture(graph_module, _example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(function, backend=capture, fullgraph=True)(*inputs)
    return targets


def test_under_compile_the_graph_calls_the_custom_op_and_no_dropout_of_its_own():
    targets = graph_targets(lambda x: opaque_dropout(x.softmax(-1), 0.3), maps())
    assert torch.ops.fastmini.dropout.default in targets
    assert not [t for t in targets if "dropout" in str(t) and t is not torch.ops.fastmini.dropout.default]


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_compiled_forward_and_backward_keep_what_they_drop_and_scale_the_rest(p):
    x = maps(seed=1)
    compiled = torch.compile(lambda t: opaque_dropout(t, p), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    keep = out != 0
    assert 0 < int(keep.sum()) < keep.numel()
    torch.testing.assert_close(out[keep], (x / (1 - p))[keep])
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(grad, upstream * keep / (1 - p))
