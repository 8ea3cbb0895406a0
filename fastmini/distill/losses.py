"""The four distillation losses of the MiniALBERT recipe (SPEC.md, "Distillation recipe").

Each function takes what the recipe compares and nothing more, already reduced to the rows
that count: packed real tokens for the hidden states, the rows of masked tokens for the
logits. The attention maps stay (B, A, S, S) because the recipe's "mean" reduction divides by
the padded length S; only query rows of real tokens are summed.

Efficiency rules (DESIGN.md, "Distillation adds"):
- the attention KL is an autograd Function that saves nothing new for backward: the student
  probabilities are already kept by the attention's own backward and the teacher's map is
  only read (it may be an inference tensor);
- callers evaluate the MLM head and the output KL on masked rows only (15% of tokens).
Nothing here knows about models; the weights come from the config (``LossWeights``).

Every term is a sum divided by a count. By default the count is the batch's own (SPEC.md's
formulas for one batch); a micro-batch of a larger step passes ``denominator``, the count of
the whole global batch, so that its terms add up, over micro-batches and processes, to the
full batch's value (fastmini.training.normalization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmini.ops.attention_kl import attention_kl_sum, check_attention_maps
from fastmini.ops.logit_losses import cross_entropy_sum, kl_sum, log_probabilities, logit_losses_sum

_COSINE_EPS = 1e-8  # F.cosine_similarity's default: a row's norm is taken as at least this


@dataclass(frozen=True)
class LossWeights:
    """total = mlm * MLM + attention * attention-KL + hidden * (1 - cos) + output * output-KL."""

    mlm: float = 1.0
    attention: float = 3.0
    hidden: float = 3.0
    output: float = 5.0


@dataclass
class LossTerms:
    """The weighted total and its four unweighted terms (scalars; terms switched off are 0)."""

    total: torch.Tensor
    mlm: torch.Tensor
    attention: torch.Tensor
    hidden: torch.Tensor
    output: torch.Tensor

    NAMES = ("total", "mlm", "attention", "hidden", "output")

    def as_vector(self) -> torch.Tensor:
        """(total, mlm, attention, hidden, output) detached, in float64, where the terms are: reading them on the
        host is left to the caller, once a step (on a GPU each read waits for all queued work)."""
        return torch.stack([getattr(self, name).detach().double() for name in self.NAMES])


def attention_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    real_tokens: torch.Tensor,
    denominator: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of one layer's attention probabilities, "mean" reduction, in fp32.

    ``student``/``teacher``: (B, A, S, S) probabilities, any float dtype; ``real_tokens``: (B, S) bool. The sum
    runs over query rows of real tokens and every key column; it is divided by the number of
    those elements (rows x A x S), as ``KLDivLoss(reduction="mean")`` on the selected rows does,
    or by ``denominator`` (for a global batch: its real rows x A x its padded length; padded key
    columns add exactly 0 to the sum, so a micro-batch padded less sums the same). ``backend``: of
    fastmini.ops.attention_kl (torch, or triton's two kernels).
    """
    check_attention_maps(student, teacher, real_tokens)  # the op's own checks, before the shapes are read here
    _batch, heads, _seq, keys = student.shape
    # Counting the rows reads the mask on the host (on a GPU, a wait for all queued work): only without a denominator.
    count = denominator or int(real_tokens.sum()) * heads * keys
    if count == 0:
        return student.sum() * 0.0
    return attention_kl_sum(student, teacher, real_tokens, count, backend)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Mean over rows of 1 - cos(student, teacher); both (T, H), real tokens only (packed).
    ``denominator``: divide the sum by it instead of T."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    # F.cosine_similarity's value, (s / max(|s|, eps)) . (t / max(|t|, eps)), from one normalised copy (the
    # teacher's, a new tensor: the teacher's own may be inference tensors, which autograd cannot save) and two
    # row reductions; cosine_similarity normalises and clones both (T, H) inputs forward and reads them
    # backward (one layer's term, 4096 x 768 fp32, forward+backward, 2 CPU threads: 41.7 -> 17 ms).
    # In the inputs' dtype whatever autocast says (it would run vecdot in 16 bits; cosine_similarity it does not).
    with torch.autocast(student.device.type, enabled=False):
        with torch.no_grad():  # the teacher is a target: it gets no gradient
            teacher = teacher.to(student.dtype)
            teacher_unit = teacher / torch.linalg.vector_norm(teacher, dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        student_norm = torch.linalg.vector_norm(student, dim=-1).clamp_min(_COSINE_EPS)
        distances = 1.0 - torch.linalg.vecdot(student, teacher_unit) / student_norm
    return distances.sum() / (denominator or distances.shape[0])


def output_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, denominator: float | None = None
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, "batchmean" over the (M, V) masked rows (or the sum
    divided by ``denominator``)."""
    rows = student_logits.shape[0]
    if rows == 0:
        return student_logits.sum() * 0.0
    loss = kl_sum(log_probabilities(student_logits, temperature), teacher_logits, temperature)
    return loss / (denominator or rows) * temperature**2


def masked_lm_cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, denominator: float | None = None
) -> torch.Tensor:
    """Cross-entropy of the student over the (M, V) masked rows against their (M,) original ids
    (the sum divided by ``denominator``, else by M: rows labelled -100, which the distiller never passes, add
    nothing to the sum but count in M, unlike F.cross_entropy's mean)."""
    if labels.numel() == 0:
        return student_logits.sum() * 0.0
    return cross_entropy_sum(log_probabilities(student_logits), labels) / (denominator or labels.numel())


def masked_lm_and_output_kl(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    denominator: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked_lm_cross_entropy, output_kl) of the same rows together (fastmini.ops.logit_losses): torch's
    backend takes one fp32 log-softmax of the student's logits for both at T = 1 (each term alone copies the
    (M, V) logits to fp32 and log-softmaxes them, ~200 MB a pass at 48 x 256 tokens); the Triton kernels read
    both logits once forward and once backward. ``backend``: of that op (None: its automatic choice). Both
    divided by ``denominator``, else by the rows given (-100 rows included, as masked_lm_cross_entropy's)."""
    rows = student_logits.shape[0]
    if rows == 0:
        zero = student_logits.sum() * 0.0
        return zero, zero
    ce_sum, kl_sum = logit_losses_sum(student_logits, labels, teacher_logits, temperature, backend)
    return ce_sum / (denominator or rows), kl_sum / (denominator or rows) * temperature**2


def combine(
    weights: LossWeights,
    mlm: torch.Tensor,
    attention: torch.Tensor,
    hidden: torch.Tensor,
    output: torch.Tensor,
) -> LossTerms:
    """The recipe's total: mlm * MLM + attention * att + hidden * hid + output * out."""
    total = weights.mlm * mlm + weights.attention * attention + weights.hidden * hidden + weights.output * output
    return LossTerms(total=total, mlm=mlm, attention=attention, hidden=hidden, output=output)
