"""``set_low_precision_maps`` / ``set_low_precision_norms``: under autocast the attention probabilities, and the
residual LayerNorms' outputs, stay in autocast's dtype.

CUDA's autocast computes a softmax given no dtype, and every LayerNorm, in fp32 and returns fp32; the maps
switch names the scores' dtype to softmax, the norms switch runs the residual add and LayerNorm outside
autocast. The CPU's autocast leaves softmax and LayerNorm alone, so here the CPU tests check the calls the
model makes (and that nothing else changes), the GPU tests the dtypes and values themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastmini import FastMiniConfig, FastMiniForMaskedLM
from fastmini.ops.checks import layer_norm_parameters

LENGTHS = (9, 5, 2)
SOFTMAXES = (torch.Tensor.softmax, torch.softmax, F.softmax)


class LayerNormAutocast(TorchFunctionMode):
    """Whether autocast was on at every F.layer_norm called inside."""

    def __init__(self):
        super().__init__()
        self.autocast: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.layer_norm:
            self.autocast.append(torch.is_autocast_enabled("cpu"))
        return func(*args, **(kwargs or {}))


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


@pytest.mark.parametrize("unpadding", [True, False])
def test_the_norms_switch_takes_the_residual_layer_norms_out_of_autocast(unpadding):
    model = tiny_student().set_unpadding(unpadding)
    # Per recursion: the two adapters' and the shared layer's two; then the embeddings' and the MLM head's.
    recursion_norms = 4 * model.config.num_hidden_layers

    def autocast_at_each_layer_norm() -> list[bool]:
        with LayerNormAutocast() as recorded, torch.autocast("cpu", torch.bfloat16):
            model(**inputs())
        return recorded.autocast

    assert autocast_at_each_layer_norm() == [True] * (recursion_norms + 2)
    model.set_low_precision_norms()
    assert autocast_at_each_layer_norm() == [True] + [False] * recursion_norms + [True]
    assert model.set_low_precision_norms(False) is model
    assert autocast_at_each_layer_norm() == [True] * (recursion_norms + 2)


@pytest.mark.parametrize("switch", ["set_low_precision_maps", "set_low_precision_norms"])
def test_without_autocast_the_switches_change_nothing(switch):
    model = tiny_student()
    reference = model(**inputs(), output_attentions=True, output_hidden_states=True)
    switched = getattr(model, switch)()(**inputs(), output_attentions=True, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(reference.attentions, switched.attentions, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reference.hidden_states, switched.hidden_states, strict=True))
    assert torch.equal(reference.logits, switched.logits)


def test_the_distill_option_reaches_the_student(tmp_path, caplog):
    from fastmini.distill.config import resolve
    from fastmini.distill.testing import make_tiny_teacher, tiny_args
    from fastmini.distill.trainer import DistillationRun
    from fastmini.training import distributed
    from fastmini.training.output_dirs import releasing_output_dirs_taken

    teacher = make_tiny_teacher(tmp_path / "teacher")
    argv = tiny_args(teacher, tmp_path / "out")

    def encoder_of(*extra: str):
        config, _ = resolve([*argv, *extra])
        with releasing_output_dirs_taken():  # the run locks its output directory: give it back, as a job does
            return DistillationRun(config, distributed.setup("cpu")).student_side.student.fastmini.encoder

    default, _ = resolve(argv)
    assert (default.low_precision_maps, default.low_precision_norms) == (None, False)  # maps: by precision
    encoder = encoder_of("--precision", "fp32")
    assert not encoder.shared_layer.low_precision_maps and not caplog.text  # fp32: off, and no warning
    encoder = encoder_of("--precision", "bf16")
    assert encoder.shared_layer.low_precision_maps and not encoder.shared_layer.low_precision_norms
    assert not encoder_of("--precision", "bf16", "--no-low-precision-maps").shared_layer.low_precision_maps
    encoder = encoder_of("--low-precision-maps", "--low-precision-norms", "--precision", "fp32")
    assert encoder.shared_layer.low_precision_maps and encoder.shared_layer.low_precision_norms
    assert all(adapter.low_precision_norms for adapter in (*encoder.attention_adapters, *encoder.ffn_adapters))
    for flag in ("--low-precision-maps", "--low-precision-norms"):
        assert f"{flag} changes nothing without bf16 autocast" in caplog.text


# switch, output field, which of its tensors, rtol, atol: the maps differ by one bf16 rounding (and its echo),
# the hidden states by the bf16 rounding of each recursion's residual stream.
GPU_CASES = {
    "maps": ("set_low_precision_maps", "attentions", slice(None), 2**-7, 1e-6),
    "norms": ("set_low_precision_norms", "hidden_states", slice(1, None), 0.05, 0.05),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's autocast is what computes these in fp32")
@pytest.mark.parametrize("case", GPU_CASES)
def test_under_cuda_autocast_the_switched_tensors_stay_bf16(case):
    switch, field, which, rtol, atol = GPU_CASES[case]
    model = tiny_student("cuda")
    outputs = dict(output_attentions=True, output_hidden_states=True)
    with torch.autocast("cuda", torch.bfloat16):
        reference = getattr(model(**inputs("cuda"), **outputs), field)[which]
        switched = getattr(getattr(model, switch)()(**inputs("cuda"), **outputs), field)[which]
    assert {t.dtype for t in reference} == {torch.float32}
    assert {t.dtype for t in switched} == {torch.bfloat16}
    for low, full in zip(switched, reference, strict=True):
        torch.testing.assert_close(low.float(), full.float(), rtol=rtol, atol=atol)
    loss = sum(t.float().square().mean() for t in switched)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_layer_norm_parameters_stay_fp32_beside_16_bit_input_only_on_the_cpu():
    """The norms switch hands F.layer_norm bf16 sums and the fp32 LayerNorm parameters: the CPU kernel takes
    them mixed, the CUDA kernel refuses them (seen on the H200), so elsewhere they follow the input's dtype."""
    weight, bias = torch.ones(8), torch.zeros(8)
    kept = layer_norm_parameters(weight, bias, torch.bfloat16)
    assert kept[0] is weight and kept[1] is bias
    meta = layer_norm_parameters(weight.to("meta"), bias.to("meta"), torch.bfloat16)
    assert [t.dtype for t in meta] == [torch.bfloat16] * 2
    assert [t.dtype for t in layer_norm_parameters(weight, bias.bfloat16(), torch.bfloat16)] == [torch.bfloat16] * 2
    assert layer_norm_parameters(weight.to("meta"), bias.to("meta"), torch.float32)[0].dtype == torch.float32
