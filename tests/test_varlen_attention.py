"""Packed attention's varlen path: the layout contract on the CPU, torch's flash kernel on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastmini import FastMiniModel
from fastmini.ops import BackendUnavailableError, Packing, attention, packed_self_attention, self_attention
from fastmini.ops.attention import per_sequence_attention

MASKS = {
    "right": [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
    "left": [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]],
    "holes": [[1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1]],
}


def _packed_qkv(packing: Packing, hidden: int, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = packing.indices.numel()
    return [torch.randn(tokens, hidden, generator=generator).to(device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("pattern", MASKS)
def test_cu_seqlens_are_the_offsets_of_each_sequence(pattern):
    mask = torch.tensor(MASKS[pattern])
    packing = Packing.from_attention_mask(mask)
    assert packing.cu_seqlens.dtype == torch.int32
    assert packing.cu_seqlens.tolist() == [0, *mask.sum(1).cumsum(0).tolist()]


@pytest.mark.parametrize("pattern", MASKS)
def test_the_varlen_contract_equals_packed_attention(pattern):
    """What fastmini hands the varlen kernel (packed heads + cu_seqlens) means the same attention."""
    packing = Packing.from_attention_mask(torch.tensor(MASKS[pattern]))
    query, key, value = _packed_qkv(packing, hidden=24)
    padded = [packing.unpack(t) for t in (query, key, value)]
    expected = packing.pack(self_attention(*padded, 4, packing.key_padding_mask)[0])
    heads = [t.view(t.shape[0], 4, 6) for t in (query, key, value)]
    got = per_sequence_attention(*heads, packing.cu_seqlens).reshape(expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "lengths, per_sequence",
    [([128, 8, 8, 8], True), ([128, 120, 127, 100], False), ([40, 6, 6, 6], True), ([40, 35], False)],
)
def test_cpu_attends_per_sequence_when_padding_dominates(monkeypatch, lengths, per_sequence):
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    packing = Packing.from_attention_mask(mask)
    query, key, value = _packed_qkv(packing, hidden=24)
    padded = [packing.unpack(t) for t in (query, key, value)]
    expected = packing.pack(self_attention(*padded, 4, packing.key_padding_mask)[0])
    calls = []
    original = attention.per_sequence_attention
    monkeypatch.setattr(attention, "per_sequence_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    got, _ = packed_self_attention(query, key, value, 4, packing)
    assert bool(calls) == per_sequence
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_per_sequence_attention_trains(tiny_config, randomize):
    """Gradients flow through the per-sequence path (dropout on): a padded batch that takes it."""
    from fastmini import FastMiniForSequenceClassification

    model = randomize(FastMiniForSequenceClassification(tiny_config(num_labels=2)), std=0.1).train()
    mask = torch.zeros(4, 12, dtype=torch.long)
    mask[0, :] = 1
    mask[1:, :2] = 1
    input_ids = torch.randint(5, 99, (4, 12)) * mask
    model(input_ids, mask, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_backend_choice_errors():
    packing = Packing.from_attention_mask(torch.tensor(MASKS["right"]))
    query, key, value = _packed_qkv(packing, hidden=24)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA tensor"):
        packed_self_attention(query, key, value, 4, packing, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        packed_self_attention(query, key, value, 4, packing, backend="triton")


def test_the_varlen_kernel_is_used_only_where_it_can_serve_the_call(monkeypatch):
    """The flash kernel raises on head sizes that are not multiples of 8 (the tiny test configs' 6 did, on an
    H200, once CUDA chose it by itself): those, fp32, dropout, probabilities and no tokens at all keep the
    padded path, as does a GPU without flash attention even when "cuda" is asked for by name."""
    from types import SimpleNamespace

    def serves(dtype, head_size, dropout_p, need_weights, tokens):
        query = SimpleNamespace(dtype=dtype, shape=(tokens, 4 * head_size), device="cuda:0")
        return attention._varlen_serves(query, head_size, dropout_p, need_weights)

    runs_on = {"flash": True}
    monkeypatch.setattr(attention, "_varlen_runs_on", lambda device: runs_on["flash"])
    assert serves(torch.bfloat16, 64, 0.0, False, 5) and serves(torch.float16, 8, 0.0, False, 1)
    assert serves(torch.bfloat16, 256, 0.0, False, 5)
    assert not serves(torch.bfloat16, 6, 0.0, False, 5)
    assert not serves(torch.bfloat16, 264, 0.0, False, 5)
    assert not serves(torch.float32, 64, 0.0, False, 5)
    assert not serves(torch.bfloat16, 64, 0.1, False, 5)
    assert not serves(torch.bfloat16, 64, 0.0, True, 5)
    assert not serves(torch.bfloat16, 64, 0.0, False, 0)
    runs_on["flash"] = False  # torch < 2.9 or a GPU of compute capability < 8.0
    assert not serves(torch.bfloat16, 64, 0.0, False, 5)


def test_cuda_takes_the_varlen_kernel_by_itself_only_where_torch_and_the_gpu_have_it(monkeypatch):
    from types import SimpleNamespace

    cuda_tensor = SimpleNamespace(is_cuda=True, device="cuda:0")
    monkeypatch.setattr(attention, "_varlen_runs_on", lambda device: True)
    assert attention._packed_backend(cuda_tensor, None) == "cuda"
    monkeypatch.setattr(attention, "_varlen_runs_on", lambda device: False)  # torch < 2.9, or a pre-Ampere GPU
    assert attention._packed_backend(cuda_tensor, None) == "torch"
    monkeypatch.setattr(attention, "_varlen_module_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"needs torch.nn.attention.varlen \(torch >= 2.9\); this is"):
        attention._packed_backend(cuda_tensor, "cuda")


def test_the_varlen_kernel_switch_routes_calls_without_gradients_to_cudnn(monkeypatch):
    """VARLEN_KERNEL = "cudnn" sends inference calls to cuDNN's kernel; a call whose inputs need gradients keeps
    flash, whose backward is verified; an unknown kernel is named. (The kernels themselves run on a GPU only:
    stand-ins here record which one was called with what.)"""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", lambda *arguments: calls.append(("flash", arguments)) or "flash")
    monkeypatch.setattr(
        attention, "_cudnn_varlen_attention", lambda *arguments: calls.append(("cudnn", arguments)) or "cudnn"
    )
    query, key, value = (torch.zeros(5, 2, 8) for _ in range(3))
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert attention.VARLEN_KERNEL == "flash"  # the default until a GPU says otherwise
    assert attention._varlen_attention(query, key, value, cu_seqlens, 3) == "flash"
    assert calls[-1][1][3] is cu_seqlens and calls[-1][1][4] is cu_seqlens and calls[-1][1][5:] == (3, 3)
    monkeypatch.setattr(attention, "VARLEN_KERNEL", "cudnn")
    assert attention._varlen_attention(query, key, value, cu_seqlens, 3) == "cudnn"
    assert calls[-1][1] == (query, key, value, cu_seqlens, 3)
    trained = query.clone().requires_grad_()
    assert attention._varlen_attention(trained, key, value, cu_seqlens, 3) == "flash"
    with torch.no_grad():
        assert attention._varlen_attention(trained, key, value, cu_seqlens, 3) == "cudnn"
    monkeypatch.setattr(attention, "VARLEN_KERNEL", "triton")
    with pytest.raises(ValueError, match=r"VARLEN_KERNEL must be one of \('flash', 'cudnn'\), got 'triton'"):
        attention._varlen_attention(query, key, value, cu_seqlens, 3)


def test_the_model_switch_reaches_the_shared_layer(tiny_config):
    model = FastMiniModel(tiny_config()).optimize_for_inference(varlen_attention=True)
    assert model.encoder.shared_layer.packed_attention_backend == "cuda"
    assert model.optimize_for_inference().encoder.shared_layer.packed_attention_backend is None
    # False turns the kernel off (the padded layout's SDPA), where the automatic choice would take it on CUDA
    assert model.optimize_for_inference(varlen_attention=False).encoder.shared_layer.packed_attention_backend == "torch"
    with pytest.raises(TypeError, match="varlen_attention must be True, False or None, got 'cuda'"):
        model.optimize_for_inference(varlen_attention="cuda")


@pytest.mark.parametrize("lengths", [[6, 4, 2], [12, 1, 1, 1]], ids=["padded", "mostly-padding"])
def test_the_switch_leaves_a_cpu_model_on_its_cpu_path(tiny_config, randomize, lengths):
    """The switch means "on CUDA": on the CPU, padded batches run as without it (no backend error)."""
    model = randomize(FastMiniModel(tiny_config()), std=0.1).eval()
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = torch.randint(5, 99, mask.shape) * mask
    with torch.no_grad():
        expected = model(input_ids, mask).last_hidden_state
        got = model.optimize_for_inference(varlen_attention=True)(input_ids, mask).last_hidden_state
    assert model.encoder.shared_layer.packed_attention_backend == "cuda"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("torch.nn.attention.varlen") is None,
    reason="needs a CUDA device and torch.nn.attention.varlen (torch >= 2.9)",
)


@pytest.fixture
def varlen_calls(monkeypatch) -> list[int]:
    """One entry per call of the varlen kernel (``attention._varlen_attention``, which packed attention looks up
    when it runs): a test sees that the kernel ran, not only that the results agree."""
    calls: list[int] = []
    run = attention._varlen_attention

    def counted(*arguments, **keywords):
        calls.append(1)
        return run(*arguments, **keywords)

    monkeypatch.setattr(attention, "_varlen_attention", counted)
    return calls


def _gpu_qkv(pattern: str, dtype: torch.dtype) -> tuple[Packing, list[torch.Tensor]]:
    """12 sequences of up to 120 tokens with ``pattern``'s padding, BERT-base's 768 = 12 x 64 heads."""
    mask = torch.tensor(MASKS[pattern], device="cuda").repeat(4, 20)
    packing = Packing.from_attention_mask(mask)
    return packing, _packed_qkv(packing, hidden=768, dtype=dtype, device="cuda")


def _qkv_gradients(inputs, grad_output, packing: Packing, backend: str) -> tuple[torch.Tensor, ...]:
    """d(query, key, value) of ``sum(context * grad_output)`` through packed attention on ``backend``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    context, _ = packed_self_attention(*leaves, 12, packing, backend=backend)
    return torch.autograd.grad(context, leaves, grad_output)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", MASKS)
def test_varlen_kernel_matches_the_padded_path_on_gpu(pattern, dtype, varlen_calls):
    packing, (query, key, value) = _gpu_qkv(pattern, dtype)
    expected, _ = packed_self_attention(query, key, value, 12, packing, backend="torch")
    assert not varlen_calls
    got, _ = packed_self_attention(query, key, value, 12, packing, backend="cuda")
    assert len(varlen_calls) == 1
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", MASKS)
def test_the_cudnn_varlen_kernel_matches_the_padded_path_on_gpu(pattern, dtype, monkeypatch):
    """VARLEN_KERNEL = "cudnn" (inference): the same context as the padded path, query/key/value as the fused QKV
    projection leaves them (column slices of one (T, 3H) tensor, rows 3H apart)."""
    cudnn_calls = []
    run = attention._cudnn_varlen_attention
    monkeypatch.setattr(attention, "_cudnn_varlen_attention", lambda *a: cudnn_calls.append(1) or run(*a))
    monkeypatch.setattr(attention, "VARLEN_KERNEL", "cudnn")
    packing, inputs = _gpu_qkv(pattern, dtype)
    query, key, value = torch.cat(inputs, dim=1).split(768, dim=1)  # strided, as in the model
    with torch.inference_mode():
        expected, _ = packed_self_attention(query, key, value, 12, packing, backend="torch")
        got, _ = packed_self_attention(query, key, value, 12, packing, backend="cuda")
    assert len(cudnn_calls) == 1
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", MASKS)
def test_varlen_kernel_gradients_match_the_padded_path_on_gpu(pattern, dtype, varlen_calls):
    """Once "cuda" is verified, every packed 16-bit call without dropout takes the varlen kernel, training
    included: its backward must give the padded path's query/key/value gradients.

    Tolerance: at these sizes the gradients reach ~2, and bf16 math puts the padded path ~0.014 from an
    fp64 reference (measured on the CPU); a wrong gradient (a sequence attending past its end, a missing
    term) is off by O(1)."""
    packing, inputs = _gpu_qkv(pattern, dtype)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(inputs[0].shape, generator=generator).to(device="cuda", dtype=dtype)
    expected = _qkv_gradients(inputs, grad_output, packing, "torch")
    got = _qkv_gradients(inputs, grad_output, packing, "cuda")
    assert len(varlen_calls) == 1
    for name, gradient, reference in zip(("query", "key", "value"), got, expected, strict=True):
        assert gradient.dtype == dtype and torch.isfinite(gradient).all(), name
        torch.testing.assert_close(gradient.float(), reference.float(), rtol=2e-2, atol=3e-2, msg=name)


@pytest.mark.gpu
@cuda
def test_model_with_varlen_attention_on_gpu(tiny_config, randomize, varlen_calls, monkeypatch):
    # The reference is the padded path whether or not CUDA already picks the varlen kernel by itself.
    monkeypatch.setattr(attention, "_VERIFIED_ON_GPU", ())
    model = randomize(FastMiniModel(tiny_config(hidden_size=64, num_attention_heads=4)), std=0.1)
    model = model.to("cuda", torch.bfloat16).eval()
    input_ids = torch.randint(5, 99, (3, 6), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.tensor(MASKS["holes"], device="cuda")
    with torch.inference_mode():
        expected = model(input_ids, mask).last_hidden_state
        assert not varlen_calls
        got = model.optimize_for_inference(varlen_attention=True)(input_ids, mask).last_hidden_state
    assert len(varlen_calls) == model.config.num_hidden_layers  # the shared layer, once a recursion
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)
