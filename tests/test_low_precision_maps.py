"""``set_low_precision_maps``: under autocast the attention probabilities stay in autocast's dtype.

CUDA's autocast computes a softmax given no dtype in fp32 and returns it so; the switch names the scores'
dtype instead. The CPU's autocast leaves softmax alone, so here the CPU tests check the call the model
makes (and that nothing else changes), the GPU test the maps themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastmini import FastMiniConfig, FastMiniForMaskedLM

LENGTHS = (9, 5, 2)
SOFTMAXES = (torch.Tensor.softmax, torch.softmax, F.softmax)


class SoftmaxDtypes(TorchFunctionMode):
    """The ``dtype`` argument of every softmax called inside (None where none is given)."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SOFTMAXES:
            self.dtypes.append(kwargs.get("dtype", args[2] if len(args) > 2 else None))
        return func(*args, **kwargs)


def tiny_student(device="cpu") -> FastMiniForMaskedLM:
    torch.manual_seed(0)
    config = FastMiniConfig(
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, use_adapter=True, reduction_factor=4, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return FastMiniForMaskedLM(config).train().to(device)


def inputs(device="cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, 100, mask.shape, generator=generator) * mask
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def softmax_dtypes(model, autocast_dtype: torch.dtype | None) -> list[torch.dtype | None]:
    with SoftmaxDtypes() as recorded, torch.autocast("cpu", autocast_dtype or torch.bfloat16,
                                                     enabled=autocast_dtype is not None):  # fmt: skip
        model(**inputs(), output_attentions=True)
    return recorded.dtypes


@pytest.mark.parametrize("unpadding", [True, False])
def test_the_switch_asks_softmax_for_the_scores_dtype(unpadding):
    model = tiny_student().set_unpadding(unpadding)
    recursions = model.config.num_hidden_layers
    assert softmax_dtypes(model, torch.bfloat16) == [None] * recursions  # autocast's choice: fp32 on CUDA
    model.set_low_precision_maps()
    assert softmax_dtypes(model, torch.bfloat16) == [torch.bfloat16] * recursions
    assert softmax_dtypes(model, None) == [torch.float32] * recursions  # no autocast: the dtype it had anyway
    assert softmax_dtypes(model.set_low_precision_maps(False), torch.bfloat16) == [None] * recursions


def test_without_autocast_the_switch_changes_nothing():
    model = tiny_student()
    reference = model(**inputs(), output_attentions=True)
    switched = model.set_low_precision_maps()(**inputs(), output_attentions=True)
    assert all(torch.equal(a, b) for a, b in zip(reference.attentions, switched.attentions, strict=True))
    assert torch.equal(reference.logits, switched.logits)


def test_the_distill_option_reaches_the_student(tmp_path, caplog):
    from fastmini.distill.config import resolve
    from fastmini.distill.testing import make_tiny_teacher, tiny_args
    from fastmini.distill.trainer import DistillationRun
    from fastmini.training import distributed

    teacher = make_tiny_teacher(tmp_path / "teacher")
    argv = tiny_args(teacher, tmp_path / "out")
    assert resolve(argv)[0].low_precision_maps is False
    config, _ = resolve([*argv, "--low-precision-maps", "--precision", "fp32"])
    run = DistillationRun(config, distributed.setup("cpu"))
    assert run.student_side.student.fastmini.encoder.shared_layer.low_precision_maps is True
    assert "--low-precision-maps changes nothing without bf16 autocast" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's autocast is what upcasts softmax")
def test_under_cuda_autocast_the_maps_stay_bf16():
    model = tiny_student("cuda")
    with torch.autocast("cuda", torch.bfloat16):
        reference = model(**inputs("cuda"), output_attentions=True)
        switched = model.set_low_precision_maps()(**inputs("cuda"), output_attentions=True)
    assert {m.dtype for m in reference.attentions} == {torch.float32}
    assert {m.dtype for m in switched.attentions} == {torch.bfloat16}
    for low, full in zip(switched.attentions, reference.attentions, strict=True):
        torch.testing.assert_close(low.float(), full, rtol=2**-7, atol=1e-6)  # one bf16 rounding (and its echo)
    grads = torch.autograd.grad(sum(m.float().square().sum() for m in switched.attentions), model.parameters(),
                                allow_unused=True)  # fmt: skip
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
