"""One distillation forward: teacher under inference_mode, student on real tokens, the four losses.

The student runs through ``FastMiniModel.encode`` (unpadded: every GEMM on real tokens only)
and its MLM head is applied to the rows of masked tokens only; the teacher's MLM head, when
it has one, likewise. Hidden states are compared as packed (T, H) rows; attention maps as
(B, A, S, S) with padded query rows excluded (see losses.attention_kl). Only the student side
(``StudentSide``: the student and the optional hidden projection) holds trainable parameters,
so it is what DDP wraps.

No step reads a tensor's values on the host. Which tokens are real and which are masked decides the
shapes of the packed and masked rows; on a GPU, finding that out from device tensors (``nonzero``,
boolean indexing, ``int(t.sum())``) makes the host wait until every kernel queued so far has run, and
the GPU then idles while the host issues the next ops. So ``TokenPositions`` works the positions
out once, on the host, where the batch is built (``Batch.to`` does it before moving the batch), and the
step only gathers rows at those indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastmini.data.masking import IGNORE_INDEX
from fastmini.distill import losses
from fastmini.distill.models import Teacher
from fastmini.distill.teacher_attention import matched_maps, padding_bias
from fastmini.models import FastMiniForMaskedLM
from fastmini.models.modeling import Encoded
from fastmini.ops import Packing
from fastmini.ops.dispatch import recording_a_graph
from fastmini.training.precision import autocast


@dataclass(frozen=True)
class TokenPositions:
    """Where a batch's real and masked tokens are: index tensors and counts, worked out on the batch's own
    device (the host, where batches are built) and moved with it. Masked tokens are the labelled real ones."""

    packing: Packing | None  # the real tokens; None when no token is padding (nothing to pack)
    masked_flat: torch.Tensor  # (M,) int64: flat (B*S) positions of the masked tokens, row-major
    masked_packed: torch.Tensor  # (M,) int64: the same tokens' rows among the packed real tokens
    tokens: int
    masked: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor, labels: torch.Tensor) -> TokenPositions:
        real = attention_mask.bool()
        real_flat = real.flatten()
        masked_flat = ((labels.flatten() != IGNORE_INDEX) & real_flat).nonzero().squeeze(1)
        tokens = int(real_flat.sum())
        packing = None if tokens == real.numel() else Packing.from_attention_mask(real)
        # Packed rows are the real tokens in row-major order: a token's row is the number of real tokens before it.
        masked_packed = (real_flat.long().cumsum(0) - 1).index_select(0, masked_flat)
        return cls(packing, masked_flat, masked_packed, tokens, int(masked_flat.numel()))

    def real_rows(self, state: torch.Tensor) -> torch.Tensor:
        """The (T, ...) real-token rows of a padded (B, S, ...) tensor."""
        rows = state.flatten(0, 1)
        return rows if self.packing is None else rows.index_select(0, self.packing.indices)

    def apply(self, fn) -> TokenPositions:
        """The same positions with ``fn`` applied to their tensors, e.g. ``lambda t: t.to(device)``."""
        packing = self.packing.apply(fn) if self.packing is not None else None
        return TokenPositions(packing, fn(self.masked_flat), fn(self.masked_packed), self.tokens, self.masked)


def _mover(device: torch.device | str, source: torch.Tensor):
    """Copies to ``device`` that do not wait for the GPU: from pinned memory when the copy goes from the host to
    a GPU (a copy from pageable memory first waits for the stream's queued work)."""
    pin = torch.device(device).type == "cuda" and source.device.type == "cpu"
    return lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=True)


@dataclass
class Batch:
    """A padded micro-batch, already masked: ``labels`` is -100 except at masked positions."""

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S) 1 for real tokens
    token_type_ids: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S)
    # Worked out when first asked for (token_positions) and kept: a batch whose mask or labels change after
    # that (in place, or through dataclasses.replace, which copies them) needs positions=None again.
    positions: TokenPositions | None = None

    def token_positions(self) -> TokenPositions:
        if self.positions is None:
            self.positions = TokenPositions.of(self.attention_mask, self.labels)
        return self.positions

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``, its token positions worked out first (where the batch is: see the module doc)."""
        positions = self.token_positions()
        move = _mover(device, self.input_ids)
        tensors = (self.input_ids, self.attention_mask, self.token_type_ids, self.labels)
        return Batch(*(move(t) for t in tensors), positions.apply(move))

    @property
    def num_tokens(self) -> int:
        return self.token_positions().tokens

    @property
    def num_masked(self) -> int:
        """Masked real tokens (a label at a padded position is neither counted nor trained on)."""
        return self.token_positions().masked

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
    masked_logits: torch.Tensor | None  # (M, V); None when no loss reads them
    masked_labels: torch.Tensor  # (M,)


def output_kl_on(weights: losses.LossWeights, teacher: Teacher) -> bool:
    """Whether the output-KL term runs: weighted, and a teacher with an MLM head to give its logits."""
    return weights.output > 0 and teacher.head is not None


def logits_feed_a_loss(weights: losses.LossWeights, teacher: Teacher) -> bool:
    """Whether any loss reads the student's MLM logits; without one its MLM head gets no gradient."""
    return weights.mlm > 0 or output_kl_on(weights, teacher)


class StudentSide(nn.Module):
    """The trainable half of a distillation step (what DDP wraps)."""

    def __init__(self, student: FastMiniForMaskedLM, projection: nn.Linear | None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(
        self, batch: Batch, need_hidden: bool = True, need_attentions: bool = True, need_logits: bool = True
    ) -> StudentOutputs:
        """The student's outputs that the losses read. Without ``need_logits`` the MLM head does not run: a tensor
        among DDP's outputs that no loss reads would make DDP expect gradients for its head."""
        positions = batch.token_positions()
        encoded, packed = self.encode(batch, positions, need_hidden, need_attentions)
        hidden = []
        if need_hidden:
            for state in encoded.hidden_states[1:]:
                rows = state if packed else positions.real_rows(state)
                hidden.append(self.projection(rows) if self.projection is not None else rows)
        masked = positions.masked_packed if packed else positions.masked_flat
        sequence = encoded.sequence.reshape(-1, encoded.sequence.shape[-1])
        masked_logits = self.student.lm_head(sequence.index_select(0, masked)) if need_logits else None
        masked_labels = batch.labels.flatten().index_select(0, positions.masked_flat)
        return StudentOutputs(hidden, list(encoded.attentions or ()), masked_logits, masked_labels)

    def encode(
        self, batch: Batch, positions: TokenPositions, need_hidden: bool, need_attentions: bool
    ) -> tuple[Encoded, bool]:
        """The student's encoder on the batch: its output (hidden states not re-padded) and whether its rows are
        the packed real tokens (else the padded (B, S) layout). What a subclass replaces to run it otherwise."""
        model = self.student.fastmini
        # An unpadding model gets the batch's own packing (or no mask without padding) rather than packing the
        # mask itself; a padded one (set_unpadding(False), or encode's choice while a graph is recorded) masks
        # padded keys.
        unpad = model.unpadding and not recording_a_graph()
        packed = unpad and positions.packing is not None
        encoded = model.encode(
            batch.input_ids,
            None if unpad else batch.attention_mask,
            batch.token_type_ids,
            output_attentions=need_attentions,
            output_hidden_states=need_hidden,
            repad_hidden_states=False,
            packing=positions.packing if packed else None,
        )
        return encoded, packed


def compiled_student_side(student_side: nn.Module) -> nn.Module:
    """``--compile-student``: the student side (or its DDP wrapper) through torch.compile with dynamic shapes,
    sharing its parameters. The step hands the student its packing and masked positions (no mask is read
    inside), so the encoder, adapters and MLM head trace as one graph, backward included; every batch has its
    own token and masked counts, which dynamic shapes serve without compiling again."""
    return torch.compile(student_side, dynamic=True)


@dataclass
class TeacherOutputs:
    hidden: list[torch.Tensor]  # per matched layer, packed (T, H) float32
    attentions: list[torch.Tensor]  # per matched layer, (B, A, S, S) (inference tensors)
    masked_logits: torch.Tensor | None  # (M, V) in the head's dtype, or None without an MLM head


@dataclass
class PaddedTeacherOutputs:
    """The teacher's forward before any row is gathered (what a CUDA graph of it leaves in static tensors)."""

    hidden: list[torch.Tensor]  # per matched layer, (B, S, H)
    attentions: list[torch.Tensor]  # per matched layer, (B, A, S, S)
    last: torch.Tensor  # (B, S, H): the input of the MLM head


def teacher_encoder_outputs(
    teacher: Teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor,
    layers: tuple[int, ...],
    need_hidden: bool,
    need_attentions: bool,
) -> PaddedTeacherOutputs:
    """The teacher encoder on a padded batch (``attention_mask`` None: no padding), in the caller's inference
    mode: eager attention (maps) in the matched layers only, SDPA elsewhere where the teacher allows (see
    teacher_attention); every layer's maps otherwise. No host read of any value in the first case."""
    with matched_maps(teacher.encoder, layers if need_attentions else ()) as maps:
        # transformers' mask builders check a given 2D mask on the host (mask.all()); in a capture they get the
        # additive bias they would build, which they take as it is.
        mask = attention_mask
        if mask is not None and maps is not None:
            mask = padding_bias(mask, teacher.encoder.dtype)
        output = teacher.encoder(
            input_ids=input_ids,
            attention_mask=mask,
            token_type_ids=token_type_ids,
            output_hidden_states=need_hidden,
            output_attentions=need_attentions and maps is None,
            return_dict=True,
        )
    if not need_attentions:
        attentions = []
    elif maps is not None:
        attentions = maps.collected()
    else:
        attentions = [output.attentions[layer - 1] for layer in layers]
    hidden = [output.hidden_states[layer] for layer in layers] if need_hidden else []
    return PaddedTeacherOutputs(hidden, attentions, output.last_hidden_state)


def gathered_teacher_outputs(
    teacher: Teacher, positions: TokenPositions, padded: PaddedTeacherOutputs, need_logits: bool
) -> TeacherOutputs:
    """The real tokens' hidden-state rows, the maps as they are, and the MLM head on the masked rows only."""
    logits = None
    if need_logits and teacher.head is not None:
        with torch.inference_mode():
            logits = teacher.head(padded.last.flatten(0, 1).index_select(0, positions.masked_flat))
    # Outside inference mode these selections are ordinary tensors that the losses may keep.
    hidden = [positions.real_rows(state).float() for state in padded.hidden]
    # The logits as the head gives them (bf16 under autocast): both loss backends upcast as they read, so an fp32
    # copy (198 MB at the recipe's 1624 x 30522) would only add traffic and memory.
    return TeacherOutputs(hidden, padded.attentions, logits)


def teacher_forward(
    teacher: Teacher,
    batch: Batch,
    layers: tuple[int, ...],
    need_hidden: bool,
    need_attentions: bool,
    need_logits: bool,
) -> TeacherOutputs:
    """The teacher's matched hidden states (packed), attention maps, and logits at masked positions (the
    attention maps of the matched layers only are computed where the teacher allows: see teacher_attention)."""
    positions = batch.token_positions()
    # No mask without padding: transformers' mask builders check a given one on the host (mask.all()).
    mask = batch.attention_mask if positions.packing is not None else None
    with torch.inference_mode():
        padded = teacher_encoder_outputs(
            teacher, batch.input_ids, mask, batch.token_type_ids, layers, need_hidden, need_attentions
        )
    return gathered_teacher_outputs(teacher, positions, padded, need_logits)


class Distiller:
    """Computes the recipe's LossTerms for one micro-batch. ``loss_backend``: of the loss ops
    (fastmini.ops.attention_kl and fastmini.ops.logit_losses; None: their automatic choice). ``graph_teacher``:
    run the teacher through fastmini.distill.graphed_teacher.GraphedTeacher (CUDA; ``"eager"``: its CPU stand-in)."""

    def __init__(
        self,
        student_side: nn.Module,
        teacher: Teacher,
        layers: tuple[int, ...],
        weights: losses.LossWeights,
        temperature: float,
        autocast_dtype: torch.dtype | None = None,
        loss_backend: str | None = None,
        graph_teacher: str | None = None,
    ):
        self.loss_backend = loss_backend
        self.student_side = student_side
        self.teacher = teacher
        self.layers = layers
        self.weights = weights
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        self.need_hidden = weights.hidden > 0
        self.need_attentions = weights.attention > 0
        self.use_output_kl = output_kl_on(weights, teacher)
        self.need_logits = logits_feed_a_loss(weights, teacher)
        self.graphed_teacher = None
        if graph_teacher is not None:
            from fastmini.distill.graphed_teacher import GraphedTeacher

            needs = (self.need_hidden, self.need_attentions, self.use_output_kl)
            self.graphed_teacher = GraphedTeacher(teacher, layers, *needs, capture=graph_teacher)

    def __call__(self, batch: Batch, counts: StepCounts | None = None) -> losses.LossTerms:
        """The terms of ``batch``, divided by ``counts`` (default: the batch's own, SPEC.md's means)."""
        counts = counts or StepCounts.of(batch)
        device = batch.input_ids.device
        if self.graphed_teacher is not None:
            teacher = self.graphed_teacher(batch)
        else:
            teacher = teacher_forward(
                self.teacher, batch, self.layers, self.need_hidden, self.need_attentions, self.use_output_kl
            )
        with autocast(device, self.autocast_dtype):
            student = self.student_side(batch, self.need_hidden, self.need_attentions, self.need_logits)
        # The sums' start and the value of a term switched off: a constant. (It was logits.sum() * 0.0, which kept
        # the graph connected but read the (M, V) logits once more forward and added zeros into their gradient
        # backward; every term on is a function of the student, empty masked rows included, so total has a graph.)
        zero = torch.zeros((), device=device)
        real_tokens = batch.attention_mask.bool()
        attention = sum(
            (
                losses.attention_kl(
                    s, t, real_tokens, counts.tokens * s.shape[1] * counts.padded_length, self.loss_backend
                )
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
        logits, labels = student.masked_logits, student.masked_labels
        if self.weights.mlm and self.use_output_kl:  # one log-softmax of the student's logits for both
            mlm, output = losses.masked_lm_and_output_kl(
                logits, labels, teacher.masked_logits, self.temperature, counts.masked, self.loss_backend
            )
        else:
            mlm = losses.masked_lm_cross_entropy(logits, labels, counts.masked) if self.weights.mlm else zero
            output = (
                losses.output_kl(logits, teacher.masked_logits, self.temperature, counts.masked)
                if self.use_output_kl
                else zero
            )
        return losses.combine(self.weights, mlm, attention, hidden, output)
