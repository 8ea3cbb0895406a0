"""The Triton logit-loss kernels (MLM cross-entropy + output KL) against logit_losses_sum_ref: values and gradient.

On the GPU the kernels run compiled (the module is then marked gpu); on the CPU through the Triton
interpreter (tests/conftest.py), so vocabularies stay small; the GPU-only test at the end adds the recipe's size.
"""

from __future__ import annotations

import pytest
import torch
from fastmini.kernels import logit_losses as kernels

from fastmini.distill import losses
from fastmini.ops.logit_losses import logit_losses_sum, logit_losses_sum_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []


def logits(rows, vocab, student_dtype=torch.float64, teacher_dtype=torch.float64, seed=0, scale=3.0, ignored=()):
    """Student and teacher logits (M, V) and labels (M,), -100 at the ``ignored`` rows."""
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale).to(DEVICE, student_dtype)
    teacher = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale).to(DEVICE, teacher_dtype)
    labels = torch.randint(vocab, (rows,), generator=generator)
    labels[list(ignored)] = -100
    return student.requires_grad_(), labels.to(DEVICE), teacher


def sums_and_gradient(fn, student, labels, teacher, temperature, upstream=(1.5, -0.7)):
    ce_sum, kl_sum = fn(student, labels, teacher, temperature)
    (grad,) = torch.autograd.grad(upstream[0] * ce_sum + upstream[1] * kl_sum, student)
    return ce_sum.detach(), kl_sum.detach(), grad


def triton(student, labels, teacher, temperature):
    return logit_losses_sum(student, labels, teacher, temperature, backend="triton")


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("vocab, block_v", [(37, None), (300, 64), (1000, 256)], ids=["one-chunk", "5-chunks", "4"])
def test_fp64_matches_the_formula(vocab, block_v, temperature, monkeypatch):
    """Several rows, one ignored; the vocabulary in one chunk or walked in several, the last one partial."""
    if block_v:
        monkeypatch.setattr(kernels, "MAX_BLOCK_V", block_v)
    student, labels, teacher = logits(6, vocab, ignored=(2,))
    actual = sums_and_gradient(triton, student, labels, teacher, temperature)
    expected = sums_and_gradient(logit_losses_sum_ref, student, labels, teacher, temperature)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    student, labels, teacher = logits(3, 20, ignored=(1,))

    def weighted(s):
        ce_sum, kl_sum = triton(s, labels, teacher, 1.5)
        return 0.3 * ce_sum + 1.7 * kl_sum

    assert torch.autograd.gradcheck(weighted, (student,), eps=1e-6, atol=1e-8)


def test_extreme_logits_stay_finite_and_exact():
    """Logits of +-1e4 (a maximum that jumps between chunks): the running sums are rescaled, never overflow."""
    student, labels, teacher = logits(4, 300, scale=1.0)
    with torch.no_grad():
        student[0, 250] = 1e4  # the row's maximum arrives in its last chunk
        teacher[1, 10] = 1e4
        teacher[1, 290] = 2e4
        student[2] -= 1e4
    actual = sums_and_gradient(triton, student, labels, teacher, 1.0)
    expected = sums_and_gradient(logit_losses_sum_ref, student, labels, teacher, 1.0)
    for got, want in zip(actual, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_masked_words_in_the_first_chunk(monkeypatch):
    """Logits of -inf (a masked vocabulary) filling a row's first chunk: the running sums start from nothing,
    never from -inf - -inf. The student's: torch's cross-entropy and gradient. The teacher's: words of
    probability 0 add 0 to the KL (0 log 0), where torch's kl_div gives NaN."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 64)
    student, labels, teacher = logits(3, 300)
    with torch.no_grad():
        student[0, :64] = float("-inf")
        teacher[1, :64] = float("-inf")
        teacher[2, :128] = float("-inf")
    labels[0] = 100  # a word the student can predict
    ce_sum, _kl_sum = triton(student, labels, teacher, 1.0)
    (grad,) = torch.autograd.grad(ce_sum, student)
    expected_ce, _ = logit_losses_sum_ref(student, labels, teacher, 1.0)
    (expected_grad,) = torch.autograd.grad(expected_ce, student)
    torch.testing.assert_close(ce_sum, expected_ce.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)

    # The KL of the rows with a masked teacher (row 0's is infinite: the student gives 0 where it has mass).
    student, teacher = student[1:].detach(), teacher[1:]
    _ce_sum, kl_sum = triton(student, labels[1:], teacher, 1.0)
    teacher_probabilities = teacher.softmax(-1)
    log_ratio = teacher.log_softmax(-1) - student.log_softmax(-1)
    expected_kl = torch.where(teacher_probabilities > 0, teacher_probabilities * log_ratio, 0.0).sum()
    torch.testing.assert_close(kl_sum, expected_kl, rtol=1e-12, atol=1e-12)
    # and the torch backend (the oracle, the CPU's path) agrees: 0 log 0 = 0 there too, not kl_div's NaN
    _ce, torch_kl = logit_losses_sum(student.requires_grad_(), labels[1:], teacher, 1.0, backend="torch")
    (torch_grad,) = torch.autograd.grad(torch_kl, student)
    torch.testing.assert_close(torch_kl.detach(), expected_kl, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(torch_grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("block_v", [64, 512], ids=["first-chunk-ruled-out", "one-chunk"])
def test_teacher_mass_on_a_word_the_student_rules_out_makes_the_kl_infinite(block_v, temperature, monkeypatch):
    """Row 0's student gives probability 0 to its first 64 words, where the teacher has mass: KL = +inf, as the
    formula (the oracle) says, however the vocabulary is chunked (a whole first chunk of -inf gave NaN)."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", block_v)
    student, labels, teacher = logits(2, 300)
    student = student.detach()
    student[0, :64] = float("-inf")
    labels[0] = 100
    _ce, kl_sum = triton(student[:1], labels[:1], teacher[:1], temperature)
    _ce, expected = logit_losses_sum_ref(student[:1], labels[:1], teacher[:1], temperature)
    assert kl_sum.item() == expected.item() == float("inf")
    _ce, kl_sum = triton(student, labels, teacher, temperature)  # one such row makes the sum infinite
    assert kl_sum.item() == float("inf")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_word_masked_in_both_student_and_teacher_adds_nothing(backend):
    """A vocabulary entry of -inf on both sides (a padded vocabulary) is a word neither can give: both backends
    give what the vocabulary without it gives (the torch backend's clamped kl_div computed 0 * inf, NaN)."""
    student, labels, teacher = logits(3, 40)
    with torch.no_grad():
        student[:, 0] = teacher[:, 0] = float("-inf")
    labels = torch.tensor([1, 2, -100])
    student = student.detach().requires_grad_()
    ce_sum, kl_sum = logit_losses_sum(student, labels, teacher, 2.0, backend=backend)
    (grad,) = torch.autograd.grad(ce_sum + kl_sum, student)
    without = student.detach()[:, 1:].clone().requires_grad_()
    expected_ce, expected_kl = logit_losses_sum_ref(without, labels - (labels >= 0).long(), teacher[:, 1:], 2.0)
    (expected_grad,) = torch.autograd.grad(expected_ce + expected_kl, without)
    torch.testing.assert_close(torch.stack([ce_sum, kl_sum]).detach(), torch.stack([expected_ce, expected_kl]).detach())
    torch.testing.assert_close(grad[:, 1:], expected_grad)
    assert (grad[:, 0] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_fp64_student_takes_a_lower_precision_teacher_in_fp64(backend):
    """Sums of an fp64 student are fp64-accurate whatever the teacher's dtype, on both backends: the torch backend
    took the teacher's log-softmax in fp32 (1e-8 off the kernel's)."""
    student, labels, teacher = logits(4, 50, teacher_dtype=torch.float32)
    ce_sum, kl_sum = logit_losses_sum(student, labels, teacher, 2.0, backend=backend)
    expected_ce, expected_kl = logit_losses_sum_ref(student, labels, teacher.double(), 2.0)
    assert kl_sum.dtype == torch.float64
    torch.testing.assert_close(torch.stack([ce_sum, kl_sum]), torch.stack([expected_ce, expected_kl]), rtol=1e-13,
                               atol=1e-13)  # fmt: skip


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=["teacher-fp32", "teacher-bf16"])
def test_low_precision_logits(student_dtype, teacher_dtype, monkeypatch):
    """As the recipe runs it (bf16 student logits under autocast): sums in fp32 against the fp64 formula of the
    same values; the gradient in the student's dtype, to its rounding."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 128)
    student, labels, teacher = logits(5, 500, student_dtype, teacher_dtype)
    ce_sum, kl_sum, grad = sums_and_gradient(triton, student, labels, teacher, 1.0)
    upcast = student.detach().double().requires_grad_()
    expected = sums_and_gradient(logit_losses_sum_ref, upcast, labels, teacher.double(), 1.0)
    assert ce_sum.dtype == kl_sum.dtype == torch.float32 and grad.dtype == student_dtype
    torch.testing.assert_close(ce_sum.double(), expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl_sum.double(), expected[1], rtol=1e-6, atol=1e-6)
    rounding = 2**-8 if student_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(grad.double(), expected[2], rtol=rounding, atol=rounding * expected[2].abs().max())


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_fp32_kl_of_close_distributions_survives_an_offset(offset, monkeypatch):
    """A student close to its teacher (a small KL) with logits offset by a constant: the kernels take every gap
    from each side's running maximum, so the offset never enters a difference of large numbers (written as
    lse(s) - lse(t) + E_p[t - s] it cost 3.5e-2 of the KL at +1000, torch's composition 2e-5)."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 128)
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(4, 500, generator=generator, dtype=torch.float64) * 3 + offset
    student = teacher + 0.05 * torch.randn(4, 500, generator=generator, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.int64)
    _ce_sum, kl_sum = triton(student.float().to(DEVICE), labels.to(DEVICE), teacher.float().to(DEVICE), 1.0)
    _ce, expected = logit_losses_sum_ref(student.float().double(), labels, teacher.float().double(), 1.0)
    assert abs(kl_sum.item() / expected.item() - 1) < 1e-4


def test_the_distillers_terms_through_either_backend_agree():
    """losses.masked_lm_and_output_kl with the kernels gives the torch backend's terms and gradient."""
    student, labels, teacher = logits(7, 200, torch.float32, torch.float32, ignored=(3,))
    results = {}
    for backend in ("torch", "triton"):
        mlm, output = losses.masked_lm_and_output_kl(student, labels, teacher, 2.0, 5.0, backend=backend)
        (grad,) = torch.autograd.grad(mlm + output, student)
        results[backend] = (mlm.detach(), output.detach(), grad)
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_rows_inference_teacher_and_strided_logits():
    student, labels, teacher = logits(0, 50)
    ce_sum, kl_sum = triton(student, labels, teacher, 1.0)
    assert ce_sum.item() == kl_sum.item() == 0.0
    wide, labels, _ = logits(4, 100)
    student = wide[:, ::2]  # strided: copied to contiguous before the kernels
    with torch.inference_mode():
        teacher = torch.randn(4, 50, dtype=torch.float64, device=DEVICE)
    labels = labels % 50
    actual = sums_and_gradient(triton, student, labels, teacher, 1.0)
    expected = sums_and_gradient(logit_losses_sum_ref, student, labels, teacher, 1.0)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_misuse_is_one_clear_error():
    student, labels, teacher = logits(3, 10)
    with pytest.raises(ValueError, match="one shape"):
        logit_losses_sum(student, labels, teacher[:, :9], 1.0)
    with pytest.raises(ValueError, match="int64"):
        logit_losses_sum(student, labels.int(), teacher, 1.0)
    for temperature in (0.0, float("inf")):  # inf gave NaN or 0 by the data
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            logit_losses_sum(student, labels, teacher, temperature)
    for backend in ("torch", "triton"):  # triton padded a row's end with -inf, which uint8 and bool cannot hold
        with pytest.raises(TypeError, match="teacher must be float16, bfloat16, float32 or float64, got torch.uint8"):
            logit_losses_sum(student, labels, teacher.to(torch.uint8), 1.0, backend=backend)
        with pytest.raises(ValueError, match="labels must be"):
            logit_losses_sum(student, labels.tolist(), teacher, 1.0, backend=backend)
    with pytest.raises(ValueError, match="detach them first"):
        logit_losses_sum(student, labels, teacher.clone().requires_grad_(), 1.0)
    with pytest.raises(ValueError, match="V > 0"):
        logit_losses_sum(student[:, :0], labels, teacher[:, :0], 1.0)
    changed = teacher.clone()
    ce_sum, kl_sum = triton(student, labels, changed, 1.0)
    changed.mul_(2.0)  # between the loss and its backward: autograd's guard, for a tensor it does not save
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(ce_sum + kl_sum, student)
    ce_sum, kl_sum = logit_losses_sum_ref(student, labels, teacher, 1.0)
    torch.autograd.grad(ce_sum + kl_sum, student, create_graph=True)  # torch's backend: a second derivative
    ce_sum, kl_sum = triton(student, labels, teacher, 1.0)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(ce_sum + kl_sum, student, create_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gpu_recipe_size(temperature):
    """The GPU distillation benchmark's size: 1624 masked rows of V = 30522, bf16 student logits, fp32 teacher."""
    student, labels, teacher = logits(1624, 30522, torch.bfloat16, torch.float32)
    ce_sum, kl_sum, grad = sums_and_gradient(triton, student, labels, teacher, temperature)
    upcast = student.detach().double().requires_grad_()
    expected = sums_and_gradient(logit_losses_sum_ref, upcast, labels, teacher.double(), temperature)
    torch.testing.assert_close(ce_sum.double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_sum.double(), expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected[2], rtol=2**-8, atol=2**-8 * expected[2].abs().max())
