"""The torch reference ops against SPEC.md's formulas written out by hand, and backend dispatch."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastmini.ops import (
    BackendUnavailableError,
    adapter_bottleneck,
    adapter_bottleneck_ref,
    add_layer_norm,
    linear_gelu,
    resolve_backend,
    self_attention,
)


def layer_norm_by_hand(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def gelu_by_hand(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("hidden, reduction", [(36, 4), (312, 16), (768, 16)])
def test_adapter_bottleneck(hidden, reduction):
    torch.manual_seed(0)
    x = torch.randn(3, 5, hidden, dtype=torch.float64)
    down_w, down_b = (
        torch.randn(hidden // reduction, hidden, dtype=torch.float64),
        torch.randn(hidden // reduction, dtype=torch.float64),
    )
    up_w, up_b = (
        torch.randn(hidden, hidden // reduction, dtype=torch.float64),
        torch.randn(hidden, dtype=torch.float64),
    )
    norm_w, norm_b = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    expected = layer_norm_by_hand(x + gelu_by_hand(x @ down_w.T + down_b) @ up_w.T + up_b, norm_w, norm_b, 1e-12)
    actual = adapter_bottleneck(x, down_w, down_b, up_w, up_b, norm_w, norm_b, 1e-12)
    torch.testing.assert_close(actual, expected)


def test_add_layer_norm_and_its_dropout():
    torch.manual_seed(0)
    x, residual = torch.randn(4, 36, dtype=torch.float64), torch.randn(4, 36, dtype=torch.float64)
    weight, bias = torch.randn(36, dtype=torch.float64), torch.randn(36, dtype=torch.float64)
    torch.testing.assert_close(
        add_layer_norm(x, residual, weight, bias, 1e-5), layer_norm_by_hand(x + residual, weight, bias, 1e-5)
    )
    torch.manual_seed(1)
    dropped = add_layer_norm(x, residual, weight, bias, 1e-5, dropout_p=0.5)
    torch.manual_seed(1)
    keep = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.testing.assert_close(dropped, layer_norm_by_hand(x * keep + residual, weight, bias, 1e-5))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        add_layer_norm(x, residual, weight, bias, 1e-5, dropout_p=1.0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu(approximate):
    torch.manual_seed(0)
    x, w, b = (
        torch.randn(7, 36, dtype=torch.float64),
        torch.randn(37, 36, dtype=torch.float64),
        torch.randn(37, dtype=torch.float64),
    )
    torch.testing.assert_close(linear_gelu(x, w, b, approximate), gelu_by_hand(x @ w.T + b, approximate))
    with pytest.raises(ValueError, match="approximate must be one of"):
        linear_gelu(x, w, b, "erf")


def test_self_attention_both_paths_agree_and_mask_padding():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 36, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    eager, probabilities = self_attention(q, k, v, 6, mask, need_weights=True)
    fused, none = self_attention(q, k, v, 6, mask, need_weights=False)
    assert none is None
    torch.testing.assert_close(eager, fused)
    # by hand, head 0 of sequence 1: only the 4 real keys
    scores = q[1, :, :6] @ k[1, :4, :6].T / math.sqrt(6)
    torch.testing.assert_close(probabilities[1, 0, :, :4], scores.softmax(-1))
    assert torch.all(probabilities[1, :, :, 4:] == 0)


def test_dispatch_rules(monkeypatch):
    available = {"torch": object()}
    cpu = torch.zeros(1)
    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("op", cpu, None, available) == "torch"
    assert resolve_backend("op", cpu, None, {**available, "triton": object()}) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", cpu, None, {**available, "triton": object()}) == "triton"
    with pytest.raises(BackendUnavailableError, match="op 'op' has no 'triton' backend"):
        resolve_backend("op", cpu, "triton", available)
    monkeypatch.setenv("FASTMINI_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="FASTMINI_BACKEND='cuda'"):
        resolve_backend("op", cpu, None, available)
    assert resolve_backend("op", cpu, "torch", available) == "torch"  # the argument wins over the variable
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA tensor"):
        resolve_backend("op", cpu, "triton", {**available, "triton": object()})
    with pytest.raises(ValueError, match="unknown backend='tpu'"):
        resolve_backend("op", cpu, "tpu", available)


def test_without_triton_installed_the_interpreter_switch_leaves_torch(monkeypatch):
    """TRITON_INTERPRET=1 where triton is not installed (macOS, Windows): the automatic choice stays torch (it picked
    triton, whose import then failed deep inside a forward), and asking for triton by name says what is missing."""
    from fastmini.ops import dispatch

    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    available = {"torch": object(), "triton": object()}
    assert resolve_backend("op", torch.zeros(1), None, available) == "torch"
    with pytest.raises(BackendUnavailableError, match="needs the triton package, not installed"):
        resolve_backend("op", torch.zeros(1), "triton", available)


def test_unverified_kernels_are_never_chosen_automatically_for_cuda(monkeypatch):
    """A kernel that has only run in the interpreter is picked for CUDA tensors only by name."""
    from types import SimpleNamespace

    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    cuda_tensor = SimpleNamespace(is_cuda=True, device="cuda:0")
    available = {"torch": object(), "triton": object()}
    assert resolve_backend("op", cuda_tensor, None, available) == "torch"
    assert resolve_backend("op", cuda_tensor, None, available, verified_on_gpu=("triton",)) == "triton"
    assert resolve_backend("op", cuda_tensor, "triton", available) == "triton"


def test_automatic_choice_on_cuda_follows_each_ops_measured_rule(monkeypatch):
    """Verified kernels are picked for CUDA tensors only where the op's rule says they pay off: add_layer_norm
    while a CUDA graph is recorded, adapter_bottleneck then too up to TRITON_MAX_FEW_ROWS_ON_GPU rows and from
    TRITON_MIN_ROWS_ON_GPU rows on, linear_gelu never; outside a recording (eager code, where the host's launch
    cost counts) and under CUDA autocast, torch."""
    from types import SimpleNamespace

    from fastmini.ops.dispatch import in_cuda_graph_recording, recording_cuda_graph

    # The modules, not the functions of the same names that fastmini.ops exports.
    adapter_op, add_layer_norm_op, linear_gelu_op = (
        importlib.import_module(f"fastmini.ops.{name}")
        for name in ("adapter_bottleneck", "add_layer_norm", "linear_gelu")
    )
    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    rows = adapter_op.TRITON_MIN_ROWS_ON_GPU

    def cuda_tensor(n_rows, hidden=768):
        return SimpleNamespace(
            is_cuda=True, device="cuda:0", dtype=torch.bfloat16, shape=(n_rows, hidden), numel=lambda: n_rows * hidden
        )

    def automatic(module, tensor):
        return resolve_backend(
            "op", tensor, None, module._BACKENDS, module._VERIFIED_ON_GPU, module._triton_pays_off_on_gpu
        )

    large, small = cuda_tensor(rows), cuda_tensor(rows - 1)
    for module in (add_layer_norm_op, adapter_op, linear_gelu_op):
        assert "triton" in module._VERIFIED_ON_GPU
        assert automatic(module, large) == "torch", module.__name__
    assert not in_cuda_graph_recording()
    with recording_cuda_graph():
        assert in_cuda_graph_recording()
        assert automatic(add_layer_norm_op, small) == "triton"
        assert automatic(adapter_op, large) == "triton"
        assert automatic(adapter_op, small) == "torch"
        few = adapter_op.TRITON_MAX_FEW_ROWS_ON_GPU
        assert automatic(adapter_op, cuda_tensor(few)) == "triton"
        assert automatic(adapter_op, cuda_tensor(128)) == "triton"  # the (1, 128) latency's rows
        assert automatic(adapter_op, cuda_tensor(few + 1)) == "torch"
        assert automatic(linear_gelu_op, large) == "torch"
        assert resolve_backend("op", small, "triton", linear_gelu_op._BACKENDS) == "triton"  # by name: always
        # Under CUDA autocast torch's LayerNorm returns fp32, the kernels bf16: the recorded graph keeps torch's
        torch.set_autocast_enabled("cuda", True)
        try:
            assert automatic(add_layer_norm_op, small) == "torch" and automatic(adapter_op, large) == "torch"
        finally:
            torch.set_autocast_enabled("cuda", False)
        assert automatic(add_layer_norm_op, small) == "triton" and automatic(adapter_op, large) == "triton"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inductor fuses by itself
        assert automatic(add_layer_norm_op, small) == "torch"
    assert not in_cuda_graph_recording()


@pytest.mark.parametrize("backend", [None, "torch"])
def test_the_adapters_torch_composition_passes_its_backend_request_to_add_layer_norm(
    monkeypatch, triton_launches, backend
):
    """Chosen automatically, the adapter's torch composition leaves its residual + LayerNorm to add_layer_norm's
    own automatic choice (on a GPU, its fused kernel while a CUDA graph of a small batch is recorded: here, on
    the CPU, the interpreter's); asked for by name, torch stays torch throughout. Same values either way."""
    adapter_op = importlib.import_module("fastmini.ops.adapter_bottleneck")
    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)  # automatic: the interpreter's triton on the CPU
    resolve = adapter_op.resolve_backend
    monkeypatch.setattr(adapter_op, "resolve_backend", lambda *args: "torch" if args[2] is None else resolve(*args))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 36, generator=generator)
    parameters = [torch.randn(shape, generator=generator) * 0.3 for shape in ((9, 36), (9,), (36, 9), (36,))]
    parameters += [1 + 0.1 * torch.randn(36, generator=generator), 0.1 * torch.randn(36, generator=generator)]
    got = adapter_bottleneck(x, *parameters, 1e-12, backend=backend)
    assert triton_launches == {"add_layer_norm": int(backend is None), "linear_gelu": 0, "adapter_bottleneck": 0}
    torch.testing.assert_close(got, adapter_bottleneck_ref(x, *parameters, 1e-12), rtol=1e-5, atol=1e-5)


def test_ops_refuse_a_missing_backend():
    x = torch.randn(2, 36)
    with pytest.raises(BackendUnavailableError, match="adapter_bottleneck"):
        adapter_bottleneck(
            x,
            torch.randn(9, 36),
            torch.randn(9),
            torch.randn(36, 9),
            torch.randn(36),
            torch.ones(36),
            torch.zeros(36),
            1e-12,
            backend="cuda",
        )


@pytest.mark.parametrize(("name", "on_cuda"), [("attention_kl", "triton"), ("logit_losses", "torch")])
def test_the_loss_kernels_are_automatic_on_cuda_where_verified_and_torch_elsewhere(monkeypatch, name, on_cuda):
    """The distillation's loss kernels passed their tests on an H200 and took 1/4-1/9 of torch's GPU time there at
    the recipe's sizes: automatic on CUDA, torch on the CPU. The logit losses' forward changed after its last GPU
    run: torch on CUDA too until a GPU session passes its tests again (fastmini/ops/logit_losses.py)."""
    from types import SimpleNamespace

    module = importlib.import_module(f"fastmini.ops.{name}")
    monkeypatch.delenv("FASTMINI_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda_tensor = SimpleNamespace(is_cuda=True, device="cuda:0")
    assert resolve_backend(name, cuda_tensor, None, module._BACKENDS, module._VERIFIED_ON_GPU) == on_cuda
    assert resolve_backend(name, torch.zeros(1), None, module._BACKENDS, module._VERIFIED_ON_GPU) == "torch"


def test_the_loss_ops_refuse_tensors_on_several_devices_and_a_teacher_that_wants_a_gradient():
    from fastmini.ops.attention_kl import attention_kl_sum
    from fastmini.ops.logit_losses import logit_losses_sum

    student, labels = torch.zeros(2, 5, requires_grad=True), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"student, labels and teacher must be on one device, got cpu, cpu and meta"):
        logit_losses_sum(student, labels, torch.zeros(2, 5, device="meta"), 1.0)
    with pytest.raises(ValueError, match="the teacher's logits are the target .* detach them first"):
        logit_losses_sum(student, labels, torch.zeros(2, 5, requires_grad=True), 1.0)
    maps, rows = torch.full((1, 2, 3, 3), 1 / 3), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"student, rows and teacher must be on one device, got cpu, meta and cpu"):
        attention_kl_sum(maps, maps, rows.to("meta"), 1.0)
    with pytest.raises(ValueError, match="the teacher's maps are the target"):
        attention_kl_sum(maps, maps.clone().requires_grad_(), rows, 1.0)
