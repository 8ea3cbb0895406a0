"""The distillation losses against a straightforward reference of SPEC.md's formulas.

The reference is written here the way the original recipe computes it: padded tensors,
``masked_select`` of the rows that count, ``nn.KLDivLoss`` / ``nn.CosineEmbeddingLoss`` /
cross-entropy over full-vocabulary logits. fastmini's versions work on packed rows and
masked rows only, and must give the same values (1e-6) and the same gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmini.distill import losses
from fastmini.distill.distiller import Batch, Distiller, StepCounts, StudentSide
from fastmini.distill.models import Teacher
from fastmini.distill.teacher_attention import matched_maps

pytestmark = pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")

B, A, S, H, V = 3, 4, 9, 12, 50
LENGTHS = (9, 5, 2)  # real tokens per row: one full row, two padded ones


def real_mask() -> torch.Tensor:
    return torch.arange(S)[None, :] < torch.tensor(LENGTHS)[:, None]


def random_probabilities(generator: torch.Generator, sharpness: float = 3.0) -> torch.Tensor:
    """(B, A, S, S) softmax maps with padded keys at exactly zero, as real models produce."""
    scores = torch.randn(B, A, S, S, generator=generator, dtype=torch.float64) * sharpness
    scores = scores.masked_fill(~real_mask()[:, None, None, :], torch.finfo(torch.float64).min)
    return scores.softmax(-1)


# ---- reference: SPEC.md as the original code writes it -------------------------------------------


def reference_attention(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    select = attention_mask.unsqueeze(1).repeat(1, student.shape[1], 1).unsqueeze(-1).expand_as(student).bool()
    s = torch.masked_select(student, select).view(-1, student.shape[-1]) + 1e-12
    t = torch.masked_select(teacher, select).view(-1, student.shape[-1]) + 1e-12
    return nn.KLDivLoss(reduction="mean")(torch.log(s), t)


def reference_hidden(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    select = attention_mask.unsqueeze(-1).expand_as(student).bool()
    s = torch.masked_select(student, select).view(-1, student.shape[-1])
    t = torch.masked_select(teacher, select).view(-1, student.shape[-1])
    return nn.CosineEmbeddingLoss(reduction="mean")(s, t, s.new_ones(s.shape[0]))


def reference_output(student_logits, teacher_logits, labels, temperature):
    select = (labels > -1).unsqueeze(-1).expand_as(student_logits).bool()
    s = torch.masked_select(student_logits, select).view(-1, student_logits.shape[-1])
    t = torch.masked_select(teacher_logits, select).view(-1, student_logits.shape[-1])
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1))
    return kl * temperature**2


def reference_mlm(student_logits, labels):
    return F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ---- the functions --------------------------------------------------------------------------------


def test_attention_kl_matches_reference_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    student = random_probabilities(generator).requires_grad_()
    teacher = random_probabilities(generator)
    mask = real_mask()
    expected = reference_attention(student, teacher, mask.long())
    (expected_grad,) = torch.autograd.grad(expected, student)
    actual = losses.attention_kl(student, teacher, mask)
    (actual_grad,) = torch.autograd.grad(actual, student)
    assert expected.item() > 1e-3  # the maps differ: a real signal, not 0 == 0
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-6, atol=1e-12)


def test_attention_kl_divides_by_padded_length_like_the_mean_reduction():
    """The recipe's "mean" counts every key column, padded ones included: padding the batch
    further (more all-zero key columns) lowers the value in proportion."""
    generator = torch.Generator().manual_seed(1)
    student, teacher, mask = random_probabilities(generator), random_probabilities(generator), real_mask()
    value = losses.attention_kl(student, teacher, mask)
    wider = losses.attention_kl(F.pad(student, (0, 3, 0, 3)), F.pad(teacher, (0, 3, 0, 3)), F.pad(mask, (0, 3)))
    torch.testing.assert_close(wider, value * S / (S + 3), rtol=1e-9, atol=0)


def test_attention_kl_function_passes_gradcheck():
    """Away from zero probabilities (finite differences cannot step around s = 0)."""
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(B, A, S, S, generator=generator, dtype=torch.float64).softmax(-1).requires_grad_()
    teacher = torch.randn(B, A, S, S, generator=generator, dtype=torch.float64).softmax(-1)
    assert torch.autograd.gradcheck(lambda s: losses.attention_kl(s, teacher, real_mask()), (student,))


def test_attention_kl_of_bf16_maps_computes_in_fp32_and_keeps_no_copy():
    """Under bf16 autocast the student's maps are bf16: the loss reads them in fp32 (the value and gradient
    of their fp32 upcast) without keeping an fp32 copy of each map for backward."""
    generator = torch.Generator().manual_seed(4)
    student = random_probabilities(generator).to(torch.bfloat16).requires_grad_()
    teacher = random_probabilities(generator).to(torch.bfloat16)
    expected = losses.attention_kl(student.float(), teacher, real_mask())
    (expected_grad,) = torch.autograd.grad(expected, student)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        actual = losses.attention_kl(student, teacher, real_mask())
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    (actual_grad,) = torch.autograd.grad(actual, student)
    assert actual_grad.dtype == torch.bfloat16
    torch.testing.assert_close(actual_grad, expected_grad)
    big = [t for t in saved if t.numel() == student.numel()]
    assert [t.data_ptr() for t in big] == [student.data_ptr()], [(t.dtype, t.shape) for t in big]


def test_attention_kl_accepts_an_inference_mode_teacher():
    generator = torch.Generator().manual_seed(3)
    student = random_probabilities(generator).float().requires_grad_()
    with torch.inference_mode():
        teacher = random_probabilities(generator).float()
    loss = losses.attention_kl(student, teacher, real_mask())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_hidden_cosine_on_packed_rows_matches_padded_reference():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(B, S, H, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, S, H, generator=generator, dtype=torch.float64)
    mask = real_mask()
    expected = reference_hidden(student, teacher, mask.long())
    actual = losses.hidden_cosine(student[mask], teacher[mask])
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)
    grads = [torch.autograd.grad(v, student)[0] for v in (expected, actual)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-12)


def test_hidden_cosine_is_cosine_similarity_with_its_eps_and_takes_an_inference_teacher():
    """The same value and gradient as F.cosine_similarity, zero rows (whose norm it clamps to eps) included,
    with the teacher's rows made under inference_mode (as the distiller's teacher forward makes them)."""
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(6, H, generator=generator, dtype=torch.float64)
    student[2] = 0.0
    student.requires_grad_()
    with torch.inference_mode():
        teacher = torch.randn(6, H, generator=generator, dtype=torch.float64)
        teacher[4] = 0.0
    expected = (1.0 - F.cosine_similarity(student, teacher.clone(), dim=-1)).sum() / 6
    actual = losses.hidden_cosine(student, teacher)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(value, student)[0] for value in (expected, actual)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_kl_refuses_a_teacher_changed_before_backward(backend):
    """The teacher's maps are read again in backward, outside autograd's saved tensors: changed in place in
    between, they would give another gradient silently; autograd's own guard is kept instead."""
    generator = torch.Generator().manual_seed(3)
    student = random_probabilities(generator).float().requires_grad_()
    teacher = random_probabilities(generator).float()
    loss = losses.attention_kl(student, teacher, real_mask(), None, backend)
    teacher.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_hidden_cosine_keeps_its_precision_under_autocast():
    generator = torch.Generator().manual_seed(10)
    student = torch.randn(16, H, generator=generator, requires_grad=True)
    teacher = torch.randn(16, H, generator=generator)
    expected = losses.hidden_cosine(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = losses.hidden_cosine(student, teacher)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_output_kl_on_masked_rows_matches_full_vocabulary_reference(temperature):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(B, S, V, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, S, V, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(V, (B, S), generator=generator)
    labels[torch.rand(B, S, generator=generator) > 0.3] = -100
    labels[~real_mask()] = -100
    assert (labels != -100).sum() >= 2
    expected = reference_output(student, teacher, labels, temperature)
    selected = labels != -100
    actual = losses.output_kl(student[selected], teacher[selected], temperature)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=1e-9)
    expected_grad = torch.autograd.grad(expected, student)[0]
    actual_grad = torch.autograd.grad(actual, student)[0]
    torch.testing.assert_close(actual_grad.double(), expected_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("rows", [7, 0])
def test_masked_lm_and_output_kl_together_equal_each_alone(temperature, rows, dtype):
    """The distiller's one log-softmax for both terms: the same values as each term computed on its own, also
    without rows and from bf16 logits as under autocast, and the same summed gradient (fp32: alone, the two
    gradients are rounded to bf16 one by one, together once)."""
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(rows, V, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(rows, V, generator=generator) * 2
    labels = torch.randint(V, (rows,), generator=generator)
    together = losses.masked_lm_and_output_kl(student, labels, teacher, temperature, 5.0)
    alone = (
        losses.masked_lm_cross_entropy(student, labels, 5.0),
        losses.output_kl(student, teacher, temperature, 5.0),
    )
    for actual, expected in zip(together, alone, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    if dtype == torch.float32:
        gradients = [torch.autograd.grad(terms[0] + terms[1], student)[0] for terms in (together, alone)]
        torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-6, atol=1e-7)


def test_mlm_cross_entropy_on_masked_rows_matches_reference():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(B, S, V, generator=generator, dtype=torch.float64)
    labels = torch.randint(V, (B, S), generator=generator)
    labels[torch.rand(B, S, generator=generator) > 0.2] = -100
    selected = labels != -100
    actual = losses.masked_lm_cross_entropy(logits[selected], labels[selected])
    torch.testing.assert_close(actual.double(), reference_mlm(logits, labels), rtol=1e-6, atol=1e-9)


def test_terms_without_rows_are_zero_not_nan():
    empty = torch.zeros(0, V, requires_grad=True)
    for value in (
        losses.output_kl(empty, torch.zeros(0, V), 1.0),
        losses.masked_lm_cross_entropy(empty, torch.zeros(0, dtype=torch.long)),
        losses.hidden_cosine(torch.zeros(0, H, requires_grad=True), torch.zeros(0, H)),
    ):
        assert value.item() == 0.0 and value.requires_grad


def test_combine_uses_the_weights_it_is_given():
    one = torch.tensor(1.0)
    terms = losses.combine(losses.LossWeights(), one * 2, one * 3, one * 5, one * 7)
    assert terms.total.item() == 1 * 2 + 3 * (3 + 5) + 5 * 7
    terms = losses.combine(
        losses.LossWeights(mlm=0.5, attention=0, hidden=2, output=1), one * 2, one * 3, one * 5, one * 7
    )
    assert terms.total.item() == 0.5 * 2 + 0 + 2 * 5 + 7


# ---- the whole distillation step against the original-style computation ------------------------


@pytest.fixture
def tiny_pair(tiny_config, randomize):
    """A tiny BertForMaskedLM teacher (4 layers) and a 2-recursion student, both with real signal."""
    from transformers import BertConfig, BertForMaskedLM

    from fastmini import FastMiniForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(
        BertConfig(
            vocab_size=99,
            hidden_size=36,
            num_hidden_layers=4,
            num_attention_heads=6,
            intermediate_size=37,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
    ).eval()
    randomize(teacher, std=0.5, seed=1)
    student = FastMiniForMaskedLM(tiny_config(num_hidden_layers=2)).eval()
    randomize(student, std=0.5, seed=2)
    return teacher, student


def masked_batch(seed: int = 7) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([11, 7, 4, 11])
    mask = (torch.arange(11)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, 99, (4, 11), generator=generator) * mask
    labels = torch.randint(5, 99, (4, 11), generator=generator)
    labels[(torch.rand(4, 11, generator=generator) > 0.3) | (mask == 0)] = -100
    return Batch(input_ids, mask, torch.zeros_like(input_ids), labels)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distiller_equals_the_original_style_step(tiny_pair, temperature):
    """Packed, masked-only, inference-mode teacher == full padded tensors and full-vocabulary logits."""
    teacher_model, student = tiny_pair
    batch = masked_batch()
    layers = (2, 4)
    weights = losses.LossWeights()
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    side = StudentSide(student, projection=None)
    terms = Distiller(side, teacher, layers, weights, temperature)(batch)
    fast_grads = torch.autograd.grad(terms.total, list(student.parameters()))

    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    s_out = student(**inputs, labels=batch.labels, output_hidden_states=True, output_attentions=True)
    # The teacher as the distiller runs it (SDPA in the unmatched layers: tests/test_teacher_attention.py compares
    # that with the all-eager teacher); what is compared here is everything else.
    with torch.no_grad(), matched_maps(teacher_model.bert, layers) as maps:
        t_out = teacher_model(**inputs, output_hidden_states=True)
    attention = sum(
        reference_attention(s_out.attentions[i], maps.collected()[i], batch.attention_mask) for i in range(2)
    )
    hidden = sum(
        reference_hidden(s_out.hidden_states[1:][i], t_out.hidden_states[1:][2 * i + 1], batch.attention_mask)
        for i in range(2)
    )
    output = reference_output(s_out.logits, t_out.logits, batch.labels, temperature)
    total = 1.0 * s_out.loss + 3.0 * (attention + hidden) + 5.0 * output
    reference_grads = torch.autograd.grad(total, list(student.parameters()))

    assert min(attention.item(), hidden.item(), output.item()) > 1e-3
    for name, expected in (
        ("mlm", s_out.loss),
        ("attention", attention),
        ("hidden", hidden),
        ("output", output),
        ("total", total),
    ):
        torch.testing.assert_close(getattr(terms, name), expected, rtol=1e-6, atol=1e-6, msg=name)
    # float32 gradients summed in another order: the absolute error scales with the gradients' size.
    scale = max(float(reference.abs().max()) for reference in reference_grads)
    for fast, reference in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-6 * scale)


def test_a_student_in_the_padded_layout_gives_the_same_terms(tiny_pair):
    """set_unpadding(False) (for torch.compile's one graph or CUDA graphs): the same real tokens count."""
    teacher_model, student = tiny_pair
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    distiller = Distiller(StudentSide(student, None), teacher, (2, 4), losses.LossWeights(), 1.0)
    unpadded = distiller(masked_batch())
    student.set_unpadding(False)
    padded = Distiller(StudentSide(student, None), teacher, (2, 4), losses.LossWeights(), 1.0)(masked_batch())
    for name in ("mlm", "attention", "hidden", "output", "total"):
        torch.testing.assert_close(getattr(padded, name), getattr(unpadded, name), rtol=1e-5, atol=1e-6, msg=name)


def test_distiller_without_teacher_head_has_no_output_term(tiny_pair):
    teacher_model, student = tiny_pair
    teacher = Teacher(encoder=teacher_model.bert, head=None, config=teacher_model.config, source="t")
    distiller = Distiller(StudentSide(student, None), teacher, (2, 4), losses.LossWeights(), 1.0)
    terms = distiller(masked_batch())
    assert not distiller.use_output_kl
    assert terms.output.item() == 0.0
    torch.testing.assert_close(terms.total, terms.mlm + 3 * (terms.attention + terms.hidden))


def test_micro_batches_divided_by_the_global_counts_add_up_to_the_full_batch(tiny_pair):
    """A step split into micro-batches (each padded only to its own longest window) gives, with the
    global batch's StepCounts, terms and gradients that sum to the full batch's: the split is invisible."""
    teacher_model, student = (model.double() for model in tiny_pair)  # the losses compute in float32 still
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    distiller = Distiller(StudentSide(student, None), teacher, (2, 4), losses.LossWeights(), 1.0)
    batch = masked_batch()  # lengths 11, 7, 4, 11

    def rows(selected: list[int], length: int) -> Batch:
        return Batch(*(t[selected, :length] for t in (batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                                      batch.labels)))  # fmt: skip

    parameters = list(student.parameters())
    full = distiller(batch)
    full_grads = torch.autograd.grad(full.total, parameters)
    counts = StepCounts.of(batch)
    parts = [distiller(rows([1, 2], 7), counts), distiller(rows([0, 3], 11), counts)]
    part_grads = [torch.autograd.grad(part.total, parameters) for part in parts]
    for name in ("total", "mlm", "attention", "hidden", "output"):
        torch.testing.assert_close(sum(getattr(p, name) for p in parts), getattr(full, name), rtol=1e-6, atol=1e-6)
    scale = max(float(g.abs().max()) for g in full_grads)
    for index, expected in enumerate(full_grads):
        torch.testing.assert_close(part_grads[0][index] + part_grads[1][index], expected, rtol=1e-5, atol=1e-6 * scale)
    # On its own, a micro-batch is SPEC.md's mean over itself: another (larger) attention value.
    alone = distiller(rows([1, 2], 7))
    assert alone.attention.item() > parts[0].attention.item()


@pytest.mark.parametrize("layout", ["padded batch", "no padding", "padded student"])
def test_a_step_on_a_moved_batch_reads_no_values_on_the_host(tiny_pair, host_reads, layout):
    """Batch.to works out the token positions where the batch is built; the step (teacher, student, losses,
    backward) then only gathers rows at those indices: nothing in it makes a GPU's host wait. (transformers' own
    mask builder would check a padded batch's mask, mask.all(): the teacher gets the additive bias it would build.)"""
    teacher_model, student = tiny_pair
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    student.set_unpadding(layout != "padded student")
    batch = masked_batch()
    if layout == "no padding":
        full_rows = [0, 3]
        batch = Batch(*(t[full_rows] for t in (batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                               batch.labels)))  # fmt: skip
    moved = batch.to(torch.device("cpu"))
    assert batch.positions is not None and (moved.positions.packing is None) == (layout == "no padding")
    distiller = Distiller(StudentSide(student, None), teacher, (2, 4), losses.LossWeights(), 1.0)
    with host_reads() as reads:
        terms = distiller(moved, StepCounts.of(moved))
        terms.total.backward()
    assert reads.ops == []
    for name in ("mlm", "attention", "hidden", "output"):
        assert getattr(terms, name).item() > 0


@pytest.mark.parametrize("unpadding", [True, False], ids=["unpadded-student", "padded-student"])
def test_labels_at_padded_positions_are_neither_counted_nor_trained_on(tiny_pair, unpadding):
    teacher_model, student = tiny_pair
    student.set_unpadding(unpadding)
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    distiller = Distiller(StudentSide(student, None), teacher, (2, 4), losses.LossWeights(), 1.0)
    batch = masked_batch()
    stray = batch.labels.masked_fill(batch.attention_mask == 0, 7)  # labels where there is no token
    with_stray = Batch(batch.input_ids, batch.attention_mask, batch.token_type_ids, stray)
    assert with_stray.num_masked == batch.num_masked < int((stray != -100).sum())
    torch.testing.assert_close(distiller(with_stray).total, distiller(batch).total)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_loss_terms_through_the_triton_kernels_match_torch(tiny_pair, temperature):
    """loss_backend="triton": the attention term (fastmini.kernels.attention_kl) and the MLM and output-KL
    terms (fastmini.kernels.logit_losses), each term's value and its gradient for every student parameter."""
    teacher_model, student = tiny_pair
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    side = StudentSide(student.eval(), None)
    parameters = [p for p in student.parameters() if p.requires_grad]
    results = {}
    for backend in ("torch", "triton"):
        distiller = Distiller(side, teacher, (2, 4), losses.LossWeights(), temperature, loss_backend=backend)
        terms = distiller(masked_batch())
        results[backend] = [
            (term.detach(), torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True))
            for term in (terms.attention, terms.mlm, terms.output)
        ]
    for (value, grads), (expected_value, expected_grads) in zip(results["triton"], results["torch"], strict=True):
        assert expected_value > 0
        torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-7)
        # fp32 sums in other orders: to 1e-5 of the term's largest gradient element (some parameters' are ~0).
        scale = max(float(g.abs().max()) for g in expected_grads if g is not None)
        for got, expected in zip(grads, expected_grads, strict=True):
            if expected is None:
                assert got is None
            else:
                torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale)


def test_attention_kl_checks_shapes_before_counting_rows():
    """A mask that does not fit the maps is refused, even one without real tokens (whose term would be 0)."""
    student = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="one shape"):
        losses.attention_kl(student, torch.rand(2, 3, 4, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows must be"):
        losses.attention_kl(student, student, torch.zeros(2, 5, dtype=torch.bool))


def compile_setup(tiny_pair, tiny_config, randomize, attention_dropout: float):
    """(teacher, eager student side, its compiled twin, the trained parameters): a 2-recursion tiny student with
    no hidden dropout and ``attention_dropout``, for --compile-student against eager."""
    from fastmini import FastMiniForMaskedLM
    from fastmini.distill.distiller import compiled_student_side

    torch._dynamo.reset()
    teacher_model, _ = tiny_pair
    student = FastMiniForMaskedLM(
        tiny_config(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=attention_dropout)
    ).train()
    randomize(student, std=0.5, seed=2)
    teacher = Teacher(encoder=teacher_model.bert, head=teacher_model.cls, config=teacher_model.config, source="t")
    side = StudentSide(student, None)
    return teacher, side, compiled_student_side(side), [p for p in student.parameters() if p.requires_grad]


def assert_compiled_like_eager(teacher, side, compiled, parameters, batch, terms_rtol: float) -> None:
    """The step's terms (to ``terms_rtol``) and gradients through ``compiled`` as through ``side``, each run from
    the same generator state. Inductor's fused reductions add in other orders: gradients to 1e-4 of the largest
    gradient element (one word embedding's was 1.3e-5 of it off; the key bias's gradient is ~0); a wrong
    gradient is off by ~1 of it."""
    results = {}
    for name, module in (("eager", side), ("compiled", compiled)):
        torch.manual_seed(5)
        terms = Distiller(module, teacher, (2, 4), losses.LossWeights(), 1.0)(batch)
        results[name] = (terms, torch.autograd.grad(terms.total, parameters, allow_unused=True))
    (terms, grads), (expected_terms, expected_grads) = results["compiled"], results["eager"]
    for term in ("total", "mlm", "attention", "hidden", "output"):
        torch.testing.assert_close(
            getattr(terms, term), getattr(expected_terms, term), rtol=terms_rtol, atol=terms_rtol / 10
        )
    scale = max(float(g.abs().max()) for g in expected_grads if g is not None)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale)


def test_the_compiled_student_side_matches_eager_on_batches_of_any_token_count(tiny_pair, tiny_config, randomize):
    """--compile-student: torch.compile (inductor, dynamic shapes) of the student side, in training mode, gives
    the eager step's loss terms and gradients, on three batches of different token and masked counts from
    one compile (dropout 0, so both sides compute the same thing)."""
    from torch._dynamo.utils import counters

    teacher, side, compiled, parameters = compile_setup(tiny_pair, tiny_config, randomize, attention_dropout=0.0)
    assert compiled is not side and list(compiled.parameters()) == list(side.parameters())  # shared, not copied
    graphs = []
    for seed in (7, 8, 9):
        batch = masked_batch(seed)
        batch.attention_mask[1, 7 - seed % 3 :] = 0  # 7, 6 or 5 real tokens in the second row
        batch.input_ids.mul_(batch.attention_mask)
        batch.labels.masked_fill_(batch.attention_mask == 0, -100)
        assert_compiled_like_eager(teacher, side, compiled, parameters, batch, terms_rtol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3  # the later batches compiled nothing new


def test_the_compiled_student_side_draws_the_eager_attention_dropout(tiny_pair, tiny_config, randomize):
    """With attention dropout on (and no other dropout), --compile-student runs the maps' softmax and dropout as
    torch's own kernels (fastmini.ops.softmax_dropout, not inductor's fused one), so it draws the eager step's
    masks from the same generator: the same terms, and gradients to inductor's summation order. Through
    inductor's own dropout the total was 1.1% off."""
    setup = compile_setup(tiny_pair, tiny_config, randomize, attention_dropout=0.3)
    assert_compiled_like_eager(*setup, masked_batch(7), terms_rtol=1e-6)
