"""GraphedEncoder (fastmini.runtime): bucketing, padding, slicing, reuse and errors on the CPU through
the EagerCapture stand-in; the @pytest.mark.gpu tests capture real CUDA graphs of a tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastmini import FastMiniModel
from fastmini.ops.adapter_bottleneck import TRITON_MAX_FEW_ROWS_ON_GPU
from fastmini.runtime import BucketGrid, CudaGraphCapture, EagerCapture, GraphedEncoder
from fastmini.runtime.buckets import bucket_for, clip_buckets, normalize_buckets

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def masked_mixer(
    vocab: int = 50, hidden: int = 8, positions: int = 600, seed: int = 0, device: str = "cpu", dtype=torch.float32
):
    """A stand-in encoder with the properties graphs rely on: rows never mix, masked keys never
    contribute, padded positions are zeros. Its weights live on ``device`` (no copies inside a capture)."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, hidden, generator=generator, dtype=dtype).to(device)
    position = torch.randn(positions, hidden, generator=generator, dtype=dtype).to(device)
    weight = torch.randn(hidden, hidden, generator=generator, dtype=dtype).to(device)

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = embedding[input_ids] + position[: input_ids.shape[1]]
        scores = (x @ weight) @ x.transpose(1, 2) / hidden**0.5
        keys = attention_mask.bool()[:, None, :]
        scores = scores.masked_fill(~keys, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ x) * attention_mask[..., None].to(x.dtype)

    return fn


class Recorder:
    """Wraps fn and keeps copies of what it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, input_ids, attention_mask):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return self.fn(input_ids, attention_mask)


def ragged_batch(batch: int, length: int, seed: int = 0, vocab: int = 50):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length  # at least one full row
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def eager_encoder(fn, **kwargs) -> GraphedEncoder:
    return GraphedEncoder(fn, capture=EagerCapture(), **kwargs)


# ---- buckets -----------------------------------------------------------------------------------


def test_bucket_choice_rounds_up_and_gives_up_beyond_the_largest():
    grid = BucketGrid.make()
    assert grid.choose(1, 1) == (1, 32)
    assert grid.choose(3, 33) == (4, 64)
    assert grid.choose(8, 128) == (8, 128)
    assert grid.choose(128, 512) == (128, 512)
    assert grid.choose(129, 10) is None
    assert grid.choose(2, 513) is None
    assert bucket_for(5, (2, 4, 8)) == 8 and bucket_for(9, (2, 4, 8)) is None
    assert normalize_buckets([8, 2, 4, 4], "b") == (2, 4, 8)


def test_sequence_buckets_are_capped_at_the_models_positions():
    assert clip_buckets((32, 64, 128, 256), 100) == (32, 64, 100)
    assert clip_buckets((32, 64, 128), 64) == (32, 64)
    assert clip_buckets((32, 64), 512) == (32, 64)
    assert BucketGrid.make(sequence=(32, 64, 128), max_sequence_length=64).choose(1, 50) == (1, 64)


@pytest.mark.parametrize("buckets", [[], [0, 4], [2, -1], [2.0], [True]])
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(ValueError, match="batch_buckets"):
        BucketGrid.make(batch=buckets)


# ---- padding, slicing, reuse (eager stand-in) ----------------------------------------------------


def test_inputs_are_zero_padded_into_the_bucket():
    recorder = Recorder(masked_mixer())
    encoder = eager_encoder(recorder, batch_buckets=(4,), sequence_buckets=(8,))
    ids, mask = ragged_batch(3, 5)
    out = encoder(ids, mask)
    assert out.shape == (3, 5, 8) and out.is_contiguous()
    static_ids, static_mask = recorder.calls[-1]
    assert static_ids.shape == static_mask.shape == (4, 8)
    assert torch.equal(static_ids[:3, :5], ids) and torch.equal(static_mask[:3, :5], mask)
    assert not static_ids[:, 5:].any() and not static_mask[:3, 5:].any() and not static_ids[3:].any()
    # a row that only pads the batch gets one unmasked position, so no row is fully masked (NaN)
    assert static_mask[3].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (4, 8), (5, 9), (2, 16)])
def test_outputs_equal_the_callable_on_the_unpadded_input(shape):
    # float64: padding to the bucket changes the matmuls' shapes and so their fp32 rounding (2e-6 off on some CPUs);
    # float64's rounding leaves any error of the padding itself in plain sight
    fn = masked_mixer(dtype=torch.float64)
    encoder = eager_encoder(fn, batch_buckets=(1, 2, 4, 8), sequence_buckets=(8, 16))
    ids, mask = ragged_batch(*shape, seed=sum(shape))
    torch.testing.assert_close(encoder(ids, mask), fn(ids, mask), rtol=1e-12, atol=1e-12)


def test_no_mask_means_every_token_is_real():
    fn = masked_mixer()
    ids, _ = ragged_batch(2, 6)
    out = eager_encoder(fn, sequence_buckets=(8,))(ids)
    torch.testing.assert_close(out, fn(ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-6)


def test_one_capture_per_bucket_reused_across_calls():
    recorder = Recorder(masked_mixer())
    encoder = eager_encoder(recorder, batch_buckets=(2, 4), sequence_buckets=(8, 16))
    for shape in [(3, 5), (4, 8), (3, 7), (1, 12), (2, 16), (4, 3)]:
        encoder(*ragged_batch(*shape))
    assert encoder.captured_buckets == [(2, 16), (4, 8)]
    assert encoder.stats.as_dict() == {"captures": 2, "replays": 6, "eager_fallbacks": 0}


def test_returned_outputs_survive_later_replays():
    encoder = eager_encoder(masked_mixer(), batch_buckets=(4,), sequence_buckets=(8,))
    first_ids, first_mask = ragged_batch(3, 6, seed=1)
    first = encoder(first_ids, first_mask)
    kept = first.clone()
    encoder(*ragged_batch(4, 8, seed=2))  # same bucket, overwrites the static output
    assert torch.equal(first, kept)


def test_inputs_beyond_the_largest_bucket_run_eagerly():
    fn = masked_mixer()
    encoder = eager_encoder(fn, batch_buckets=(1, 2), sequence_buckets=(8,))
    for shape in [(3, 4), (2, 9)]:
        ids, mask = ragged_batch(*shape)
        torch.testing.assert_close(encoder(ids, mask), fn(ids, mask))
    assert encoder.stats.as_dict() == {"captures": 0, "replays": 0, "eager_fallbacks": 2}


def test_reset_and_prepare():
    encoder = eager_encoder(masked_mixer(), batch_buckets=(1, 4), sequence_buckets=(8, 16))
    encoder.prepare([(1, 5), (3, 12), (9, 9)], device="cpu")  # the last is beyond the buckets
    assert encoder.captured_buckets == [(1, 8), (4, 16)]
    encoder(*ragged_batch(1, 8))
    assert encoder.stats.captures == 2
    encoder.reset()
    assert encoder.captured_buckets == []


@pytest.mark.parametrize(
    "first, later",
    [
        (torch.inference_mode, torch.no_grad),
        (torch.no_grad, torch.inference_mode),
        (torch.inference_mode, torch.enable_grad),
    ],
    ids=["inference-then-no-grad", "no-grad-then-inference", "inference-then-grad"],
)
def test_captures_under_inference_mode_serve_calls_outside_it(first, later):
    """Static buffers made during a call under inference_mode must not be inference tensors: the next
    call outside it writes them in place (torch refuses that for inference tensors)."""
    fn = masked_mixer()
    encoder = eager_encoder(fn, batch_buckets=(4,), sequence_buckets=(8,))
    for context, seed in [(first, 1), (later, 2), (first, 3)]:
        ids, mask = ragged_batch(3, 6, seed=seed)
        with context():
            out = encoder(ids, mask)
        torch.testing.assert_close(out, fn(ids, mask), rtol=1e-5, atol=1e-6)
    assert encoder.stats.as_dict() == {"captures": 1, "replays": 3, "eager_fallbacks": 0}


def test_prepare_defaults_to_where_the_graphs_live():
    encoder = eager_encoder(masked_mixer(), batch_buckets=(1, 4), sequence_buckets=(8,))
    encoder(*ragged_batch(1, 5))  # captured on the CPU
    encoder.prepare([(3, 8)])  # no device: the CPU again, not CUDA
    assert encoder.captured_buckets == [(1, 8), (4, 8)]
    fresh = GraphedEncoder(masked_mixer(), capture=EagerCapture(), sequence_buckets=(8,), device="cpu")
    fresh.prepare([(2, 8)])  # nothing captured yet: the constructor's device
    assert fresh.captured_buckets == [(2, 8)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_prepare_on_cuda_without_a_gpu_is_one_clear_error():
    encoder = eager_encoder(masked_mixer())
    with pytest.raises(RuntimeError, match="GraphedEncoder.prepare.*needs a CUDA device"):
        encoder.prepare([(1, 8)])  # nothing captured, no device given: CUDA
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        encoder.prepare([(1, 8)], device="cuda")
    assert encoder.captured_buckets == []


def test_a_bool_mask_and_int32_ids_work():
    fn = masked_mixer()
    ids, mask = ragged_batch(2, 6)
    encoder = eager_encoder(fn, sequence_buckets=(8,))
    torch.testing.assert_close(encoder(ids.int(), mask.bool()), fn(ids, mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder(ids, mask), fn(ids, mask), rtol=1e-5, atol=1e-6)  # reused, cast on copy


# ---- errors -----------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors():
    encoder = eager_encoder(masked_mixer())
    ids, mask = ragged_batch(2, 6)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        encoder(ids, mask[:, :5])
    with pytest.raises(ValueError, match=r"\(batch, sequence\) tensor"):
        encoder(ids[0], mask[0])
    with pytest.raises(ValueError, match=r"\(batch, sequence\) tensor"):
        encoder(ids.tolist(), mask)
    with pytest.raises(TypeError, match="integer token ids"):
        encoder(ids.float(), mask)
    with pytest.raises(ValueError, match="empty input"):
        encoder(ids[:, :0], mask[:, :0])
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        encoder(ids, mask.to("meta"))
    with pytest.raises(TypeError, match="must be callable"):
        GraphedEncoder("model")


def test_callables_must_return_the_hidden_states_tensor():
    ids, mask = ragged_batch(2, 6)
    with pytest.raises(TypeError, match="unpad=False"):
        eager_encoder(lambda i, m: {"last_hidden_state": i})(ids, mask)
    with pytest.raises(ValueError, match="expected \\(batch, sequence, ...\\)"):
        eager_encoder(lambda i, m: i[:, :1, None].float())(ids, mask)


def test_cuda_graph_capture_refuses_cpu_tensors_without_touching_a_gpu():
    encoder = GraphedEncoder(masked_mixer())  # the default strategy: real CUDA graphs
    assert isinstance(encoder.capture, CudaGraphCapture)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*EagerCapture"):
        encoder(*ragged_batch(2, 6))
    assert encoder.stats.as_dict() == {"captures": 0, "replays": 0, "eager_fallbacks": 0}
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_iterations_are_checked(warmup):
    with pytest.raises(ValueError, match="warmup_iters"):
        CudaGraphCapture(warmup_iters=warmup)


def test_importing_the_runtime_touches_nothing_device_specific(tmp_path):
    probe = (
        "import sys, torch, fastmini.runtime; m = sys.modules;"
        "print(torch.cuda.is_initialized(), 'torch.utils.cpp_extension' in m, 'fastmini.kernels' in m)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.split() == ["False", "False", "False"]


# ---- the model --------------------------------------------------------------------------------


def padded_encoder(model: FastMiniModel):
    """The model in its padded layout (no host sync, no mask-dependent shapes): what a graph can capture."""
    return lambda ids, mask: model.encode(ids, mask, unpad=False).sequence


def tiny_model(tiny_config, randomize, dtype=torch.float32, device="cpu") -> FastMiniModel:
    model = randomize(FastMiniModel(tiny_config(max_position_embeddings=64)))
    return model.eval().to(device=device, dtype=dtype)


def captured_once(tiny_config, randomize, unpadded: bool):
    """(model, its graphed encoder through the stand-in, ids, mask) after one call has captured a bucket."""
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(unpadded=unpadded, capture=EagerCapture(), sequence_buckets=(8, 16))
    ids, mask = ragged_batch(2, 8, vocab=99, seed=1)
    encoder(ids, mask)
    return model, encoder, ids, mask


def test_the_model_through_the_stand_in_matches_its_unpadded_forward(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(capture=EagerCapture(), batch_buckets=(1, 2, 4), sequence_buckets=(8, 16, 32, 64))
    for shape in [(1, 5), (3, 13), (4, 32), (2, 40)]:
        ids, mask = ragged_batch(*shape, vocab=99, seed=shape[1])
        with torch.no_grad():
            expected = model(ids, mask).last_hidden_state
        out = encoder(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(out[real], expected[real], rtol=1e-4, atol=1e-4)
        assert not out[~real].any()
    assert encoder.stats.captures == 4


@pytest.mark.parametrize("unpadding", [True, False], ids=["unpadded", "padded"])
def test_a_batch_beyond_the_buckets_runs_in_the_models_own_layout(tiny_config, randomize, monkeypatch, unpadding):
    """The batches past the largest bucket are the large ones: without a graph to fit, they skip padding as the
    model does (unless set_unpadding(False)), rather than run the padded layout the graphs record."""
    model = tiny_model(tiny_config, randomize).set_unpadding(unpadding)
    encoder = model.graphed_encoder(capture=EagerCapture(), batch_buckets=(1, 2), sequence_buckets=(8, 16))
    layouts = []
    encode = model.encode

    def recording_encode(*arguments, **keywords):
        encoded = encode(*arguments, **keywords)
        layouts.append(encoded.packing is not None)
        return encoded

    monkeypatch.setattr(model, "encode", recording_encode)
    ids, mask = ragged_batch(4, 13, vocab=99, seed=3)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    layouts.clear()
    out = encoder(ids, mask)
    assert encoder.stats.eager_fallbacks == 1 and layouts == [unpadding]
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
    assert not out[~real].any()


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_weights_moved_after_a_capture_are_refused_until_reset(tiny_config, randomize, unpadded):
    """.to(dtype) or load_state_dict(assign=True) gives the weights new storage: a real graph would replay reading
    the old, freed one. The encoder refuses such a call until reset(), then captures again."""
    model, encoder, ids, mask = captured_once(tiny_config, randomize, unpadded)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"weights moved since its graphs were captured.*call reset\(\) first"):
        encoder(ids, mask)
    encoder.reset()
    assert encoder(ids, mask).dtype == torch.float64
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    with pytest.raises(RuntimeError, match="weights moved"):
        encoder(ids, mask)
    encoder.reset()
    model.load_state_dict(state)  # in place: the graphs keep reading the same storage
    encoder(ids, mask)
    encoder(ids, mask)


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_a_replaced_embedding_module_is_refused_until_reset(tiny_config, randomize, unpadded):
    """set_input_embeddings() puts a new table in: a real graph would keep reading the old one."""
    model, encoder, ids, mask = captured_once(tiny_config, randomize, unpadded)
    old = model.get_input_embeddings()
    model.set_input_embeddings(torch.nn.Embedding(old.num_embeddings, old.embedding_dim))
    with pytest.raises(RuntimeError, match="weights moved"):
        encoder(ids, mask)
    encoder.reset()
    encoder(ids, mask)


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_bool_input_ids_are_refused(tiny_config, randomize, unpadded):
    """The unpadded encoder's int64 staging turned True/False into token ids 1/0 and answered."""
    encoder = tiny_model(tiny_config, randomize).graphed_encoder(unpadded=unpadded, capture=EagerCapture())
    ids, mask = ragged_batch(2, 8, vocab=99, seed=1)
    with pytest.raises(TypeError, match="input_ids must hold integer token ids, got torch.bool"):
        encoder(ids.bool(), mask)


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_a_given_eager_fn_serves_what_no_bucket_holds(tiny_config, randomize, unpadded):
    """The unpadded encoder ran its own fn past the buckets whatever eager_fn said (and the model's padded
    encoder refused an eager_fn: "multiple values")."""
    calls = []

    def eager(ids, mask):
        calls.append(tuple(ids.shape))
        return torch.ones(*ids.shape, 36)

    model = tiny_model(tiny_config, randomize)
    encoder = model.graphed_encoder(
        unpadded=unpadded, capture=EagerCapture(), batch_buckets=(2,), sequence_buckets=(8,), eager_fn=eager
    )
    ids, mask = ragged_batch(3, 8, vocab=99, seed=1)  # 3 rows: past the largest batch bucket
    assert encoder(ids, mask).sum() == 3 * 8 * 36 and calls == [(3, 8)]


def test_the_models_encoder_follows_the_model_moved_and_reset(tiny_config, randomize):
    """The device prepare() and host inputs go to is read from the model: after moving it and reset() (what the
    weights check asks for) the encoder serves the new device (it kept the one of its creation)."""
    with torch.device("meta"):
        model = FastMiniModel(tiny_config(max_position_embeddings=64)).eval()
    encoder = model.graphed_encoder(unpadded=True, capture=EagerCapture(), sequence_buckets=(8,))
    assert encoder.default_device.type == "meta"
    model.to_empty(device="cpu")
    randomize(model)
    encoder.reset()
    assert encoder.default_device == torch.device("cpu")
    ids, mask = ragged_batch(2, 8, vocab=99, seed=1)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    torch.testing.assert_close(encoder(ids, mask)[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_the_models_encoder_prepares_on_the_models_device(tiny_config, randomize):
    encoder = tiny_model(tiny_config, randomize).graphed_encoder(capture=EagerCapture(), sequence_buckets=(8,))
    assert encoder.default_device == torch.device("cpu")
    encoder.prepare([(2, 8)])
    assert encoder.captured_buckets == [(2, 8)]


def test_a_model_in_train_mode_is_refused(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize).train()
    with pytest.raises(RuntimeError, match=r"train\(\) mode.*eval\(\)"):
        model.graphed_encoder(capture=EagerCapture())
    assert isinstance(model.eval().graphed_encoder(capture=EagerCapture()), GraphedEncoder)


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_a_model_put_back_in_train_mode_is_refused_at_its_next_capture(tiny_config, randomize, unpadded):
    """Dropout would be frozen into a graph captured after model.train(): every capture checks again."""
    model, encoder, ids, mask = captured_once(tiny_config, randomize, unpadded)
    model.train()
    with pytest.raises(RuntimeError, match=r"train\(\) mode.*eval\(\)"):
        encoder(*ragged_batch(2, 16, vocab=99, seed=1))


@pytest.mark.parametrize("unpadded", [False, True], ids=["padded", "unpadded"])
def test_graphs_record_only_the_last_hidden_state_whatever_the_config_asks(
    tiny_config, randomize, monkeypatch, unpadded
):
    """A config with output_hidden_states / output_attentions must not make every graph compute and re-pad the
    N + 1 states and the (B, A, S, S) maps it throws away."""
    model = randomize(FastMiniModel(tiny_config(output_hidden_states=True, output_attentions=True))).eval()
    asked = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *args, **options: asked.append(options) or encode(*args, **options))
    encoder = model.graphed_encoder(unpadded=unpadded, capture=EagerCapture(), sequence_buckets=(8,))
    ids, mask = ragged_batch(2, 8, vocab=99, seed=0)
    out = encoder(ids, mask)
    assert asked and all(not o["output_hidden_states"] and not o["output_attentions"] for o in asked)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
    torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)


# ---- on a GPU ---------------------------------------------------------------------------------

GPU_SHAPES = [(1, 7), (1, 32), (3, 20), (5, 33), (8, 64)]
# Graphed vs eager in the same padded layout: the same kernels up to the bucket's extra rows/keys.
# vs the default unpadded path: other kernels on other shapes, so bf16 rounds differently.
SAME_LAYOUT = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
UNPADDED = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=5e-2, atol=1e-1)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_model_matches_eager_on_real_tokens(
    tiny_config, randomize, dtype, backend, monkeypatch, triton_launches
):
    """Through torch's ops and through the Triton kernels (which CUDA picks by itself once verified): a
    kernel launch must be capturable (no host sync, no allocation outside the pool) and replay alike."""
    monkeypatch.setenv("FASTMINI_BACKEND", backend)
    model = tiny_model(tiny_config, randomize, dtype, "cuda")
    fn = padded_encoder(model)
    encoder = GraphedEncoder(fn, batch_buckets=(1, 2, 4, 8), sequence_buckets=(8, 16, 32, 64), max_sequence_length=64)
    captured = set()
    for shape in GPU_SHAPES:
        ids, mask = (t.cuda() for t in ragged_batch(*shape, vocab=99, seed=shape[1]))
        with torch.no_grad():
            padded = fn(ids, mask)  # same layout, same shape, eager
            unpadded = model(ids, mask).last_hidden_state  # the default path
        before = dict(triton_launches)
        out = encoder(ids, mask)
        launched = {op: count - before[op] for op, count in triton_launches.items()}
        bucket = encoder.grid.choose(*shape)
        if backend == "triton" and bucket not in captured:  # warm-up and capture ran every kernel
            assert all(launched.values()), (shape, launched)
        else:  # torch's ops, or a replay: no Python runs, so no launcher
            assert not any(launched.values()), (shape, launched)
        captured.add(bucket)
        real = mask.bool()
        assert out.shape == (*shape, model.config.hidden_size) and out.dtype == dtype
        assert torch.isfinite(out[real]).all()
        torch.testing.assert_close(out[real], padded[real], **SAME_LAYOUT[dtype])
        torch.testing.assert_close(out[real], unpadded[real], **UNPADDED[dtype])
    buckets = {encoder.grid.choose(*shape) for shape in GPU_SHAPES}  # (5, 33) and (8, 64) share one: 4 captures
    assert encoder.stats.captures == len(buckets) and encoder.stats.replays == len(GPU_SHAPES)


@pytest.mark.gpu
@needs_cuda
def test_automatic_choice_takes_the_graph_only_kernels_while_recording(
    tiny_config, randomize, monkeypatch, triton_launches
):
    """With no backend named, eager calls run torch's ops, while the capture (its warm-up included, where the
    kernels compile) records add_layer_norm's kernel and, at these few rows (4 x 32 = 128, up to
    TRITON_MAX_FEW_ROWS_ON_GPU), the adapter's, but not the FFN's (fastmini/ops/dispatch.py)."""
    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    model = tiny_model(tiny_config, randomize, torch.bfloat16, "cuda")
    fn = padded_encoder(model)
    ids, mask = (t.cuda() for t in ragged_batch(3, 20, vocab=99, seed=3))
    with torch.no_grad():
        eager = fn(ids, mask)
    assert not any(triton_launches.values()), triton_launches
    out = GraphedEncoder(fn, batch_buckets=(4,), sequence_buckets=(32,))(ids, mask)
    assert 4 * 32 <= TRITON_MAX_FEW_ROWS_ON_GPU
    assert triton_launches["add_layer_norm"] > 0 and triton_launches["adapter_bottleneck"] > 0
    assert triton_launches["linear_gelu"] == 0
    real = mask.bool()
    torch.testing.assert_close(out[real], eager[real], **SAME_LAYOUT[torch.bfloat16])


@pytest.mark.gpu
@needs_cuda
def test_graphs_are_reused_and_outputs_survive_replays(tiny_config, randomize):
    model = tiny_model(tiny_config, randomize, device="cuda")
    fn = padded_encoder(model)
    encoder = GraphedEncoder(fn, batch_buckets=(4,), sequence_buckets=(16,))
    first_ids, first_mask = (t.cuda() for t in ragged_batch(3, 10, vocab=99, seed=1))
    first = encoder(first_ids, first_mask)
    kept = first.clone()
    second_ids, second_mask = (t.cuda() for t in ragged_batch(4, 16, vocab=99, seed=2))
    second = encoder(second_ids, second_mask)
    assert torch.equal(first, kept)
    again = encoder(first_ids, first_mask)
    torch.testing.assert_close(again, first, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(second, fn(second_ids, second_mask), rtol=1e-3, atol=1e-3)
    assert encoder.stats.as_dict() == {"captures": 1, "replays": 3, "eager_fallbacks": 0}


@pytest.mark.gpu
@needs_cuda
def test_capture_mechanism_with_a_plain_callable_and_fallback():
    """Independent of the model: a capture-safe callable, the fallback, and CPU inputs refused."""
    fn = masked_mixer(device="cuda")
    encoder = GraphedEncoder(fn, batch_buckets=(1, 2, 4), sequence_buckets=(8, 16))
    for shape in [(1, 3), (2, 8), (4, 16), (3, 11), (5, 4), (1, 17)]:
        ids, mask = (t.cuda() for t in ragged_batch(*shape))
        torch.testing.assert_close(encoder(ids, mask), fn(ids, mask), rtol=1e-4, atol=1e-4)
    assert encoder.stats.eager_fallbacks == 2
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        encoder(*ragged_batch(1, 3))
