"""The distillation's MLM cross-entropy and output KL on the masked rows' logits: Triton kernels vs torch.

Baseline: the torch backend of ``fastmini.ops.logit_losses`` (one fp32 log-softmax of the student's logits for
both terms at T = 1, what the distiller runs by default), interleaved in the same process. The case is the GPU
distillation benchmark's: 1624 masked rows of V = 30522, the student's logits in bf16 (the MLM head under bf16
autocast), the teacher's in fp32; forward+backward (both sums, then the gradient of the student's logits), as
training runs it, at T = 1 (the recipe's) and T = 2.

Memory-bound: the minimum traffic reads both logits once forward and once backward, and writes the gradient.
"""

from __future__ import annotations

import pytest
import torch

from fastmini.ops.logit_losses import logit_losses_sum

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CPU path is the torch reference; the kernels are timed on CUDA only"
)

ROWS, VOCAB = 1624, 30522


def minimum_bytes() -> int:
    student, teacher = ROWS * VOCAB * 2, ROWS * VOCAB * 4
    return 2 * (student + teacher) + student  # forward: read both; backward: read both, write the gradient


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_losses(time_loss_backends, temperature):
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(ROWS, VOCAB, device=device, generator=generator) * 3).bfloat16().requires_grad_()
    teacher = torch.randn(ROWS, VOCAB, device=device, generator=generator) * 3
    labels = torch.randint(VOCAB, (ROWS,), device=device, generator=generator)

    time_loss_backends(
        lambda backend: logit_losses_sum(student, labels, teacher, temperature, backend=backend),
        student,
        minimum_bytes(),
        group=f"logit_losses forward+backward {ROWS}x{VOCAB} T={temperature:g}",
        shape=f"logits ({ROWS}, {VOCAB}), temperature {temperature:g}",
        dtype="student bf16, teacher fp32",
        backend="triton: fastmini.kernels.logit_losses; torch: fastmini.ops.logit_losses's torch backend",
    )
