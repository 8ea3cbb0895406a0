"""UnpaddedGraphedEncoder (fastmini.runtime): token buckets, filler tokens, static packing and reuse on the
CPU through the EagerCapture stand-in; the @pytest.mark.gpu test captures real CUDA graphs of a tiny model."""

from __future__ import annotations

import pytest
import torch

from fastmini import FastMiniModel
from fastmini.runtime import EagerCapture, UnpaddedGraphedEncoder
from fastmini.runtime.buckets import first_token_bucket, token_bucket, token_buckets

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BUCKETS = dict(batch_buckets=(1, 2, 4, 8), sequence_buckets=(8, 16, 32, 64))
# The token buckets whose arithmetic some tests spell out (8, 9, ..., 16, 18, ...: 49 real tokens run as 52): the
# default before session 20; the default's own (16 steps) is test_token_buckets_step_evenly_...'s.
EIGHT_STEPS = dict(token_steps_per_doubling=8)


def tiny_model(tiny_config, randomize, dtype=torch.float32, device="cpu") -> FastMiniModel:
    model = randomize(FastMiniModel(tiny_config(max_position_embeddings=64)))
    return model.eval().to(device=device, dtype=dtype)


def masked_batch(lengths, length, pattern="right", seed=0, vocab=99):
    """Token ids and a mask with ``lengths[i]`` real tokens in row i: at the start ("right" padding), at the end
    ("left") or spread with holes ("holes")."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), length), generator=generator)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, real in enumerate(lengths):
        if pattern == "right":
            mask[row, :real] = 1
        elif pattern == "left":
            mask[row, length - real :] = 1
        else:
            mask[row, torch.randperm(length, generator=generator)[:real]] = 1
    return ids, mask


# ---- token buckets ----------------------------------------------------------------------------


def test_token_buckets_step_evenly_between_powers_of_two_and_end_at_the_limit():
    assert token_buckets(8192, 8)[:20] == (8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 24, 26, 28, 30, 32, 36, 40, 44)
    assert token_buckets(8192) == token_buckets(8192, 16)  # the default (TOKEN_STEPS_PER_DOUBLING)
    assert token_buckets(8192, 4)[:13] == (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    assert token_buckets(8192, 1)[:5] == (8, 16, 32, 64, 128)
    assert token_buckets(8192, 16)[:19] == (16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 34, 36)
    assert token_buckets(8192)[-1] == 8192 and token_buckets(100)[-2:] == (96, 100) and token_buckets(5) == (5,)
    assert token_buckets(100, 8)[-2:] == (96, 100)
    assert [b for b in token_buckets(8192, 8) if b >= 4274][0] == 4608  # the ragged benchmark's batch
    assert [b for b in token_buckets(8192, 16) if b >= 4274][0] == 4352
    for bad in (0, 3, 32, True, 16.0):
        with pytest.raises(ValueError, match=r"token steps per doubling must be one of \[1, 2, 4, 8, 16\], got"):
            token_buckets(64, bad)


@pytest.mark.parametrize("steps", [16, 8, 4, 1])
@pytest.mark.parametrize("limit", [5, 100, 8192])
def test_each_count_gets_the_smallest_bucket_that_holds_it_and_its_filler_bound(limit, steps):
    buckets = token_buckets(limit, steps)
    most_filler_seen: dict[int, int] = {}
    for real in range(1, limit + 1):
        bucket, most_filler = token_bucket(real, limit, steps)
        assert bucket == min(b for b in buckets if b >= real)
        assert bucket - real <= most_filler
        most_filler_seen[bucket] = max(most_filler_seen.get(bucket, 0), bucket - real)
        if real >= first_token_bucket(steps):
            assert bucket <= (1 + 1 / steps) * real  # at most 1/steps of the graph's tokens are filler
    for bucket, seen in most_filler_seen.items():
        assert token_bucket(bucket, limit, steps)[1] == seen  # the bound is reached: no spare filler rows


def test_token_bucket_refuses_counts_outside_the_grid_bucket():
    for bad in (0, 33):
        with pytest.raises(ValueError, match="real_tokens must be in 1..32"):
            token_bucket(bad, 32)


# ---- the model through the stand-in ------------------------------------------------------------------


@pytest.mark.parametrize("steps", [8, 16, 1])
@pytest.mark.parametrize("pattern", ["right", "left", "holes"])
def test_real_tokens_match_the_models_unpadded_forward(tiny_config, randomize, pattern, steps):
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), token_steps_per_doubling=steps, **BUCKETS)
    assert encoder.token_steps_per_doubling == steps
    cases = [([5], 8), ([13, 2, 7], 13), ([32, 1, 17, 9, 32], 32), ([40, 3], 40), ([1, 1, 1, 1, 1, 1, 1, 1], 3)]
    for lengths, length in cases:
        ids, mask = masked_batch(lengths, length, pattern, seed=length)
        with torch.no_grad():
            expected = model(ids, mask).last_hidden_state
        out = encoder(ids, mask)
        real = mask.bool()
        assert out.shape == expected.shape
        torch.testing.assert_close(out[real], expected[real], rtol=1e-4, atol=1e-4)
        assert not out[~real].any()
    assert encoder.stats.eager_fallbacks == 0 and encoder.stats.replays == len(cases)


def test_the_recorded_packing_holds_the_token_bucket_with_filler_in_rows_of_its_own(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    seen = []

    def spy(ids, mask, packing):
        seen.append(packing)
        encoded = model.encode(ids, mask, packing=packing)
        return encoded.repad(encoded.sequence)

    encoder = UnpaddedGraphedEncoder(spy, capture=EagerCapture(), **BUCKETS, **EIGHT_STEPS)
    ids, mask = masked_batch([17, 2, 30], 30, seed=1)  # 49 real tokens: bucket (4, 32) holds them as 52
    encoder(ids, mask)
    assert encoder.captured_buckets == [(4, 32, 52)]
    packing = seen[-1]
    assert packing.indices.shape == (52,)
    rows, sequence = packing.batch_size, packing.seq_len
    assert sequence == 32 and rows == 4 + 1  # 52 - 49 = 3 filler tokens at most 52 - 48 - 1: one extra row
    lengths = packing.cu_seqlens.diff().tolist()
    assert lengths == [17, 2, 30, 0, 3]  # the batch, an empty bucket row, the filler's own sequence
    assert max(lengths) <= sequence


def test_a_bucket_is_reused_with_its_buffers_refilled(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), **BUCKETS, **EIGHT_STEPS)
    first = masked_batch([10, 20, 7], 24, seed=1)  # 37 tokens -> bucket 40
    second = masked_batch([24, 3, 11], 24, seed=2)  # 38 tokens -> bucket 40 again, other filler
    for ids, mask in (first, second, first):
        with torch.no_grad():
            expected = model(ids, mask).last_hidden_state
        out = encoder(ids, mask)
        torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
    assert encoder.captured_buckets == [(4, 32, 40)]
    assert encoder.stats.captures == 1 and encoder.stats.replays == 3


def test_a_mask_refilled_in_place_between_calls_is_read_again(tiny_config, randomize):
    """A serving loop may reuse one mask tensor: the host copy of the mask belongs to one call only."""
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), **BUCKETS)
    ids, mask = masked_batch([10, 20, 7], 24, seed=1)
    encoder(ids, mask)
    _, other = masked_batch([24, 3, 11], 24, seed=2)  # 38 tokens: the same bucket as 37, other indices
    mask.copy_(other)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    out = encoder(ids, mask)
    torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
    assert not out[~mask.bool()].any()
    assert encoder._host_real is None  # nor is the caller's mask kept past its call


def test_every_token_bucket_of_a_batch_bucket_shares_one_static_output_and_input_buffer(tiny_config, randomize):
    """The memory kept stays one padded output and one staged input buffer per (batch, sequence) bucket however
    many token graphs it has (each graph's inputs a prefix of the buffer); calls that alternate between token
    buckets, each refilling the shared buffer in its own layout, still give the model's outputs."""
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), **BUCKETS, **EIGHT_STEPS)
    batches = [masked_batch(lengths, 30, seed=seed) for seed, lengths in enumerate(([1, 1, 0], [5, 9, 2], [30] * 4))]
    for ids, mask in [*batches, batches[0], batches[2], batches[1]]:
        with torch.no_grad():
            expected = model(ids, mask).last_hidden_state
        out = encoder(ids, mask)
        torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
        assert not out[~mask.bool()].any()
    assert [bucket[:2] for bucket in encoder.captured_buckets] == [(4, 32)] * 3
    assert len(encoder._outputs) == 1 and len(encoder._staged) == 1
    (shared,) = encoder._staged.values()
    for entry in encoder._buckets.values():
        assert entry.staged.data_ptr() == shared.data_ptr() and entry.staged.numel() <= shared.numel()


def test_shapes_beyond_the_buckets_and_empty_masks_run_eagerly(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), batch_buckets=(2,), sequence_buckets=(8,))
    ids, mask = masked_batch([3, 9], 9)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    torch.testing.assert_close(encoder(ids, mask), expected)
    no_tokens = torch.zeros(2, 4, dtype=torch.long)
    assert not encoder(no_tokens, no_tokens).any()
    assert encoder.stats.eager_fallbacks == 2 and encoder.stats.captures == 0


def test_prepare_captures_the_buckets_those_shapes_will_use(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), **BUCKETS, **EIGHT_STEPS)
    encoder.prepare([(3, 20, 37), (3, 20)], device="cpu")  # 37 real tokens; every token of a 3 x 20 batch real
    assert encoder.captured_buckets == [(4, 32, 40), (4, 32, 60)]
    encoder.prepare([(3, 20, 38)], device="cpu")  # same bucket: nothing new
    encoder(*masked_batch([20, 20, 20], 20))  # a full 3 x 20 batch: prepared already
    assert encoder.stats.captures == 2
    with pytest.raises(ValueError, match="real tokens of \\(2, 4, 9\\) must be in 1..batch\\*sequence"):
        encoder.prepare([(2, 4, 9)], device="cpu")


def test_encode_refuses_a_packing_of_another_shape(tiny_config, randomize):
    from fastmini.ops import Packing

    model = tiny_model(tiny_config, randomize)
    ids, mask = masked_batch([3, 5], 5)
    packing = Packing.from_attention_mask(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"packing must be a Packing of a \(2, 5\) batch"):
        model.encode(ids, mask, packing=packing)


def test_host_inputs_are_routed_to_the_device_the_encoder_serves(tiny_config, randomize):
    """A tokenizer's CPU tensors go to the encoder's device (no CUDA is touched to decide: the CUDA capture
    strategy only checks the device's type); an encoder that serves the CPU keeps them where they are."""
    from fastmini.runtime import CudaGraphCapture

    def fn(ids, mask, packing):
        raise AssertionError("not called")

    ids, mask = masked_batch([3, 5], 8)
    serving_gpu = UnpaddedGraphedEncoder(fn, capture=CudaGraphCapture(), device="cuda", **BUCKETS)
    assert serving_gpu._device_for(ids) == torch.device("cuda")
    assert serving_gpu._check(ids, mask) is mask  # accepted: its graphs would run on the GPU
    serving_cpu = UnpaddedGraphedEncoder(fn, capture=EagerCapture(), device="cpu", **BUCKETS)
    assert serving_cpu._device_for(ids) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA-graph capture needs CUDA tensors, got input_ids on cpu"):
        UnpaddedGraphedEncoder(fn, capture=CudaGraphCapture(), device="cpu", **BUCKETS)._check(ids, mask)


def test_the_static_inputs_are_views_of_one_buffer_that_one_copy_fills(tiny_config, randomize):
    """What lets host inputs arrive in one transfer: ids, mask and packing indices share one int64 buffer, and
    a refill rewrites all three through it (masks of any integer or bool dtype)."""
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), **BUCKETS)
    ids, mask = masked_batch([3, 8, 1], 8)
    encoder(ids, mask.bool())
    (entry,) = encoder._buckets.values()
    for view in (entry.input_ids, entry.attention_mask, entry.indices):
        assert view.untyped_storage().data_ptr() == entry.staged.untyped_storage().data_ptr()
    assert entry.staged.dtype == torch.long
    assert entry.staged.numel() == 2 * entry.input_ids.numel() + entry.indices.numel()
    other_ids, other_mask = masked_batch([8, 2, 2], 8, seed=1)  # 12 real tokens again: the same bucket
    out = encoder(other_ids, other_mask.int())
    with torch.no_grad():
        expected = model(other_ids, other_mask).last_hidden_state
    real = other_mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
    assert len(encoder._buckets) == 1
    assert torch.equal(entry.input_ids[:3, :8], other_ids) and torch.equal(entry.attention_mask[:3, :8], other_mask)


def test_a_callable_that_returns_something_else_is_named():
    """Not an AttributeError from deep inside: the error names the encoder and how a model is wrapped."""
    encoder = UnpaddedGraphedEncoder(lambda ids, mask, packing: (ids, mask), capture=EagerCapture(), **BUCKETS)
    with pytest.raises(TypeError, match=r"UnpaddedGraphedEncoder: .* got tuple; wrap a model as `model.graphed_enc"):
        encoder(*masked_batch([3, 5], 8))


# ---- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unpadded_graphs_match_the_eager_model_on_gpu(tiny_config, randomize, dtype, monkeypatch, triton_launches):
    """Real CUDA graphs of the unpadded path with CUDA's own choices (no backend named): in bf16 with head size 8,
    varlen attention over the static packing (empty sequences of rows beyond the batch included) and the
    graph-only Triton kernels; in fp32 the padded-layout attention. The packing is built inside the graph from
    static buffers, so nothing may read the mask on the host while recording."""
    from fastmini.ops import attention

    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    varlen_calls = []
    varlen = attention._varlen_attention
    monkeypatch.setattr(attention, "_varlen_attention", lambda *a: varlen_calls.append(1) or varlen(*a))
    model = randomize(FastMiniModel(tiny_config(hidden_size=32, num_attention_heads=4, max_position_embeddings=64)))
    model = model.eval().to(device="cuda", dtype=dtype)
    encoder = model.graphed_encoder(unpadded=True, **BUCKETS)
    tolerance = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-1)
    for lengths, length in [([5], 8), ([13, 2, 7], 13), ([32, 1, 17, 9, 32], 32), ([13, 2, 7], 13)]:
        ids, mask = (t.cuda() for t in masked_batch(lengths, length, seed=length))
        with torch.no_grad():
            expected = model(ids, mask).last_hidden_state
        out = encoder(ids, mask)
        real = mask.bool()
        assert torch.isfinite(out[real]).all()
        torch.testing.assert_close(out[real], expected[real], **tolerance)
        assert not out[~real].any()
    assert encoder.stats.captures == 3 and encoder.stats.replays == 4
    assert (len(varlen_calls) > 0) == (dtype == torch.bfloat16)
    assert triton_launches["add_layer_norm"] > 0  # recorded while capturing: the graph-only kernel


@pytest.mark.gpu
@needs_cuda
def test_host_inputs_replay_without_a_host_sync_and_match_device_inputs(tiny_config, randomize):
    """CPU tensors (what a tokenizer gives) into an encoder on the GPU: the bucket is chosen from the host mask,
    the static inputs arrive in one pinned non-blocking copy, and nothing waits for the GPU (sync debug mode
    "error" raises on any synchronising call); the output is on the GPU and equals that of device inputs."""
    model = randomize(FastMiniModel(tiny_config(hidden_size=32, num_attention_heads=4, max_position_embeddings=64)))
    model = model.eval().to(device="cuda", dtype=torch.bfloat16)
    encoder = model.graphed_encoder(unpadded=True, **BUCKETS)
    batches = [masked_batch(lengths, length, seed=length) for lengths, length in [([13, 2, 7], 13), ([5], 8)]]
    on_device = [encoder(ids.cuda(), mask.cuda()).clone() for ids, mask in batches]  # captures both buckets
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_host = [encoder(ids, mask) for ids, mask in batches + batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(out.is_cuda for out in on_host)
    for out, expected in zip(on_host, on_device + on_device, strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert encoder.stats.captures == 2 and encoder.stats.replays == 6


@pytest.mark.gpu
@needs_cuda
def test_an_encoder_given_a_device_without_an_index_takes_host_then_device_inputs(tiny_config, randomize):
    """device="cuda" names cuda:0 without comparing equal to it: the graphs' device is their buffers' own, so
    device inputs after a capture from host inputs are not refused as coming from another device."""
    model = tiny_model(tiny_config, randomize, dtype=torch.bfloat16, device="cuda")
    encoder = model.graphed_encoder(unpadded=True, device="cuda", **BUCKETS)
    ids, mask = masked_batch([3, 5], 8)
    from_host = encoder(ids, mask)
    from_device = encoder(ids.cuda(), mask.cuda())
    torch.testing.assert_close(from_host, from_device, rtol=0, atol=0)
    assert encoder.stats.captures == 1 and encoder.stats.replays == 2


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_calls_from_several_threads_take_turns(tiny_config, randomize, unpadded):
    """A server's threads sharing one encoder: each call fills a bucket's one set of static buffers (and the
    unpadded encoder keeps its call's mask on the host), so calls must not interleave. Without the lock, 4 threads
    got other calls' outputs (and the unpadded encoder raised) within a few hundred calls."""
    import random
    import sys
    import threading

    model = tiny_model(tiny_config, randomize)
    buckets = dict(batch_buckets=(4,), sequence_buckets=(32,))
    encoder = model.graphed_encoder(unpadded=unpadded, capture=EagerCapture(), **buckets)
    rng = random.Random(0)
    inputs = [
        masked_batch([rng.randint(1, length) for _ in range(rng.randint(1, 4))], length, seed=seed)
        for seed, length in enumerate(rng.randint(4, 30) for _ in range(12))
    ]
    with torch.no_grad():
        expected = [encoder(ids, mask) for ids, mask in inputs]
    failures: list[str] = []

    def serve(seed: int) -> None:
        pick = random.Random(seed)
        for _ in range(60):
            index = pick.randrange(len(inputs))
            try:
                with torch.no_grad():
                    torch.testing.assert_close(encoder(*inputs[index]), expected[index])
            except Exception as error:  # noqa: BLE001  (every way a call can go wrong is a failure here)
                failures.append(repr(error)[:200])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: interleavings show within a few calls
    try:
        threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_an_encoder_copies_with_a_lock_of_its_own(tiny_config, randomize, unpadded):
    import copy

    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=unpadded, capture=EagerCapture(), **BUCKETS)
    ids, mask = masked_batch([3, 5], 8)
    with torch.no_grad():
        expected = encoder(ids, mask)
        clone = copy.deepcopy(encoder)
        assert clone._lock is not encoder._lock
        torch.testing.assert_close(clone(ids, mask), expected)
