"""The attention probabilities and their dropout in one op that torch.compile keeps whole.

With probabilities (the distiller asks for them at every recursion) the student's attention runs
``softmax(scores)`` then dropout on the (B, A, S, S) maps. Under ``--compile-student`` inductor fused the two,
with the cast between, into one Triton kernel that also draws the dropout mask: on an H200 (2026-11-26,
48 x 12 x 256 x 256 bf16 scores) that kernel took ~1.05 ms a call, 6.3 ms of the compiled step's 33 ms of GPU
time, where the eager step's softmax and dropout kernels did not reach its top twelve kernels (under 0.14 ms
a call each). So while dynamo traces, ``softmax_dropout`` calls ``fastmini::softmax_dropout``, a custom op
inductor cannot look into: torch's two kernels run, forward and backward (drawing from the generator as the
eager step does), and the rest of the graph stays compiled. Eagerly it is the two calls as they were (the
op's dispatch would only add host time). UNMEASURED on a GPU: the distillation benchmark's compiled
contender times it.

``softmax_dropout_ref`` is the composition: (probabilities, dropped).

Known limit under torch.compile: AOT's common-subexpression pass merges two calls of the op on the same scores
tensor into one, so they would share one dropout mask (eager draws two). The model calls it once per attention;
a caller that needs two independent masks of the same scores calls it outside the compiled region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmini.ops.autocasting import autocast_softmax_dtype


def softmax_dropout_ref(
    scores: torch.Tensor, dropout_p: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax over the last dim, in ``dtype`` if given; the same with dropout ``dropout_p`` applied)."""
    probabilities = scores.softmax(dim=-1, dtype=dtype)
    dropped = F.dropout(probabilities, p=dropout_p, training=True) if dropout_p > 0.0 else probabilities
    return probabilities, dropped


@torch.library.custom_op("fastmini::softmax_dropout", mutates_args=())
def _softmax_dropout_op(
    scores: torch.Tensor, dropout_p: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities in ``dtype``, them with dropout p in (0, 1), the bool keep mask)."""
    probabilities = torch.softmax(scores, dim=-1, dtype=dtype)
    dropped, keep = torch.native_dropout(probabilities, dropout_p, True)
    return probabilities, dropped, keep


@_softmax_dropout_op.register_fake
def _softmax_dropout_fake(scores, dropout_p, dtype):
    probabilities = scores.new_empty(scores.shape, dtype=dtype)
    return probabilities, torch.empty_like(probabilities), scores.new_empty(scores.shape, dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    scores, dropout_p, _dtype = inputs
    probabilities, _dropped, keep = output
    ctx.mark_non_differentiable(keep)
    ctx.save_for_backward(probabilities, keep)
    ctx.scale = 1.0 / (1.0 - dropout_p)
    ctx.scores_dtype = scores.dtype


def _backward(ctx, grad_probabilities, grad_dropped, _grad_keep):
    probabilities, keep = ctx.saved_tensors
    # Both outputs come from the probabilities: the maps themselves (the attention loss) and through dropout.
    grad = None
    if grad_dropped is not None:
        grad = torch.ops.aten.native_dropout_backward(grad_dropped, keep, ctx.scale)
    if grad_probabilities is not None:
        grad = grad_probabilities if grad is None else grad + grad_probabilities
    if grad is None:
        return None, None, None
    return torch.ops.aten._softmax_backward_data(grad, probabilities, -1, ctx.scores_dtype), None, None


torch.library.register_autograd("fastmini::softmax_dropout", _backward, setup_context=_setup_context)


def softmax_dropout(
    scores: torch.Tensor, dropout_p: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_dropout_ref``; through ``fastmini::softmax_dropout`` while dynamo traces with dropout on."""
    if dropout_p <= 0.0 or not torch.compiler.is_compiling():
        return softmax_dropout_ref(scores, dropout_p, dtype)
    probabilities, dropped, _keep = _softmax_dropout_op(scores, dropout_p, dtype or autocast_softmax_dtype(scores))
    return probabilities, dropped
