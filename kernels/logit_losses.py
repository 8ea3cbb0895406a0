"""Triton kernels of the distillation's two losses on the masked rows' logits: the MLM cross-entropy and the
output KL, from one read of the student's and the teacher's (M, V) logits.

Per row (s the student's logits, t the teacher's, T the temperature, y the row's label):

    ce_r = lse(s) - s_y                                          (0 where y < 0 or y >= V: ignored)
    kl_r = sum_v p_v (log p_v - log q_v),   p = softmax(t / T),  q = softmax(s / T)
         = A / Z_t - log Z_t + log Z_s,   A = sum_v e^(t_v/T - m_t) ((t_v/T - m_t) - (s_v/T - m_s)),
           Z_t = sum_v e^(t_v/T - m_t),  Z_s = sum_v e^(s_v/T - m_s),  m_t, m_s the rows' maxima of t/T, s/T
    d ce_r / d s_v = softmax(s)_v - [v = y]
    d kl_r / d s_v = (q_v - p_v) / T

Why kernels: torch's composition makes fp32 copies of the (M, V) logits, log-softmaxes, the KL's elementwise
terms and their backward passes, ~15 passes of 200 MB at the recipe's 48 x 256 batch (1624 masked rows,
V = 30522). Here the forward reads both logits once, keeping running maxima and sums (rescaled when the
maximum grows, as flash attention's softmax does), and stores per row the two losses and the three
log-sum-exps; the backward reads both once more and writes the gradient in the student's dtype. The row
sums are added by one torch.sum on the device, in a fixed order (deterministic). The backward's two upstream
gradients come as a device tensor: nothing is read on the host. Accumulation in fp32 (fp64 for fp64 logits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastmini.kernels.interpreter import cast_output
from fastmini.kernels.launching import accumulator_dtypes, on_device

MAX_BLOCK_V = 4096  # vocabulary chunk a program holds at once
NUM_WARPS = 8


@triton.jit
def _chunk(student_ptr, teacher_ptr, row, start, vocab, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(s, t, columns, mask) of the row's columns [start, start + BLOCK_V); -inf outside the row."""
    columns = start + tl.arange(0, BLOCK_V)
    mask = columns < vocab
    offsets = row.to(tl.int64) * vocab + columns
    student = tl.load(student_ptr + offsets, mask=mask, other=float("-inf")).to(ACC_DTYPE)
    teacher = tl.load(teacher_ptr + offsets, mask=mask, other=float("-inf")).to(ACC_DTYPE)
    return student, teacher, columns, mask


@triton.jit
def _exp_below(values, maximum):
    """exp(values - maximum), 0 where values is -inf (also when the maximum is: no -inf - -inf)."""
    return tl.where(values == float("-inf"), 0.0, tl.exp(values - maximum))


@triton.jit
def _merge_maximum(maximum, values):
    """(new maximum, the factor that takes sums relative to the old one to the new) after a chunk."""
    new_maximum = tl.maximum(maximum, tl.max(values, axis=0))
    return new_maximum, _exp_below(maximum, new_maximum)


@triton.jit
def _forward_kernel(
    student_ptr, teacher_ptr, label_ptr, ce_ptr, kl_ptr, lse_ptr, lse_scaled_ptr, lse_teacher_ptr, vocab,
    INVERSE_TEMPERATURE: tl.constexpr, SAME_SCALE: tl.constexpr, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    inverse_temperature = tl.full([1], INVERSE_TEMPERATURE, ACC_DTYPE)  # a float argument would be fp32
    lowest = tl.full([1], float("-inf"), ACC_DTYPE)
    zero = tl.zeros([1], ACC_DTYPE)
    student_max, student_sum = tl.max(lowest, axis=0), tl.sum(zero, axis=0)  # of s
    scaled_max, scaled_sum = tl.max(lowest, axis=0), tl.sum(zero, axis=0)  # of s / T
    teacher_max, teacher_sum = tl.max(lowest, axis=0), tl.sum(zero, axis=0)  # of t / T
    # A = sum_v e^(t_v/T - M_t) ((t_v/T - M_t) - (s_v/T - M_s)) with the running maxima M_t, M_s: the gaps are
    # taken from each side's maximum, so a common offset of the logits never enters a difference of large
    # numbers (kl = A / Z_t - log Z_t + log Z_s). When a maximum grows, every earlier gap shifts by as much.
    weighted_gap = tl.sum(zero, axis=0)
    # Teacher mass on a word the student rules out (logit -inf) makes the KL +inf. Kept as a flag, out of the sums:
    # its gap would be -inf - (-inf) = NaN in a chunk where the student's maximum is still -inf, and an infinite sum
    # times a rescale that underflows to 0 is NaN too.
    unreachable = tl.sum(zero, axis=0) > 0.0
    for start in range(0, vocab, BLOCK_V):
        student, teacher, _columns, mask = _chunk(student_ptr, teacher_ptr, row, start, vocab, BLOCK_V, ACC_DTYPE)
        new_student_max, student_rescale = _merge_maximum(student_max, student)
        student_sum = student_sum * student_rescale + tl.sum(_exp_below(student, new_student_max), axis=0)
        scaled_student = student * inverse_temperature
        if SAME_SCALE:
            new_scaled_max = new_student_max
        else:
            new_scaled_max, scaled_rescale = _merge_maximum(scaled_max, scaled_student)
            scaled_sum = scaled_sum * scaled_rescale + tl.sum(_exp_below(scaled_student, new_scaled_max), axis=0)
        scaled_teacher = teacher * inverse_temperature
        new_teacher_max, teacher_rescale = _merge_maximum(teacher_max, scaled_teacher)
        if start > 0:  # the first chunk has no earlier gaps (and -inf maxima)
            shift = (new_scaled_max - scaled_max) - (new_teacher_max - teacher_max)
            weighted_gap += tl.where(teacher_sum > 0.0, teacher_sum * shift, 0.0)  # no earlier mass: nothing
        weights = _exp_below(scaled_teacher, new_teacher_max)
        # Where the teacher's probability is 0 (logit -inf: a masked word) the term is 0, as 0 log 0 is.
        counted_gap = mask & (scaled_teacher > float("-inf"))
        ruled_out = counted_gap & (scaled_student == float("-inf"))
        unreachable = unreachable | (tl.sum(ruled_out.to(tl.int32), axis=0) > 0)
        finite_gap = counted_gap & (scaled_student > float("-inf"))
        gaps = tl.where(finite_gap, (scaled_teacher - new_teacher_max) - (scaled_student - new_scaled_max), 0.0)
        weighted_gap = weighted_gap * teacher_rescale + tl.sum(weights * gaps, axis=0)
        teacher_sum = teacher_sum * teacher_rescale + tl.sum(weights, axis=0)
        student_max, scaled_max, teacher_max = new_student_max, new_scaled_max, new_teacher_max
    if SAME_SCALE:
        scaled_sum = student_sum
    lse = student_max + tl.log(student_sum)
    lse_scaled = scaled_max + tl.log(scaled_sum)
    lse_teacher = teacher_max + tl.log(teacher_sum)
    kl = weighted_gap / teacher_sum - tl.log(teacher_sum) + tl.log(scaled_sum)
    kl = tl.where(unreachable, float("inf"), kl)

    label = tl.load(label_ptr + row)
    counted = (label >= 0) & (label < vocab)
    label_logit = tl.load(student_ptr + row.to(tl.int64) * vocab + label, mask=counted, other=0.0).to(ACC_DTYPE)
    tl.store(ce_ptr + row, tl.where(counted, lse - label_logit, 0.0))
    tl.store(kl_ptr + row, kl)
    tl.store(lse_ptr + row, lse)
    tl.store(lse_scaled_ptr + row, lse_scaled)
    tl.store(lse_teacher_ptr + row, lse_teacher)


@triton.jit
def _backward_kernel(
    student_ptr, teacher_ptr, label_ptr, lse_ptr, lse_scaled_ptr, lse_teacher_ptr, upstream_ptr, grad_ptr, vocab,
    INVERSE_TEMPERATURE: tl.constexpr, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    inverse_temperature = tl.full([1], INVERSE_TEMPERATURE, ACC_DTYPE)
    lse = tl.load(lse_ptr + row)
    lse_scaled = tl.load(lse_scaled_ptr + row)
    lse_teacher = tl.load(lse_teacher_ptr + row)
    label = tl.load(label_ptr + row)
    counted = (label >= 0) & (label < vocab)  # an ignored row has no cross-entropy, so no gradient from it
    ce_upstream = tl.where(counted, tl.load(upstream_ptr).to(ACC_DTYPE), 0.0)  # d loss / d sum_r ce_r
    kl_upstream = tl.load(upstream_ptr + 1).to(ACC_DTYPE) * inverse_temperature  # d loss / d sum_r kl_r, / T
    for start in range(0, vocab, BLOCK_V):
        student, teacher, columns, mask = _chunk(student_ptr, teacher_ptr, row, start, vocab, BLOCK_V, ACC_DTYPE)
        probabilities = tl.exp(student - lse)
        one_hot = tl.where(columns == label, 1.0, 0.0)
        student_scaled = tl.exp(student * inverse_temperature - lse_scaled)
        teacher_scaled = tl.exp(teacher * inverse_temperature - lse_teacher)
        grad = ce_upstream * (probabilities - one_hot) + kl_upstream * (student_scaled - teacher_scaled)
        offsets = row.to(tl.int64) * vocab + columns
        tl.store(grad_ptr + offsets, cast_output(grad, grad_ptr.dtype.element_ty), mask=mask)


def _launch(student: torch.Tensor, temperature: float, block_v: int | None) -> dict:
    vocab = student.shape[-1]
    block_v = block_v or min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)
    tl_dtype, _ = accumulator_dtypes(student.dtype)
    return {
        "INVERSE_TEMPERATURE": 1.0 / temperature,
        "BLOCK_V": block_v,
        "ACC_DTYPE": tl_dtype,
        "num_warps": NUM_WARPS,
    }


def logit_losses_forward(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_sum, kl_sum, saved) of contiguous (M, V) logits and (M,) int64 labels: the two sums 0-dim (fp32, or
    fp64 for fp64 student logits), ``saved`` the (3, M) log-sum-exps the backward needs. ``block_v``
    overrides the vocabulary chunk (tests walk rows in several chunks with it)."""
    rows, vocab = student.shape
    _, acc_dtype = accumulator_dtypes(student.dtype)
    ce = torch.empty(rows, dtype=acc_dtype, device=student.device)
    kl = torch.empty(rows, dtype=acc_dtype, device=student.device)
    saved = torch.empty(3, rows, dtype=acc_dtype, device=student.device)
    if rows > 0 and vocab > 0:
        launch = _launch(student, temperature, block_v)
        with on_device(student):
            _forward_kernel[(rows,)](
                student, teacher, labels, ce, kl, saved[0], saved[1], saved[2], vocab,
                SAME_SCALE=temperature == 1.0, **launch,
            )  # fmt: skip
    return ce.sum(), kl.sum(), saved


def logit_losses_backward(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    saved: torch.Tensor,
    upstream: torch.Tensor,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """The gradient, in ``student``'s dtype and shape, of ``upstream[0] * ce_sum + upstream[1] * kl_sum``;
    ``upstream`` a two-element tensor on the logits' device."""
    rows, vocab = student.shape
    grad = torch.empty_like(student)
    if rows > 0 and vocab > 0:
        launch = _launch(student, temperature, block_v)
        with on_device(student):
            _backward_kernel[(rows,)](
                student, teacher, labels, saved[0], saved[1], saved[2], upstream, grad, vocab, **launch,
            )  # fmt: skip
    return grad
