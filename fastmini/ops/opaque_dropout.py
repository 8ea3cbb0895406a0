"""Dropout that torch.compile leaves to torch's own kernel: for the attention probabilities.

With probabilities (the distiller asks for them at every recursion) the student's attention runs
``softmax(scores)`` then dropout on the (B, A, S, S) maps. Under ``--compile-student`` inductor fused the two,
with the cast between, into one Triton kernel that draws the dropout mask with its own Philox code: on an H200
(2026-11-26, 48 x 12 x 256 x 256 bf16 maps) that kernel took ~1.05 ms a call, 6.3 ms of the compiled step's
33 ms of GPU time, where the eager step's softmax and dropout kernels did not reach its top twelve kernels
(under 0.14 ms a call each). So while dynamo traces, ``opaque_dropout`` calls ``fastmini::dropout``, a custom
op inductor cannot look into: torch's dropout kernel runs, forward and backward, the softmax and everything
else stay compiled. Eagerly it is F.dropout (the op's dispatch would only add host time). UNMEASURED on a
GPU: the distillation benchmark's compiled contender times it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("fastmini::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with dropout p in (0, 1) applied, the bool keep mask): torch.native_dropout in training."""
    dropped, keep = torch.native_dropout(x, p, True)
    return dropped, keep


@_dropout_op.register_fake
def _dropout_fake(x, p):
    return torch.empty_like(x), x.new_empty(x.shape, dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    _x, p = inputs
    _dropped, keep = output
    ctx.mark_non_differentiable(keep)
    ctx.save_for_backward(keep)
    ctx.scale = 1.0 / (1.0 - p)


def _backward(ctx, grad_dropped, _grad_keep):
    if grad_dropped is None:
        return None, None
    (keep,) = ctx.saved_tensors
    return torch.ops.aten.native_dropout_backward(grad_dropped, keep, ctx.scale), None


torch.library.register_autograd("fastmini::dropout", _backward, setup_context=_setup_context)


def opaque_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p, training=True); through ``fastmini::dropout`` while dynamo traces."""
    if p <= 0.0:
        return x
    if torch.compiler.is_compiling():
        return _dropout_op(x, p)[0]
    return F.dropout(x, p=p, training=True)
