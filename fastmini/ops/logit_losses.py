"""The distillation's two losses on the masked rows' logits, together: the MLM cross-entropy and the output KL.

``logit_losses_sum(student, labels, teacher, temperature)`` is ``(ce_sum, kl_sum)`` over (M, V) logits:

    ce_sum = sum_r -log softmax(s_r)[y_r]                       (rows with label -100 left out)
    kl_sum = sum_r KL(softmax(t_r / T) || softmax(s_r / T))

fastmini.distill.losses scales them into the recipe's terms (the denominator, T^2).

Backends: "torch" (the composition, one fp32 log-softmax of the student's logits for both terms at T = 1;
autograd as usual) and "triton" (two kernels that read both logits once per pass: fastmini.kernels.logit_losses;
labels outside [0, V) are ignored there, as -100 is). Automatic is triton on CUDA (H200, 1624 x 30522 bf16
student, fp32 teacher: 1/4.4 of torch's GPU time at T = 1, 1/5.4 at T = 2), torch elsewhere (triton on CPU
tensors under TRITON_INTERPRET=1; torch under torch.compile, jit.trace and export); ``backend=`` or
``FASTMINI_BACKEND`` chooses. Autograd
Functions, not custom ops: the loss is never compiled or exported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastmini.ops.checks import HeldTarget, check_loss_inputs, check_tensor
from fastmini.ops.dispatch import choose

_OP = "logit_losses"
# Backends whose kernels, as they are now, have passed their tests on a GPU. Empty since commit 8ff9158 changed the
# forward kernel (a flag for a word the student rules out, -inf) after its last GPU run (H200, 2026-11-26,
# benchmarks/results/*-session-11.md): until a GPU session passes tests/test_logit_losses_kernel.py again, CUDA's
# automatic choice is torch's composition (the kernel stays reachable by backend="triton" / FASTMINI_BACKEND).
_VERIFIED_ON_GPU: tuple[str, ...] = ()


def log_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) over the last dimension, in fp32 (fp64 stays fp64; no division at T = 1)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def cross_entropy_sum(student_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_r -log_probs[r, y_r] over the rows whose label is not -100."""
    return F.nll_loss(student_log_probs, labels, reduction="sum")


def kl_sum(student_log_probs: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_r KL(softmax(t_r / T) || exp(student_log_probs_r)); the teacher is a target (no gradient)."""
    with torch.no_grad():
        # in the student's precision where it is the higher (an fp64 student's sums stay fp64-accurate)
        teacher_logits = teacher_logits.to(torch.promote_types(teacher_logits.dtype, student_log_probs.dtype))
        teacher_log_probs = log_probabilities(teacher_logits, temperature).to(student_log_probs.dtype)
        teacher_probs = teacher_log_probs.exp()
        # a -inf teacher logit (a masked vocabulary entry) contributes 0 log 0 = 0, as in the kernel, also where the
        # student masks it too: kl_div would compute 0 * (-inf - s), NaN (and 0 * (-inf + inf) with a clamp)
        masked = teacher_log_probs == float("-inf")
    return torch.where(masked, 0.0, teacher_probs * (teacher_log_probs - student_log_probs)).sum()


def logit_losses_sum_ref(
    student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The formulas in torch, differentiable by autograd: the oracle of both backends, and the torch backend."""
    student_log_probs = log_probabilities(student)
    scaled = student_log_probs if temperature == 1.0 else log_probabilities(student, temperature)
    return cross_entropy_sum(student_log_probs, labels), kl_sum(scaled, teacher, temperature)


class _TritonLogitLosses(torch.autograd.Function):
    """Saves the per-row log-sum-exps; reads the logits again in backward (never saved through autograd: the
    teacher's may be inference tensors). Its backward is not differentiable again."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, temperature: float):
        from fastmini.kernels.logit_losses import logit_losses_forward

        student, labels, teacher = student.contiguous(), labels.contiguous(), teacher.contiguous()
        ce_sum, kl_sum, saved = logit_losses_forward(student, labels, teacher, temperature)
        ctx.save_for_backward(student, labels, saved)
        ctx.teacher = HeldTarget(_OP, teacher)
        ctx.temperature = temperature
        return ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_kl: torch.Tensor):
        from fastmini.kernels.logit_losses import logit_losses_backward

        if torch.is_grad_enabled():  # a backward with create_graph=True: the kernels' gradient has no graph
            raise RuntimeError(f"{_OP}: the triton backend has no second derivative; use backend='torch'")
        student, labels, saved = ctx.saved_tensors
        upstream = torch.stack([grad_ce, grad_kl]).to(saved.dtype)  # on the device: no host read
        grad = logit_losses_backward(student, labels, ctx.teacher.get(), ctx.temperature, saved, upstream)
        return grad, None, None, None


_BACKENDS = {"torch": logit_losses_sum_ref, "triton": _TritonLogitLosses.apply}


def logit_losses_sum(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_sum, kl_sum)``, 0-dim tensors in fp32 (fp64 for fp64 logits), of the student's and the teacher's
    (M, V) logits (any float dtypes, one device) and the rows' (M,) int64 labels (-100: no cross-entropy).
    Gradients flow to ``student`` only (the teacher is a target: one that requires grad is refused)."""
    check_logits(student, labels, teacher, temperature)
    implementation = choose(_OP, student, backend, _BACKENDS, _VERIFIED_ON_GPU)
    return implementation(student, labels, teacher, float(temperature))


def check_logits(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    """Shapes, dtypes and devices, never values (no host read): misuse is the same error on every backend."""
    check_tensor(_OP, "student", student)  # floating logits: the kernel pads a row's end with -inf
    check_tensor(_OP, "teacher", teacher)
    if student.dim() != 2 or teacher.shape != student.shape or student.shape[1] == 0:
        raise ValueError(
            f"{_OP}: student and teacher logits must be (M, V) of one shape with V > 0, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != student.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(
            f"{_OP}: labels must be (M,) = {tuple(student.shape[:1])} int64 like the logits' rows, got "
            + (f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__)
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"{_OP}: temperature must be a finite number > 0, got {temperature!r}")
    check_loss_inputs(_OP, "logits", student=student, labels=labels, teacher=teacher)
