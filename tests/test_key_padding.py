"""The key padding mask's additive form is made once a forward, not once a recursion (ops.key_padding)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmini import FastMiniModel
from fastmini.models.modeling import Encoded
from fastmini.ops import KeyPadding, Packing, packed_self_attention, self_attention
from fastmini.ops import attention as attention_op
from fastmini.ops.key_padding import additive_key_mask

# What torch's SDPA runs to turn a bool mask into an additive one (convert_boolean_attn_mask), and what
# additive_key_mask runs.
SDPA_MASK_CONVERSION = ("where", "scalar_tensor")
BIAS_CONSTRUCTION = ("full", "masked_fill_")


class OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _padded_forward(model, batch, **options) -> tuple[Encoded, collections.Counter]:
    with torch.no_grad(), OpCounts() as ops:
        encoded = model.encode(batch["input_ids"], batch["attention_mask"], unpad=False, **options)
    return encoded, ops.counts


def test_the_additive_mask_has_the_bias_values_of_the_eager_path():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        bias = additive_key_mask(mask, dtype)
        assert bias.shape == (2, 1, 1, 3) and bias.dtype == dtype
        assert torch.equal(bias[0, 0, 0, :2], torch.zeros(2, dtype=dtype))
        assert torch.all(bias[0, 0, 0, 2:] == torch.finfo(dtype).min / 2) and torch.all(bias[1] == bias[0, 0, 0, 2])


def test_a_key_padding_makes_each_dtype_once():
    padding = KeyPadding(torch.tensor([[True, False]]))
    assert padding.bias(torch.float32) is padding.bias(torch.float32)
    assert padding.bias(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("sdpa_mask", attention_op.SDPA_MASKS)
def test_a_packing_used_in_inference_mode_first_then_for_training(tiny_config, batch, monkeypatch, sdpa_mask):
    """A batch's packing serves an inference-mode forward (an evaluation), then one with gradients: the second
    must not get a bias made in the first (an inference tensor, which SDPA's backward would have to save)."""
    monkeypatch.setattr(attention_op, "SDPA_MASK", sdpa_mask)
    model = FastMiniModel(tiny_config(num_hidden_layers=2)).eval()
    packing = Packing.from_attention_mask(batch["attention_mask"])
    for output_attentions in (False, True):
        with torch.inference_mode():
            model.encode(batch["input_ids"], None, packing=packing, output_attentions=output_attentions)
        encoded = model.encode(batch["input_ids"], None, packing=packing, output_attentions=output_attentions)
        encoded.sequence.square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_probabilities_at_every_recursion_build_the_bias_once(tiny_config, batch):
    """output_attentions (the distiller's maps): the eager path adds the bias at each of N recursions."""
    model = FastMiniModel(tiny_config(num_hidden_layers=4)).eval()
    encoded, counts = _padded_forward(model, batch, output_attentions=True)
    assert len(encoded.attentions) == 4
    assert all(counts[op] == 1 for op in BIAS_CONSTRUCTION), counts


def test_packed_attention_through_the_padded_layout_builds_the_bias_once(tiny_config, batch):
    model = FastMiniModel(tiny_config(num_hidden_layers=3)).eval()
    with torch.no_grad(), OpCounts() as ops:
        model(**batch, output_attentions=True)
    assert all(ops.counts[op] == 1 for op in BIAS_CONSTRUCTION), ops.counts


@pytest.mark.parametrize("sdpa_mask", attention_op.SDPA_MASKS)
def test_sdpa_gets_the_mask_each_switch_asks_for(tiny_config, batch, monkeypatch, sdpa_mask):
    """ "additive": SDPA receives the bias made once, and converts nothing; both switches give the same
    hidden states on every real token."""
    model = FastMiniModel(tiny_config(num_hidden_layers=4)).eval()
    reference, _ = _padded_forward(model, batch)
    monkeypatch.setattr(attention_op, "SDPA_MASK", sdpa_mask)
    encoded, counts = _padded_forward(model, batch)
    if sdpa_mask == "additive":
        assert all(counts[op] == 0 for op in SDPA_MASK_CONVERSION), counts
        assert all(counts[op] == 1 for op in BIAS_CONSTRUCTION), counts
    else:
        assert all(counts[op] == 0 for op in BIAS_CONSTRUCTION), counts
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(encoded.sequence[real], reference.sequence[real], rtol=1e-6, atol=1e-6)


def test_a_row_without_real_keys_stays_finite_under_the_additive_mask(monkeypatch):
    monkeypatch.setattr(attention_op, "SDPA_MASK", "additive")
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 5, 8, generator=generator) for _ in range(3))
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    context, _ = self_attention(query, key, value, 2, KeyPadding(mask))
    assert torch.isfinite(context).all()
    alone, _ = self_attention(query[:1, :3], key[:1, :3], value[:1, :3], 2)
    torch.testing.assert_close(context[:1, :3], alone, rtol=1e-5, atol=1e-6)


def test_self_attention_checks_a_key_padding_mask():
    query = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, S\)"):
        self_attention(query, query, query, 2, KeyPadding(torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(TypeError, match="KeyPadding or None"):
        self_attention(query, query, query, 2, [True] * 5)
    packing = Packing.from_attention_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    packed = torch.randn(3, 8)
    context, _ = packed_self_attention(packed, packed, packed, 2, packing)
    assert context.shape == (3, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_additive_mask_matches_the_bool_one_on_gpu(dtype, monkeypatch):
    """SDPA_MASK = "additive" before it can become the default: SDPA picks its kernel for the float mask (maybe
    another than for the bool one); the real rows must agree, a row without real keys must stay finite."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 128, 768, generator=generator).to("cuda", dtype) for _ in range(3))
    lengths = torch.tensor([128, 70, 0])
    mask = (torch.arange(128)[None, :] < lengths[:, None]).cuda()
    with torch.inference_mode():
        expected, _ = self_attention(query, key, value, 12, mask)
        monkeypatch.setattr(attention_op, "SDPA_MASK", "additive")
        got, _ = self_attention(query, key, value, 12, KeyPadding(mask))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:2].float(), expected[:2].float(), rtol=2e-2, atol=2e-2)
