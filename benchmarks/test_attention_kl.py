"""The distillation's attention loss, KL(teacher || student) over attention maps: Triton kernels vs torch.

Baseline: the torch backend of ``fastmini.ops.attention_kl`` (an autograd Function over torch's elementwise
ops, what the distiller runs by default), interleaved in the same process. One case is one layer's term of
the GPU distillation benchmark's step: maps of 48 x 12 x 256 x 256 (~10% padded query rows), the student's
probabilities in fp32 (softmax under bf16 autocast) or bf16, the teacher's in bf16; forward+backward (the
loss, then the gradient of the student map), as training runs it; the recipe has six such terms a step.

Memory-bound: the minimum traffic reads both maps once forward and once backward, and writes the gradient.
"""

from __future__ import annotations

import pytest
import torch

from fastmini.ops.attention_kl import attention_kl_sum

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CPU path is the torch reference; the kernels are timed on CUDA only"
)

SHAPE = (48, 12, 256, 256)
LENGTHS = [256] * 40 + [200, 180, 150, 120, 100, 80, 60, 40]
STUDENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def minimum_bytes(student_dtype: torch.dtype) -> int:
    elements = torch.Size(SHAPE).numel()
    student, teacher = elements * student_dtype.itemsize, elements * torch.bfloat16.itemsize
    return 2 * (student + teacher) + student  # forward: read both; backward: read both, write the gradient


@pytest.mark.parametrize("student_dtype_name", list(STUDENT_DTYPES))
def test_attention_kl(time_loss_backends, student_dtype_name):
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    real = torch.arange(SHAPE[2], device=device)[None, :] < torch.tensor(LENGTHS, device=device)[:, None]

    def probabilities(dtype):
        logits = torch.randn(SHAPE, device=device, generator=generator) * 3
        return logits.masked_fill(~real[:, None, None, :], float("-inf")).softmax(-1).to(dtype)

    student = probabilities(STUDENT_DTYPES[student_dtype_name]).requires_grad_()
    teacher = probabilities(torch.bfloat16)
    denominator = float(real.sum()) * SHAPE[1] * SHAPE[3]

    time_loss_backends(
        lambda backend: attention_kl_sum(student, teacher, real, denominator, backend=backend),
        student,
        minimum_bytes(STUDENT_DTYPES[student_dtype_name]),
        group=f"attention_kl forward+backward {'x'.join(map(str, SHAPE))} student {student_dtype_name}",
        shape=f"maps {SHAPE}, {sum(LENGTHS)} real query rows of {SHAPE[0] * SHAPE[2]}",
        dtype=f"student {student_dtype_name}, teacher bf16",
        backend="triton: fastmini.kernels.attention_kl; torch: fastmini.ops.attention_kl's torch backend",
    )
