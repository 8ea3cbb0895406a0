"""``--graph-teacher``: the teacher's forward replayed through one CUDA graph per batch shape.

The teacher is frozen and runs under inference mode, and (where it attends through transformers' attention
interface, see teacher_attention) its forward reads no value on the host: for one batch shape it launches the
same kernels every step. Recorded once per (batch size, padded length), it is replayed with one launch, and
the host's time goes to issuing the student's work instead of the teacher's ~30 kernels a layer.

Each shape's graph reads static input buffers (token ids, token types, the padding mask), which every call
fills. The mask is given to the teacher as its additive bias even when a batch has no padding (a zero bias):
transformers builds a mask of its own where none is given, and inside a capture (which it treats as tracing)
that builder copies a host scalar to the GPU, which a capture refuses; so one graph serves a shape with or
without padding. Each graph leaves its outputs in static tensors: the matched layers' hidden states and maps
and the last hidden state, which the next replay of that shape overwrites; and as every shape's graph draws on
one memory pool, another shape's replay may write its scratch values there too. The gathers of real and
masked rows and the MLM head run eagerly after the replay (their shapes change every batch). So a step's
losses and backward must be done with the maps before the teacher's next forward: the trainer's order (each
micro-batch's forward and backward, then the next). Shapes beyond ``max_graphs`` run eagerly
(``teacher_forward``).

``capture="eager"`` keeps this bookkeeping and replays by running the forward again into the same static
tensors: what the CPU tests check; the CUDA capture passed the same tests on an H200 (2026-11-26). The
trainer graphs its teacher by default on a GPU (speed_defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastmini.distill.distiller import (
    Batch,
    PaddedTeacherOutputs,
    TeacherOutputs,
    gathered_teacher_outputs,
    teacher_encoder_outputs,
    teacher_forward,
)
from fastmini.distill.models import Teacher
from fastmini.distill.teacher_attention import supports_matched_maps
from fastmini.runtime.cuda_graphs import static_zeros

CAPTURES = ("cuda", "eager")
WARMUP_RUNS = 2  # eager runs on a side stream before the capture: cuBLAS workspaces and lazy init outside it


@dataclass
class _Entry:
    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    outputs: PaddedTeacherOutputs
    replay: Callable[[], None]

    def fill(self, batch: Batch) -> None:
        self.input_ids.copy_(batch.input_ids)
        self.token_type_ids.copy_(batch.token_type_ids)
        self.attention_mask.copy_(batch.attention_mask)


class GraphedTeacher:
    """``teacher_forward(teacher, batch, layers, ...)`` with the encoder replayed from a graph per batch shape."""

    def __init__(
        self,
        teacher: Teacher,
        layers: tuple[int, ...],
        need_hidden: bool,
        need_attentions: bool,
        need_logits: bool,
        *,
        max_graphs: int = 4,
        capture: str = "cuda",
    ):
        if capture not in CAPTURES:
            raise ValueError(f"GraphedTeacher: capture must be one of {CAPTURES}, got {capture!r}")
        if not supports_matched_maps(teacher.encoder):
            raise ValueError(
                f"GraphedTeacher: the teacher ({type(teacher.encoder).__name__}) does not attend through "
                "transformers' attention interface, so its forward reads its mask on the host and cannot be recorded"
            )
        self.teacher, self.layers = teacher, layers
        self.needs = (need_hidden, need_attentions)
        self.need_logits = need_logits
        self.max_graphs, self.capture = max_graphs, capture
        self._entries: dict[tuple[int, int, bool], _Entry] = {}
        self._pool = None

    @property
    def static_bytes(self) -> int:
        """Bytes the recorded forwards keep allocated between replays: their static inputs and outputs (the matched
        layers' maps and hidden states). The graphs' private memory pool is reserved besides."""
        return sum(
            t.numel() * t.element_size()
            for entry in self._entries.values()
            for t in (entry.input_ids, entry.token_type_ids, entry.attention_mask, *_tensors(entry.outputs))
        )

    @property
    def captured_shapes(self) -> list[tuple[int, int]]:
        """(batch size, padded length) of every recorded forward."""
        return sorted(self._entries)

    def __call__(self, batch: Batch) -> TeacherOutputs:
        positions = batch.token_positions()
        key = tuple(batch.input_ids.shape)
        entry = self._entries.get(key)
        if entry is None and len(self._entries) >= self.max_graphs:
            return teacher_forward(self.teacher, batch, self.layers, *self.needs, self.need_logits)
        with torch.inference_mode():
            if entry is None:  # recorded on this batch, which the buffers then hold; nothing has run yet
                entry = self._entries[key] = self._record(batch)
            else:
                entry.fill(batch)
            entry.replay()
        return gathered_teacher_outputs(self.teacher, positions, entry.outputs, self.need_logits)

    def _record(self, batch: Batch) -> _Entry:
        ids = static_zeros(tuple(batch.input_ids.shape), batch.input_ids)
        types = static_zeros(tuple(batch.token_type_ids.shape), batch.token_type_ids)
        mask = static_zeros(tuple(batch.attention_mask.shape), batch.attention_mask)
        entry = _Entry(ids, types, mask, outputs=None, replay=None)  # type: ignore[arg-type]
        entry.fill(batch)

        def forward() -> PaddedTeacherOutputs:
            return teacher_encoder_outputs(self.teacher, ids, mask, types, self.layers, *self.needs)

        if self.capture == "eager":
            entry.outputs = _copied(forward())
            for static in _tensors(entry.outputs):
                static.zero_()  # as a graph's outputs before its first replay: recording runs no kernel

            def replay() -> None:
                for static, fresh in zip(_tensors(entry.outputs), _tensors(forward()), strict=True):
                    static.copy_(fresh)

        else:
            entry.outputs, graph = self._cuda_graph(forward, ids.device)
            replay = graph.replay
        entry.replay = replay
        return entry

    def _cuda_graph(self, forward, device: torch.device) -> tuple[PaddedTeacherOutputs, torch.cuda.CUDAGraph]:
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    forward()
            caller.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # every shape's graph in one pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = forward()
        return outputs, graph


def _tensors(outputs: PaddedTeacherOutputs) -> list[torch.Tensor]:
    return [*outputs.hidden, *outputs.attentions, outputs.last]


def _copied(outputs: PaddedTeacherOutputs) -> PaddedTeacherOutputs:
    """Static copies that later replays write into (normal tensors, not inference ones: see static_zeros)."""
    with torch.inference_mode(False):
        return PaddedTeacherOutputs(
            [t.clone() for t in outputs.hidden], [t.clone() for t in outputs.attentions], outputs.last.clone()
        )
