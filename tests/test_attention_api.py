"""ops.attention and ops.packing as an API: every legal input against a float64 reference, every misuse one error."""

from __future__ import annotations

import pytest
import torch

from fastmini.ops import Packing, packed_self_attention, self_attention
from fastmini.ops.key_padding import KeyPadding

HEADS, HEAD_DIM = 2, 4
HIDDEN = HEADS * HEAD_DIM
MASKS = {
    "right": [[1, 1, 1, 0], [1, 0, 0, 0]],
    "left": [[0, 0, 1, 1], [0, 1, 1, 1]],
    "holes": [[1, 0, 1, 0], [0, 1, 0, 1]],
    "single_token_row": [[0, 0, 1, 0], [1, 1, 1, 1]],
    "empty_row": [[0, 0, 0, 0], [1, 1, 0, 1]],
    "all_full": [[1, 1, 1, 1], [1, 1, 1, 1]],
    "batch_of_one": [[1, 1, 0, 1]],
    "length_one": [[1], [0]],
}
TOLERANCES = {  # against the float64 reference, on real tokens
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def reference(query, key, value, mask):
    """softmax(q k^T / sqrt(d) + mask) v per head in float64: ((B, S, H) context, (B, A, S, S) probabilities)."""
    batch, seq, _ = query.shape
    q, k, v = (t.double().view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2) for t in (query, key, value))
    scores = (q @ k.transpose(-1, -2) / HEAD_DIM**0.5).masked_fill(~mask[:, None, None, :], float("-inf"))
    probabilities = scores.softmax(-1)
    return (probabilities @ v).transpose(1, 2).reshape(batch, seq, HIDDEN), probabilities


def _qkv(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, HIDDEN, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("pattern", MASKS)
def test_padded_and_packed_attention_match_the_reference_on_real_tokens(pattern, need_weights, dtype):
    mask = torch.tensor(MASKS[pattern]).bool()
    query, key, value = _qkv(mask.shape, dtype)
    expected, expected_probabilities = reference(query, key, value, mask)
    packing = Packing.from_attention_mask(mask)
    padded, padded_probabilities = self_attention(query, key, value, HEADS, mask, need_weights=need_weights)
    packed, packed_probabilities = packed_self_attention(
        *(packing.pack(t) for t in (query, key, value)), HEADS, packing, need_weights=need_weights
    )
    assert padded.dtype == packed.dtype == dtype and packed.shape == (int(mask.sum()), HIDDEN)
    torch.testing.assert_close(padded[mask].double(), expected[mask], **TOLERANCES[dtype])
    torch.testing.assert_close(packed.double(), expected[mask], **TOLERANCES[dtype])
    if not need_weights:
        assert padded_probabilities is None and packed_probabilities is None
        return
    real_queries = mask[:, None, :, None].expand_as(expected_probabilities)
    for probabilities in (padded_probabilities, packed_probabilities):
        assert probabilities.shape == (*mask.shape[:1], HEADS, *mask.shape[1:], mask.shape[1])
        torch.testing.assert_close(
            probabilities[real_queries].double(), expected_probabilities[real_queries], **TOLERANCES[dtype]
        )
        keys_of_nonempty_rows = (~mask & mask.any(1, keepdim=True))[:, None, None, :].expand_as(probabilities)
        assert torch.all(probabilities[keys_of_nonempty_rows] == 0)  # padded keys get no weight


@pytest.mark.parametrize(
    "dtype, autocast",
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float64, False),
     (torch.float64, True), (torch.float16, False)],
    ids=["fp32", "fp32-bf16-autocast", "bf16", "fp64", "fp64-autocast", "fp16"],
)  # fmt: skip
def test_masked_keys_and_empty_rows_in_the_scores_dtype(dtype, autocast):
    """The mask is an additive bias of the scores' lowest value, in the dtype the scores come out in: under
    autocast that is autocast's (fp32's lowest value cast to bf16 is -inf, and an empty row would be NaN)."""
    mask = torch.tensor(MASKS["empty_row"]).bool()
    query, key, value = _qkv(mask.shape, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _context, probabilities = self_attention(query, key, value, HEADS, mask, need_weights=True)
    assert torch.isfinite(probabilities).all()
    assert torch.all(probabilities[1][:, :, ~mask[1]] == 0)  # the padded key of the non-empty row
    if dtype != torch.float16:  # fp16's lowest value does not absorb every score (see self_attention_ref)
        assert torch.all(probabilities[0] == 1 / mask.shape[1])  # no real key: uniform over the padded ones
    # Scores far below zero in the row with no real key: a bias of fp16's whole lowest value made them -inf
    # there, and the row NaN.
    _context, probabilities = self_attention(query * 40, -key * 40, value, HEADS, mask, need_weights=True)
    assert torch.isfinite(probabilities).all()


def test_non_contiguous_inputs_give_the_contiguous_result():
    mask = torch.tensor(MASKS["holes"]).bool()
    wide = _qkv((*mask.shape, 2))  # (B, S, 2, H): [..., 0, :] is a strided (B, S, H) view
    strided = [t[..., 0, :] for t in wide]
    assert not strided[0].is_contiguous()
    for need_weights in (False, True):
        got = self_attention(*strided, HEADS, mask, need_weights=need_weights)[0]
        expected = self_attention(*(t.contiguous() for t in strided), HEADS, mask, need_weights=need_weights)[0]
        torch.testing.assert_close(got[mask], expected[mask])


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("lengths", [[3, 8], [2, 1]], ids=["padded_layout", "per_sequence"])
def test_dropout_is_reproducible_and_keeps_the_expectation(lengths, need_weights):
    mask = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).repeat(100, 1)
    packing = Packing.from_attention_mask(mask)
    query, key = _qkv((packing.indices.numel(),))[:2]
    value = torch.ones_like(query)  # the context is the sum of each row's (dropped, rescaled) probabilities
    torch.manual_seed(5)
    first = packed_self_attention(query, key, value, HEADS, packing, dropout_p=0.3, need_weights=need_weights)[0]
    torch.manual_seed(5)
    again = packed_self_attention(query, key, value, HEADS, packing, dropout_p=0.3, need_weights=need_weights)[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, value)
    assert abs(first.mean().item() - 1.0) < 0.03  # dropout rescales by 1 / (1 - p)


def _misuse_cases():
    mask = torch.tensor(MASKS["right"]).bool()
    query, key, value = _qkv(mask.shape)
    packing = Packing.from_attention_mask(mask)
    pq, pk, pv = (packing.pack(t) for t in (query, key, value))
    return {
        "heads_not_dividing": (lambda: self_attention(query, key, value, 3, mask), ValueError, "num_heads"),
        "heads_zero": (lambda: self_attention(query, key, value, 0, mask), ValueError, "num_heads"),
        "heads_not_int": (lambda: self_attention(query, key, value, 2.0, mask), TypeError, "num_heads"),
        "packed_heads_not_dividing": (lambda: packed_self_attention(pq, pk, pv, 3, packing), ValueError, "num_heads"),
        # a float mask would be an additive bias to SDPA (no masking at all) and a TypeError to the eager path
        "float_mask": (lambda: self_attention(query, key, value, HEADS, mask.float()), TypeError, "key_padding_mask"),
        "long_mask": (lambda: self_attention(query, key, value, HEADS, mask.long()), TypeError, "key_padding_mask"),
        "mask_shape": (lambda: self_attention(query, key, value, HEADS, mask[:, :3]), ValueError, "key_padding_mask"),
        "key_shape": (lambda: self_attention(query, key[:, :3], value, HEADS, mask), ValueError, "key"),
        "value_dtype": (lambda: self_attention(query, key, value.double(), HEADS, mask), TypeError, "value"),
        "integer_query": (lambda: self_attention(*(t.long() for t in (query, key, value)), HEADS), TypeError, "query"),
        "unbatched_query": (lambda: self_attention(query[0], key[0], value[0], HEADS), ValueError, "query"),
        "dropout_one": (lambda: self_attention(query, key, value, HEADS, dropout_p=1.0), ValueError, "dropout_p"),
        "dropout_negative": (
            lambda: self_attention(query, key, value, HEADS, need_weights=True, dropout_p=-0.1),
            ValueError,
            "dropout_p",
        ),
        "packed_token_count": (
            lambda: packed_self_attention(pq[:3], pk[:3], pv[:3], HEADS, packing),
            ValueError,
            "query",
        ),
        "packed_padded_input": (lambda: packed_self_attention(query, key, value, HEADS, packing), ValueError, "query"),
        "packing_not_a_packing": (lambda: packed_self_attention(pq, pk, pv, HEADS, mask), TypeError, "packing"),
        "pack_shape": (lambda: packing.pack(torch.randn(3, 4, 5)), ValueError, "padded"),
        "unpack_token_count": (lambda: packing.unpack(torch.randn(7, 5)), ValueError, "packed"),
        "packing_from_1d_mask": (lambda: Packing.from_attention_mask(torch.ones(4)), ValueError, "attention_mask"),
        "zero_width": (lambda: self_attention(*(t[..., :0] for t in (query, key, value)), HEADS), ValueError, "query"),
        # another mask of the right shape was read as given: padded keys attended to
        "key_padding_of_another_mask": (
            lambda: packed_self_attention(pq, pk, pv, HEADS, packing, key_padding=KeyPadding(torch.ones_like(mask))),
            ValueError,
            "key_padding",
        ),
    }


@pytest.mark.parametrize("case", list(_misuse_cases()))
def test_each_misuse_is_one_clear_error_naming_the_argument(case):
    call, error, argument = _misuse_cases()[case]
    with pytest.raises(error, match=rf"\b{argument}\b"):
        call()


def test_packed_attention_runs_on_the_meta_device():
    """Shape propagation (meta tensors) takes the padded layout: the per-sequence loop reads lengths on the CPU only."""
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]).bool()  # would attend per sequence
    cpu = Packing.from_attention_mask(mask)
    packing = Packing(cpu.indices.to("meta"), cpu.key_padding_mask.to("meta"), cpu.batch_size, cpu.seq_len)
    query, key, value = (torch.empty(3, HIDDEN, device="meta") for _ in range(3))
    context, _ = packed_self_attention(query, key, value, HEADS, packing)
    assert context.shape == (3, HIDDEN) and context.device.type == "meta"
