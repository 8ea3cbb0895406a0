"""GraphedTeacher (``--graph-teacher``): one recorded teacher forward per batch shape, replayed on static buffers.

On the CPU through its eager stand-in (capture="eager": the same buffers and static outputs, the forward run
again into them); the CUDA capture itself is tested on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from fastmini import FastMiniConfig, FastMiniForMaskedLM
from fastmini.distill.distiller import Batch, Distiller, StudentSide, teacher_forward
from fastmini.distill.graphed_teacher import GraphedTeacher
from fastmini.distill.losses import LossWeights
from fastmini.distill.models import Teacher
from fastmini.distill.speed_defaults import graph_teacher_by_default

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CAPTURE = "cuda" if DEVICE.type == "cuda" else "eager"
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
LAYERS = (2, 4)


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, attn_implementation="eager")  # fmt: skip
    model = BertForMaskedLM(config).eval().requires_grad_(False).to(DEVICE)
    return Teacher(model.bert, model.cls, model.config, "test")


def batch_of(lengths: list[int], width: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 100, mask.shape, generator=generator) * mask
    labels = ids.masked_fill((torch.rand(mask.shape, generator=generator) > 0.4) | (mask == 0), -100)
    types = (torch.rand(mask.shape, generator=generator) > 0.5).long() * mask
    return Batch(ids, mask, types, labels).to(DEVICE)


def assert_same(got, expected) -> None:
    for a, b in zip(got.hidden + got.attentions, expected.hidden + expected.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.masked_logits, expected.masked_logits, rtol=0, atol=1e-5)


def test_every_call_equals_the_eager_teacher_and_each_shape_is_recorded_once(teacher):
    graphed = GraphedTeacher(teacher, LAYERS, True, True, True, capture=CAPTURE)
    batches = [
        batch_of([9, 5, 2], 9, seed=1),  # padded: recorded
        batch_of([9, 7, 3], 9, seed=2),  # the same shape, other tokens and padding: replayed
        batch_of([9, 9, 9], 9, seed=3),  # the same shape without padding (a zero bias): replayed
        batch_of([6, 4], 6, seed=4),  # another shape
        batch_of([9, 1, 4], 9, seed=5),  # replayed again
    ]
    for batch in batches:
        assert_same(graphed(batch), teacher_forward(teacher, batch, LAYERS, True, True, True))
    assert graphed.captured_shapes == [(2, 6), (3, 9)]


def test_static_bytes_count_what_the_recorded_forwards_keep(teacher):
    """What a benchmark's peak memory must add for a graphed teacher: its static inputs and outputs, per shape."""
    graphed = GraphedTeacher(teacher, LAYERS, True, True, False, capture=CAPTURE)
    assert graphed.static_bytes == 0
    graphed(batch_of([9, 5, 2], 9, seed=1))
    hidden, heads, element = teacher.config.hidden_size, teacher.config.num_attention_heads, 4  # fp32
    inputs = 3 * 3 * 9 * 8  # ids, types and mask, (3, 9) int64
    outputs = (len(LAYERS) * 3 * 9 * hidden + len(LAYERS) * 3 * heads * 9 * 9 + 3 * 9 * hidden) * element
    assert graphed.static_bytes == inputs + outputs
    graphed(batch_of([9, 7, 3], 9, seed=2))  # replayed: nothing more kept
    assert graphed.static_bytes == inputs + outputs


def test_the_recorded_teacher_is_given_its_padding_as_a_bias_even_without_padding(teacher):
    """Given no mask inside a capture, transformers builds one with a host-to-GPU copy, which the capture
    refuses (seen on the H200): the recorded forward always hands the teacher a (B, 1, 1, S) bias."""
    given = []
    hook = teacher.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: given.append(kwargs["attention_mask"]), with_kwargs=True
    )
    try:
        GraphedTeacher(teacher, LAYERS, True, True, True, capture=CAPTURE)(batch_of([9, 9, 9], 9, seed=3))
    finally:
        hook.remove()
    assert given and all(mask is not None and mask.shape == (3, 1, 1, 9) for mask in given)


def test_a_replay_overwrites_the_previous_outputs_of_its_shape(teacher):
    """The documented contract: a shape's maps are static tensors, valid until its next forward."""
    graphed = GraphedTeacher(teacher, LAYERS, True, True, True, capture=CAPTURE)
    first = graphed(batch_of([9, 5, 2], 9, seed=1)).attentions[0]
    kept = first.clone()
    second = graphed(batch_of([9, 7, 3], 9, seed=2)).attentions[0]
    assert second.data_ptr() == first.data_ptr() and not torch.equal(first, kept)


def test_shapes_beyond_the_cap_run_eagerly(teacher):
    graphed = GraphedTeacher(teacher, LAYERS, False, True, False, max_graphs=1, capture=CAPTURE)
    graphed(batch_of([9, 5, 2], 9, seed=1))
    beyond = batch_of([6, 4], 6, seed=4)
    got, expected = graphed(beyond), teacher_forward(teacher, beyond, LAYERS, False, True, False)
    assert got.hidden == [] and got.masked_logits is None
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions, strict=True))
    assert graphed.captured_shapes == [(3, 9)]


def test_a_teacher_outside_the_attention_interface_is_refused(teacher, monkeypatch):
    monkeypatch.setattr(teacher.encoder, "_supports_attention_backend", False, raising=False)
    with pytest.raises(ValueError, match="does not attend through transformers' attention interface"):
        GraphedTeacher(teacher, LAYERS, True, True, True, capture=CAPTURE)


def test_a_distillation_step_through_the_graphed_teacher_gives_the_same_terms(teacher):
    options = dict(num_recursions=2, embedding_size=16, use_adapter=True, reduction_factor=4)
    config = FastMiniConfig.from_teacher(teacher.config, **options, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)  # fmt: skip
    student = FastMiniForMaskedLM(config).train().to(DEVICE)
    side = StudentSide(student, None)
    eager = Distiller(side, teacher, LAYERS, LossWeights(), 2.0)
    graphed = Distiller(side, teacher, LAYERS, LossWeights(), 2.0, graph_teacher=CAPTURE)
    for seed, lengths in enumerate(([9, 5, 2], [9, 8, 1])):
        batch = batch_of(lengths, 9, seed)
        expected, got = eager(batch), graphed(batch)
        for name in ("mlm", "attention", "hidden", "output", "total"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
        got.total.backward()  # the maps the attention loss keeps for backward are this batch's


def test_the_trainer_graphs_the_teacher_by_default_on_a_gpu_where_it_can(teacher, monkeypatch):
    assert graph_teacher_by_default(torch.device("cuda"), teacher)
    assert not graph_teacher_by_default(torch.device("cpu"), teacher)
    monkeypatch.setattr(teacher.encoder, "_supports_attention_backend", False, raising=False)
    assert not graph_teacher_by_default(torch.device("cuda"), teacher)  # a teacher it cannot record


def test_a_cpu_run_does_not_graph_its_teacher_unless_told(tmp_path):
    from fastmini.distill.config import resolve
    from fastmini.distill.testing import make_tiny_teacher, tiny_args
    from fastmini.distill.trainer import DistillationRun
    from fastmini.training import distributed
    from fastmini.training.output_dirs import releasing_output_dirs_taken

    config, _ = resolve(tiny_args(make_tiny_teacher(tmp_path / "teacher"), tmp_path / "out"))
    assert config.graph_teacher is None
    with releasing_output_dirs_taken():  # the run locks its output directory: give it back, as a job does
        assert DistillationRun(config, distributed.setup("cpu")).distiller.graphed_teacher is None
