"""Unpadded execution: the recursion runs on real tokens only and equals the padded computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmini import FastMiniForMaskedLM, FastMiniForSequenceClassification, FastMiniModel
from fastmini.ops import Packing


def test_pack_unpack_round_trip_for_any_padding_pattern():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    packing = Packing.from_attention_mask(mask)
    assert packing.indices.tolist() == [0, 1, 2, 7, 8, 9, 10, 12, 14]
    x = torch.randn(3, 5, 4)
    packed = packing.pack(x)
    torch.testing.assert_close(packed, x[mask.bool()])
    torch.testing.assert_close(packing.unpack(packed), x * mask[..., None])


def test_heads_unpack_and_pack_in_one_step_like_unpack_and_split():
    """unpack_heads == split_heads(unpack(.)) (contiguous, zeros at padding) and pack_heads == pack(merge_heads(.)),
    values and gradients, for a strided slice such as the fused q/k/v projection's."""
    from fastmini.ops.attention import merge_heads, split_heads

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    packing = Packing.from_attention_mask(mask)
    heads, hidden = 3, 12
    qkv = torch.randn(int(mask.sum()), 3 * hidden, dtype=torch.float64, requires_grad=True)
    key = qkv[:, hidden : 2 * hidden]  # stride 3H: not contiguous
    (unpacked,) = packing.unpack_heads([key], heads)
    expected = split_heads(packing.unpack(key), heads)
    assert unpacked.is_contiguous() and torch.equal(unpacked, expected)
    assert packing.rows is not None  # built on the host: carried, not worked out in every recursion
    # A packing built without the rows and positions (as inside a CUDA graph) works them out itself.
    bare = Packing(packing.indices, packing.key_padding_mask, packing.batch_size, packing.seq_len)
    assert bare.rows is None and torch.equal(bare.unpack_heads([key], heads)[0], expected)
    assert unpacked.transpose(1, 2)[~mask.bool()].abs().sum() == 0
    weights = torch.randn_like(unpacked)
    got, want = (torch.autograd.grad((t * weights).sum(), qkv)[0] for t in (unpacked, expected))
    assert torch.equal(got, want)

    context = torch.randn(4, heads, 5, hidden // heads, dtype=torch.float64, requires_grad=True)
    packed, reference = packing.pack_heads(context), packing.pack(merge_heads(context))
    assert torch.equal(packed, reference)
    weights = torch.randn_like(packed)
    got, want = (torch.autograd.grad((t * weights).sum(), context)[0] for t in (packed, reference))
    assert torch.equal(got, want)


def test_every_gemm_sees_only_real_tokens(tiny_config, batch):
    model = FastMiniModel(tiny_config()).eval()
    seen = []
    model.encoder.shared_layer.query.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    model.encoder.shared_layer.ffn_output.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape)
    )
    model(**batch)
    real = int(batch["attention_mask"].sum())
    assert seen and all(shape == (real, shape[-1]) for shape in seen)


def test_left_padding_and_holes_equal_each_sequence_alone(tiny_config):
    model = FastMiniModel(tiny_config()).eval()
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 99, (3, 6), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    out = model(input_ids, attention_mask=mask, output_hidden_states=True).last_hidden_state
    for row in range(3):
        keep = mask[row].bool()
        # alone: the same tokens at the same positions, nothing else to attend to
        positions = torch.arange(6)[keep][None]
        alone = model(input_ids[row][keep][None], position_ids=positions).last_hidden_state
        torch.testing.assert_close(out[row][keep], alone[0], rtol=1e-5, atol=1e-6)
        assert torch.all(out[row][~keep] == 0)


def test_masked_lm_loss_and_logits_on_real_tokens(tiny_config, batch):
    model = FastMiniForMaskedLM(tiny_config()).eval()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[real], labels[real]))
    assert torch.all(out.logits[~real] == 0)  # no logits are computed for padding


def test_training_through_the_packed_path(tiny_config, batch):
    model = FastMiniForSequenceClassification(tiny_config(num_labels=2)).train()
    loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert model.fastmini.encoder.shared_layer.query.weight.grad.abs().sum() > 0
    assert model.fastmini.encoder.attention_adapters[0].down.weight.grad.abs().sum() > 0


def test_padded_layout_with_masked_keys_equals_unpadding(tiny_config, randomize):
    """encode(unpad=False), the layout CUDA graphs need, computes what unpadding computes."""
    model = randomize(FastMiniModel(tiny_config())).eval()
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(5, 99, (3, 6), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    unpadded = model.encode(input_ids, mask, **kwargs)
    padded = model.encode(input_ids, mask, unpad=False, **kwargs)
    assert padded.packing is None and padded.sequence.shape == (3, 6, 36)
    torch.testing.assert_close(padded.sequence, unpadded.repad(unpadded.sequence), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(padded.sequence[mask == 0]) == 0
    for a, b in zip(padded.hidden_states, unpadded.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    real = mask.bool()[:, None, :, None]  # attention rows of real queries
    for a, b in zip(padded.attentions, unpadded.attentions, strict=True):
        torch.testing.assert_close(a.masked_fill(~real, 0), b.masked_fill(~real, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padded", [True, False], ids=["padding", "no-padding"])
def test_an_unpadded_forward_reads_the_mask_on_the_host_once(tiny_config, batch, host_reads, padded):
    """Packing needs the number of real tokens on the host (on a GPU, a wait): one read, also to find out
    that there is no padding at all."""
    model = FastMiniModel(tiny_config()).eval()
    mask = batch["attention_mask"] if padded else torch.ones_like(batch["attention_mask"])
    with torch.no_grad(), host_reads() as reads:
        model(input_ids=batch["input_ids"], attention_mask=mask)
    assert [op for op, _ in reads.ops] == ["nonzero"]


@pytest.mark.parametrize("per_sequence", [True, False], ids=["cpu-per-sequence", "padded-attention"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_batch_with_no_real_token_runs(tiny_config, randomize, monkeypatch, per_sequence, training):
    """T = 0 packed tokens: outputs are zeros, maps come back, training runs. The padded-attention path (what a GPU
    takes for such a batch, and the CPU's with maps asked for) reshaped (0, H) with an inferred -1 and failed."""
    from fastmini.ops import attention

    monkeypatch.setattr(attention, "_mostly_padding", lambda packing: per_sequence)
    model = randomize(FastMiniModel(tiny_config())).train(training)
    ids, mask = torch.randint(5, 99, (2, 6)), torch.zeros(2, 6, dtype=torch.long)
    out = model(ids, mask, output_attentions=not per_sequence)
    assert out.last_hidden_state.shape == (2, 6, model.config.hidden_size) and not out.last_hidden_state.any()
    if not per_sequence:
        assert len(out.attentions) == model.config.num_hidden_layers
    if training:
        out.last_hidden_state.sum().backward()
