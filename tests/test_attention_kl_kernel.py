"""The Triton attention-KL kernels against attention_kl_sum_ref: the loss and its gradient.

On the GPU the kernels run compiled (the module is then marked gpu); on the CPU through the Triton
interpreter (tests/conftest.py), so maps stay small; the GPU-only test at the end adds the recipe's size.
"""

from __future__ import annotations

import pytest
import torch
from fastmini.kernels import attention_kl as kernels

from fastmini.distill import losses
from fastmini.ops.attention_kl import ATTENTION_EPS, attention_kl_sum, attention_kl_sum_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []


def maps(batch, heads, seq, student_dtype, teacher_dtype, lengths=None, seed=0, sharpness=3.0):
    """Student and teacher probabilities (B, A, S, S), zero on padded keys as a masked softmax gives them, and
    the (B, S) real-token mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [seq] * batch)
    real = torch.arange(seq)[None, :] < lengths[:, None]
    key_mask = real[:, None, None, :]

    def probabilities():
        logits = torch.randn(batch, heads, seq, seq, generator=generator, dtype=torch.float64) * sharpness
        return logits.masked_fill(~key_mask, float("-inf")).softmax(-1).nan_to_num(0.0)

    student = probabilities().to(DEVICE, student_dtype).requires_grad_()
    return student, probabilities().to(DEVICE, teacher_dtype), real.to(DEVICE)


def value_and_gradient(fn, student, teacher, real, denominator=11.0, upstream=2.5):
    value = fn(student, teacher, real, denominator)
    (grad,) = torch.autograd.grad(value * upstream, student)
    return value.detach(), grad


def triton_kl(student, teacher, real, denominator):
    return attention_kl_sum(student, teacher, real, denominator, backend="triton")


@pytest.mark.parametrize("seq, heads, lengths", [(1, 1, [1]), (7, 3, [7, 4]), (33, 2, [33, 1, 20])])
def test_matches_the_reference_in_fp64(seq, heads, lengths):
    student, teacher, real = maps(len(lengths), heads, seq, torch.float64, torch.float64, lengths)
    value, grad = value_and_gradient(triton_kl, student, teacher, real)
    expected_value, expected_grad = value_and_gradient(attention_kl_sum_ref, student, teacher, real)
    assert value.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    padded_queries = ~real[:, None, :, None].expand_as(grad)
    assert (grad[padded_queries] == 0).all()  # padded query rows get no gradient


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # fp16: t / (s + eps) past 65504 is inf, as in torch
@pytest.mark.parametrize(
    "student_dtype, teacher_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
     (torch.float32, torch.float16)],
)  # fmt: skip
def test_mixed_dtypes_match_the_reference(student_dtype, teacher_dtype):
    """The recipe's maps under bf16 autocast: an fp32 (softmax) student and a bf16 teacher; 16-bit students and
    other teachers too. Values in fp32; the gradient in the student's dtype, rounded to nearest like torch's."""
    student, teacher, real = maps(2, 3, 19, student_dtype, teacher_dtype, [19, 12])
    value, grad = value_and_gradient(triton_kl, student, teacher, real)
    expected_value, expected_grad = value_and_gradient(attention_kl_sum_ref, student, teacher, real)
    assert value.dtype == torch.float32 and grad.dtype == student_dtype
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6)
    if student_dtype == torch.float32:
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    else:  # the same 16-bit value but for the odd element whose fp32 value sits on a rounding boundary, one step off
        assert (grad != expected_grad).float().mean() < 0.02
        info = torch.finfo(student_dtype)
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=info.eps, atol=info.smallest_normal)


def test_maps_with_more_keys_than_queries_and_fractional_weights():
    student, teacher, _ = maps(2, 3, 13, torch.float64, torch.float64)
    student, teacher = student.detach()[:, :, :9].requires_grad_(), teacher[:, :, :9]  # (B, A, 9 queries, 13 keys)
    weights = torch.rand(2, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    value, grad = value_and_gradient(triton_kl, student, teacher, weights)
    expected_value, expected_grad = value_and_gradient(attention_kl_sum_ref, student, teacher, weights)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_non_contiguous_maps():
    student, teacher, real = maps(2, 3, 8, torch.float64, torch.float64, [8, 5])
    transposed = student.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strided, same values
    expanded = teacher[:1].expand(2, -1, -1, -1)  # a broadcast view (stride 0)
    assert not transposed.is_contiguous() and not expanded.is_contiguous()
    value, grad = value_and_gradient(triton_kl, transposed, expanded, real)
    expected_value, expected_grad = value_and_gradient(attention_kl_sum_ref, transposed, expanded, real)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_maps_without_keys_give_zero():
    student = torch.zeros(2, 3, 4, 0, dtype=torch.float32, device=DEVICE, requires_grad=True)
    real = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    for backend in ("torch", "triton"):
        value = attention_kl_sum(student, student.detach(), real, 5.0, backend=backend)
        assert value.item() == 0.0
        assert torch.autograd.grad(value, student)[0].shape == student.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_misuse_is_the_same_error_on_every_backend(backend):
    student, teacher, real = maps(2, 3, 6, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="rows must be \\(B, S\\)"):
        attention_kl_sum(student, teacher, real[:1], 1.0, backend=backend)  # would broadcast in torch
    with pytest.raises(ValueError, match="rows must be"):
        attention_kl_sum(student, teacher, real[:, :4], 1.0, backend=backend)
    with pytest.raises(ValueError, match="one shape"):
        attention_kl_sum(student, teacher[:, :2], real, 1.0, backend=backend)
    with pytest.raises(ValueError, match="detach"):
        attention_kl_sum(student, teacher.clone().requires_grad_(), real, 1.0, backend=backend)
    for denominator in (0.0, -1.0, float("nan"), "2", True, None):
        with pytest.raises(ValueError, match="denominator must be a finite number > 0"):
            attention_kl_sum(student, teacher, real, denominator, backend=backend)
    counted = attention_kl_sum(student, teacher, real, 4, backend=backend)  # a count, however it comes
    torch.testing.assert_close(attention_kl_sum(student, teacher, real, torch.tensor(4), backend=backend), counted)
    with pytest.raises(TypeError, match="teacher must be float16"):
        attention_kl_sum(student, teacher.bool(), real, 1.0, backend=backend)
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        attention_kl_sum(student.tolist(), teacher, real, 1.0, backend=backend)


def test_a_second_derivative_is_refused_not_wrong():
    student, teacher, real = maps(2, 3, 6, torch.float64, torch.float64)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(triton_kl(student, teacher, real, 1.0), student, create_graph=True)


def test_rows_longer_than_one_chunk(monkeypatch):
    """Keys walked in several chunks, the last one partial (the launcher's MAX_BLOCK_K, lowered)."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_K", 16)
    student, teacher, real = maps(2, 2, 37, torch.float64, torch.float64, [37, 30])
    value, grad = value_and_gradient(triton_kl, student, teacher, real)
    expected_value, expected_grad = value_and_gradient(attention_kl_sum_ref, student, teacher, real)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_passes_gradcheck():
    student, teacher, real = maps(2, 2, 4, torch.float64, torch.float64, sharpness=1.0)  # no zero to step below
    real[1, 2:] = False  # padded query rows still
    assert torch.autograd.gradcheck(lambda s: triton_kl(s, teacher, real, 7.0), (student,))


def test_no_real_query_gives_zero_and_no_gradient():
    student, teacher, real = maps(2, 2, 6, torch.float32, torch.float32)
    value, grad = value_and_gradient(triton_kl, student, teacher, torch.zeros_like(real))
    assert value.item() == 0.0 and not grad.any()


def test_an_inference_mode_teacher_and_the_recipe_loss():
    """The distiller's teacher maps are inference tensors; losses.attention_kl takes the backend through."""
    student, _, real = maps(2, 3, 9, torch.float32, torch.float32, [9, 6])
    with torch.inference_mode():
        teacher = maps(2, 3, 9, torch.float32, torch.float32, [9, 6], seed=1)[1].clone()
    by_backend = {
        backend: value_and_gradient(lambda *a, b=backend: losses.attention_kl(*a, backend=b), student, teacher, real)
        for backend in ("torch", "triton")
    }
    torch.testing.assert_close(by_backend["triton"][0], by_backend["torch"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(by_backend["triton"][1], by_backend["torch"][1], rtol=1e-5, atol=1e-6)


def test_the_torch_backend_keeps_fp32_sums_under_autocast():
    """Its row sums are one vecdot, which autocast would run in bf16 (9e-5 off here): computed outside it."""
    student, teacher, real = maps(2, 3, 33, torch.float32, torch.float32, lengths=[33, 20])
    expected = attention_kl_sum(student, teacher, real, 11.0, backend="torch")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        under_autocast = attention_kl_sum(student, teacher, real, 11.0, backend="torch")
    torch.testing.assert_close(under_autocast, expected, rtol=1e-6, atol=0)


def test_the_reference_is_the_recipe_formula():
    """attention_kl_sum_ref is SPEC.md's kl_div(log(s + eps), t + eps) summed over real query rows."""
    student, teacher, real = maps(2, 2, 6, torch.float64, torch.float64, [6, 4])
    pointwise = torch.nn.functional.kl_div((student + ATTENTION_EPS).log(), teacher + ATTENTION_EPS, reduction="none")
    expected = pointwise[real[:, None, :, None].expand_as(pointwise)].sum() / 3.0
    torch.testing.assert_close(attention_kl_sum_ref(student, teacher, real, 3.0), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_recipe_size():
    """48 x 12 x 256 x 256 (the GPU benchmark's maps), fp32 student and bf16 teacher, ~10% padded queries."""
    lengths = [256] * 40 + [200, 180, 150, 120, 100, 80, 60, 40]
    student, teacher, real = maps(48, 12, 256, torch.float32, torch.bfloat16, lengths)
    value, grad = value_and_gradient(triton_kl, student, teacher, real, denominator=1e6)
    expected_value, expected_grad = value_and_gradient(attention_kl_sum_ref, student, teacher, real, 1e6)
    torch.testing.assert_close(value, expected_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
