"""What the distillation trainer turns on by itself: the speed switches that measured faster and change
nothing it promises (``--graph-teacher``, ``--low-precision-maps``; each option left unset means "where this
says"). The benchmark's "fastmini" contender steps with the same choices (benchmarks/test_distill_step.py).

Measured on an H200 (benchmarks/results/2026-11-26-nvidia-h200-session-13-distill.md: bert-base teacher, the
published student, 48 x 256, bf16), one step against the same run's 41.9 ms with neither: the teacher replayed
from CUDA graphs 37.8 ms (the host, which issued the whole step, has ~30 launches a layer fewer to issue);
the student's maps in bf16 40.4 ms and 0.85 GiB less at peak. ``--low-precision-norms`` measured slower
(42.6 ms), so it stays off unless asked for. The two together, in session 15's interleaved run
(benchmarks/results/2026-11-26-nvidia-h200-session-15-distill.md): 49.4 ms against 58.1 with neither (the
teacher graphed alone 55.4; that run's host was slower than session 13's, and the eager step is host-bound),
4.89 against 6.15 GiB at peak. ``--compile-student`` (30.1 ms against the eager 43.0 in its own test of that
session) is not turned on here: its compile costs a minute or more, and the trainer's loop around it (checkpoints,
evaluation, the final save) has run with it on the CPU only (tests/test_distill_resume.py).
"""

from __future__ import annotations

import torch

from fastmini.distill.models import Teacher
from fastmini.distill.teacher_attention import supports_matched_maps


def graph_teacher_by_default(device: torch.device, teacher: Teacher) -> bool:
    """On a GPU, for a teacher whose forward can be recorded (it attends through transformers' attention
    interface, so reads nothing on the host; see graphed_teacher)."""
    return device.type == "cuda" and supports_matched_maps(teacher.encoder)


def low_precision_maps_by_default(autocast_dtype: torch.dtype | None) -> bool:
    """Under autocast: maps in the compute dtype, as transformers' own eager attention returns them."""
    return autocast_dtype is not None
