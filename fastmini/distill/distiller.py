"""One distillation forward: teacher under inference_mode, student on real tokens, the four losses.

The student runs through ``FastMiniModel.encode`` (unpadded: every GEMM on real tokens only)
and its MLM head is applied to the rows of masked tokens only; the teacher's MLM head, when
it has one, likewise. Hidden states are compared as packed (T, H) rows; attention maps as
(B, A, S, S) with padded query rows excluded (see losses.attention_kl). Only the student side
(``StudentSide``: the student and the optional hidden projection) holds trainable parameters,
so it is what DDP wraps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastmini.data.masking import IGNORE_INDEX
from fastmini.distill import losses
from fastmini.distill.models import Teacher
from fastmini.models import FastMiniForMaskedLM
from fastmini.ops import Packing
from fastmini.training.precision import autocast


@dataclass
class Batch:
    """A padded micro-batch, already masked: ``labels`` is -100 except at masked positions."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S) 1 for real tokens
    token_type_ids: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.token_type_ids, self.labels)
            )
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_masked(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def padded_length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class StepCounts:
    """What the loss terms divide by: counts of the whole global batch of an optimizer step (all
    micro-batches on all processes), so that micro-batch terms add up to the full batch's."""

    tokens: int  # real tokens: the hidden-state rows and the attention query rows
    masked: int  # masked tokens: the MLM and output-KL rows
    padded_length: int  # the longest window: one process padding the whole batch has this many key columns

    @classmethod
    def of(cls, batch: Batch) -> StepCounts:
        """One batch on its own (SPEC.md's formulas)."""
        return cls(batch.num_tokens, batch.num_masked, batch.padded_length)


@dataclass
class StudentOutputs:
    hidden: list[torch.Tensor]  # per recursion, packed (T, H_teacher) (projected when asked)
    attentions: list[torch.Tensor]  # per recursion, (B, A, S, S)
    masked_logits: torch.Tensor  # (M, V)
    masked_labels: torch.Tensor  # (M,)


def real_rows(state: torch.Tensor, packing: Packing | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """A hidden state's (T, H) rows of real tokens: packed already, or read off the padded layout (a student
    set to ``set_unpadding(False)``, whose padded positions ``key_padding_mask`` marks False)."""
    if packing is not None:
        return state
    rows = state.flatten(0, 1)
    return rows if key_padding_mask is None else rows[key_padding_mask.flatten()]


def masked_rows(labels: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    """Indices of the masked tokens among the student's packed rows (row-major order)."""
    packed = labels.flatten() if packing is None else packing.pack(labels)
    return (packed != IGNORE_INDEX).nonzero().squeeze(1)


class StudentSide(nn.Module):
    """The trainable half of a distillation step (what DDP wraps)."""

    def __init__(self, student: FastMiniForMaskedLM, projection: nn.Linear | None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, batch: Batch, need_hidden: bool = True, need_attentions: bool = True) -> StudentOutputs:
        encoded = self.student.fastmini.encode(
            batch.input_ids,
            batch.attention_mask,
            batch.token_type_ids,
            output_attentions=need_attentions,
            output_hidden_states=need_hidden,
            repad_hidden_states=False,
        )
        packing = encoded.packing
        hidden = []
        if need_hidden:
            for state in encoded.hidden_states[1:]:
                rows = real_rows(state, packing, encoded.key_padding_mask)
                hidden.append(self.projection(rows) if self.projection is not None else rows)
        rows = masked_rows(batch.labels, packing)
        masked_logits = self.student.lm_head(encoded.sequence.reshape(-1, encoded.sequence.shape[-1])[rows])
        masked_labels = batch.labels.flatten()[batch.labels.flatten() != IGNORE_INDEX]
        return StudentOutputs(hidden, list(encoded.attentions or ()), masked_logits, masked_labels)


@dataclass
class TeacherOutputs:
    hidden: list[torch.Tensor]  # per matched layer, packed (T, H) float32
    attentions: list[torch.Tensor]  # per matched layer, (B, A, S, S) (inference tensors)
    masked_logits: torch.Tensor | None  # (M, V) float32, or None without an MLM head


def teacher_forward(
    teacher: Teacher,
    batch: Batch,
    layers: tuple[int, ...],
    need_hidden: bool,
    need_attentions: bool,
    need_logits: bool,
) -> TeacherOutputs:
    """The teacher's matched hidden states (packed), attention maps, and logits at masked positions."""
    with torch.inference_mode():
        output = teacher.encoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
            output_hidden_states=need_hidden,
            output_attentions=need_attentions,
            return_dict=True,
        )
        attentions = [output.attentions[layer - 1] for layer in layers] if need_attentions else []
        hidden_padded = [output.hidden_states[layer] for layer in layers] if need_hidden else []
        logits = None
        if need_logits and teacher.head is not None:
            flat_masked = (batch.labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
            last = output.last_hidden_state.flatten(0, 1).index_select(0, flat_masked)
            logits = teacher.head(last)
    # Outside inference mode these selections are ordinary tensors that the losses may keep.
    real = batch.attention_mask.flatten().bool()
    hidden = [state.flatten(0, 1)[real].float() for state in hidden_padded]
    return TeacherOutputs(hidden, attentions, logits.float() if logits is not None else None)


class Distiller:
    """Computes the recipe's LossTerms for one micro-batch."""

    def __init__(
        self,
        student_side: nn.Module,
        teacher: Teacher,
        layers: tuple[int, ...],
        weights: losses.LossWeights,
        temperature: float,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.student_side = student_side
        self.teacher = teacher
        self.layers = layers
        self.weights = weights
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        self.need_hidden = weights.hidden > 0
        self.need_attentions = weights.attention > 0
        self.use_output_kl = weights.output > 0 and teacher.head is not None

    def __call__(self, batch: Batch, counts: StepCounts | None = None) -> losses.LossTerms:
        """The terms of ``batch``, divided by ``counts`` (default: the batch's own, SPEC.md's means)."""
        counts = counts or StepCounts.of(batch)
        device = batch.input_ids.device
        teacher = teacher_forward(
            self.teacher, batch, self.layers, self.need_hidden, self.need_attentions, self.use_output_kl
        )
        with autocast(device, self.autocast_dtype):
            student = self.student_side(batch, self.need_hidden, self.need_attentions)
        zero = student.masked_logits.sum() * 0.0
        real_tokens = batch.attention_mask.bool()
        attention = sum(
            (
                losses.attention_kl(s, t, real_tokens, counts.tokens * s.shape[1] * counts.padded_length)
                for s, t in zip(student.attentions, teacher.attentions, strict=True)
            ),
            zero,
        )
        hidden = sum(
            (
                losses.hidden_cosine(s.float(), t, counts.tokens)
                for s, t in zip(student.hidden, teacher.hidden, strict=True)
            ),
            zero,
        )
        mlm = (
            losses.masked_lm_cross_entropy(student.masked_logits, student.masked_labels, counts.masked)
            if self.weights.mlm
            else zero
        )
        output = (
            losses.output_kl(student.masked_logits, teacher.masked_logits, self.temperature, counts.masked)
            if self.use_output_kl
            else zero
        )
        return losses.combine(self.weights, mlm, attention, hidden, output)
