"""Every Triton kernel launch the fused ops make, compiled for an H100 (sm_90) without a GPU.

The interpreter runs kernels through numpy and forgives what the real compiler refuses (a tl.dot
on mismatched dtypes, a block too large for shared memory, a constexpr of the wrong kind). So the
launches of a representative sweep are recorded under the interpreter, and each distinct
(kernel, argument types, constexprs, num_warps, num_stages) is compiled by Triton's CUDA backend
down to a cubin for compute capability 9.0, in a subprocess without the interpreter (the kernels
then take their GPU code paths). ptxas ships in the triton wheel; no GPU or driver is involved.
Passing says the kernels build for Hopper, not that they run correctly there: that is the GPU
tests' job.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")
triton = pytest.importorskip("triton")

KERNEL_RESOURCES = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_resources.py"


def _machinery():
    """benchmarks/kernel_resources.py: the recording of launches and the sm_90 compiler (shared with the script
    that reports each launch's registers and spills)."""
    spec = importlib.util.spec_from_file_location("kernel_resources", KERNEL_RESOURCES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_launches(monkeypatch, sweep) -> list[dict]:
    """The sweep's distinct launches, recorded, not run: a launch is its kernel, argument types, constexprs and
    options, which the host code derives from shapes and dtypes, never from values (the interpreter's run of the
    published sweep took 41 s of this file's 60 and recorded the same launches; running them is the kernel tests'
    job). Outputs are then left unwritten, and the backward passes read them as they are."""
    return _machinery().record_launches(monkeypatch, sweep, execute=False)


def _operands(dtype: torch.dtype, rows: int, hidden: int, *shapes):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=generator).to(dtype).requires_grad_()
    return x, [(torch.randn(shape, generator=generator) * 0.1).to(dtype).requires_grad_() for shape in shapes]


def _sweep(_patch=None):
    """Forward and backward of each op through its Triton backend, at the published sizes (H=768,
    r=16, I=3072) in fp32, bf16 and fp16, and an odd one (H=312) in fp32 and bf16; rows past one 128-row
    tile."""
    from fastmini.kernels import linear_gelu as linear_gelu_kernels

    from fastmini.ops import adapter_bottleneck, add_layer_norm, add_layer_norm_adapter

    for dtype, hiddens in ((torch.float32, (768, 312)), (torch.bfloat16, (768, 312)), (torch.float16, (768,))):
        for hidden in hiddens:
            bottleneck, intermediate = hidden // 16, 4 * hidden
            x, (down_w, down_b, up_w, up_b, norm_w, norm_b) = _operands(
                dtype, 130, hidden, (bottleneck, hidden), (bottleneck,), (hidden, bottleneck), (hidden,), (hidden,),
                (hidden,),
            )  # fmt: skip
            adapter_bottleneck(x, down_w, down_b, up_w, up_b, norm_w, norm_b, 1e-12, backend="triton").sum().backward()
            with torch.no_grad():  # the pre-norm fused kernel (PRE_NORM): inference only
                adapter_parameters = (down_w, down_b, up_w, up_b, norm_w, norm_b)
                add_layer_norm_adapter(x, x, norm_w, norm_b, 1e-12, *adapter_parameters, 1e-12, backend="triton")
            residual = torch.randn_like(x).requires_grad_()
            for dropout_p in (0.0, 0.1):
                out = add_layer_norm(x, residual, norm_w, norm_b, 1e-12, dropout_p, backend="triton")
                out.sum().backward()
            weight = (torch.randn(intermediate, hidden) * 0.05).to(dtype)
            bias = torch.zeros(intermediate, dtype=dtype)
            grad = torch.ones(130, intermediate, dtype=dtype)
            for path in linear_gelu_kernels.PATHS:
                for approximate in ("none", "tanh"):
                    x_plain = x.detach()
                    _y, pre = linear_gelu_kernels.linear_gelu_forward(
                        x_plain, weight, bias, approximate, save_pre=True, path=path
                    )
                    linear_gelu_kernels.linear_gelu_backward(grad, x_plain, weight, bias, pre, approximate, True)


def _attention_kl_sweep(_patch=None):
    """The attention-KL kernels at the recipe's dtypes (fp32 or bf16 student, bf16 teacher), fp16 with fp32 and
    fp64 (the tests'), rows of one key chunk (S=256) and of several (S past MAX_BLOCK_K)."""
    from fastmini.ops.attention_kl import attention_kl_sum

    for student_dtype, teacher_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float32), (torch.float64, torch.float64)):  # fmt: skip
        for seq in (256, 1100):
            student = torch.full((1, 1, 2, seq), 1.0 / seq, dtype=student_dtype, requires_grad=True)
            teacher = torch.full((1, 1, 2, seq), 1.0 / seq, dtype=teacher_dtype)
            real = torch.ones(1, 2, dtype=torch.bool)
            attention_kl_sum(student, teacher, real, 1.0, backend="triton").backward()


def _logit_losses_sweep(_patch=None):
    """The logit-loss kernels at the recipe's dtypes (bf16 or fp32 student, fp32 teacher), fp16 and fp64 (the
    tests'), at T = 1 (one log-sum-exp shared) and T = 2, over the recipe's vocabulary (several chunks)."""
    from fastmini.ops.logit_losses import logit_losses_sum

    for student_dtype, teacher_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                         (torch.float16, torch.bfloat16), (torch.float64, torch.float64)):  # fmt: skip
        for temperature in (1.0, 2.0):
            student = torch.zeros(2, 30522, dtype=student_dtype, requires_grad=True)
            teacher = torch.zeros(2, 30522, dtype=teacher_dtype)
            ce_sum, kl_sum = logit_losses_sum(student, torch.tensor([3, -100]), teacher, temperature, "triton")
            (ce_sum + kl_sum).backward()


def _gpu_only_sweep(patch):
    """The launch choices that only CUDA tensors get, so that the sweep above never records them: fp32
    adapter dots in "tf32x3", 16-bit GEMM operands not upcast, the adapter forward's BLOCK_M shrunk to
    16 or 32 for small batches, the GPU tile sweep's candidates; also add_layer_norm at its largest H and the
    dropout-mask kernel."""
    from fastmini.kernels import adapter_bottleneck as adapter_kernels
    from fastmini.kernels import add_layer_norm as add_layer_norm_kernels
    from fastmini.kernels import linear_gelu as linear_gelu_kernels

    from fastmini.ops import add_layer_norm

    patch.setattr(adapter_kernels, "_input_precision", lambda x: "tf32x3" if x.dtype == torch.float32 else "ieee")
    patch.setattr(linear_gelu_kernels, "_upcast_dot_operands", lambda x: False)
    for dtype in (torch.float32, torch.bfloat16):
        x, (down_w, down_b, up_w, up_b, norm_w, norm_b) = _operands(
            dtype, 130, 768, (48, 768), (48,), (768, 48), (768,), (768,), (768,)
        )
        parameters = [t.detach() for t in (down_w, down_b, up_w, up_b, norm_w, norm_b)]
        for block_m in (16, 32, None):
            _y, mean, rstd, h = adapter_kernels.adapter_bottleneck_forward(
                x.detach(), *parameters, 1e-12, True, tiles={"BLOCK_M": block_m} if block_m else None
            )
        for path in adapter_kernels.BACKWARD_PATHS:
            adapter_kernels.adapter_bottleneck_backward(
                torch.ones_like(x), x.detach(), *parameters, h, mean, rstd, path=path
            )
        if dtype == torch.bfloat16:  # the GPU tile sweep's candidates (benchmarks/test_adapter_bottleneck.py)
            for tiles in adapter_kernels.FORWARD_TILE_CANDIDATES.values():
                adapter_kernels.adapter_bottleneck_forward(x.detach(), *parameters, 1e-12, False, tiles=tiles)
            for options in adapter_kernels.BACKWARD_TILE_CANDIDATES.values():
                adapter_kernels.adapter_bottleneck_backward(
                    torch.ones_like(x), x.detach(), *parameters, h, mean, rstd, **options
                )
        weight, bias = torch.zeros(3072, 768, dtype=dtype), torch.zeros(3072, dtype=dtype)
        for save_pre in (True, False):
            linear_gelu_kernels.linear_gelu_forward(
                x.detach(), weight, bias, "none", save_pre=save_pre, path="fused_gemm"
            )
    rows = torch.zeros(130, 768, dtype=torch.bfloat16)
    statistics = torch.zeros(130, dtype=torch.float32)
    for options in add_layer_norm_kernels.BACKWARD_CANDIDATES.values():  # the GPU sweep's launches
        add_layer_norm_kernels.add_layer_norm_backward(rows, rows, rows[0], statistics, statistics, 0.0, 7, **options)
    wide = torch.zeros(4, add_layer_norm_kernels.MAX_HIDDEN, dtype=torch.bfloat16)
    ones = torch.ones(add_layer_norm_kernels.MAX_HIDDEN, dtype=torch.bfloat16)
    add_layer_norm_kernels.add_layer_norm_forward(wide, wide, ones, ones, 1e-12, 0.1, 7, True)
    for scheme in add_layer_norm_kernels.DROPOUT_RNG_SCHEMES:  # the default's launches are in _sweep's too
        patch.setattr(add_layer_norm_kernels, "DROPOUT_RNG", scheme)
        add_layer_norm_kernels.dropout_keep_mask(7, 130, 768, 0.1, torch.device("cpu"))
        x = torch.zeros(130, 768, dtype=torch.bfloat16, requires_grad=True)
        add_layer_norm(x, torch.zeros_like(x), ones[:768], ones[:768], 1e-12, 0.1, backend="triton").sum().backward()


@pytest.fixture(params=["this-triton", "gpu-machine-triton"])
def compiler_python(request) -> str:
    """The Python whose triton compiles: this environment's, and the GPU machine's version where `make test` has
    built an environment with it (kernel_resources.COMPILER_PYTHON_VARIABLE names it): that compiler refused a
    helper returning None that this one and the interpreter took, which failed every adapter kernel on the GPU
    (2026-11-27)."""
    if request.param == "this-triton":
        return sys.executable
    variable = _machinery().COMPILER_PYTHON_VARIABLE
    if not os.environ.get(variable):
        pytest.skip(f"{variable} names no environment with the GPU machine's triton (make test builds one)")
    return os.environ[variable]


def _compile_for_sm90(specs: list[dict], tmp_path, python: str) -> list[dict]:
    """Compile every spec for sm_90 in a subprocess without the interpreter; fail listing what did not build."""
    outcomes = _machinery().compile_for_sm90(specs, str(tmp_path / "triton-cache"), python)
    failures = [
        f"{spec['name']} {spec['signature']} {spec['constexprs']} {spec['options']}: {outcome['error']}"
        for spec, outcome in zip(specs, outcomes, strict=True)
        if not outcome["ok"]
    ]
    assert not failures, "\n\n".join(failures)
    # Hopper gives a block at most 227 KB of shared memory; the compiler checks the limit only when launching.
    assert max(outcome["shared"] for outcome in outcomes) <= 227 * 1024
    return outcomes


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_sm90(monkeypatch, tmp_path, compiler_python):
    specs = _record_launches(monkeypatch, _sweep)
    kernels = {spec["name"] for spec in specs}
    assert len(kernels) >= 6, kernels  # adapter fwd/bwd x2, add_layer_norm fwd/bwd, bias-GELU fwd/bwd, GEMM
    assert any(spec["constexprs"].get("PRE_NORM") for spec in specs)  # add_layer_norm_adapter's fused kernel
    outcomes = _compile_for_sm90(specs, tmp_path, compiler_python)
    # what benchmarks/kernel_resources.py reports, read from each cubin by the wheel's cuobjdump
    assert all(1 <= outcome["registers"] <= 255 and outcome["spill_bytes"] >= 0 for outcome in outcomes)


@pytest.mark.slow
def test_launch_choices_only_a_gpu_makes_compile_for_sm90(monkeypatch, tmp_path, compiler_python):
    specs = _record_launches(monkeypatch, _gpu_only_sweep)
    constexprs = [spec["constexprs"] for spec in specs]
    assert any(c.get("INPUT_PRECISION") == "tf32x3" for c in constexprs)
    assert any(c.get("UPCAST_DOT_OPERANDS") is False for c in constexprs)
    assert {16, 32} <= {c.get("BLOCK_M") for c in constexprs}
    assert "_backward_gemm_rows_kernel" in {spec["name"] for spec in specs}
    dropout_kernels = [spec for spec in specs if spec["constexprs"].get("HAS_DROPOUT") or "mask" in spec["name"]]
    assert {spec["constexprs"]["FOUR_PER_CALL"] for spec in dropout_kernels} == {True, False}
    assert {"_add_layer_norm_forward_kernel", "_add_layer_norm_backward_kernel"} <= {
        spec["name"] for spec in dropout_kernels if spec["constexprs"]["FOUR_PER_CALL"]
    }
    _compile_for_sm90(specs, tmp_path, compiler_python)


@pytest.mark.slow
def test_logit_losses_kernels_compile_for_sm90(monkeypatch, tmp_path, compiler_python):
    specs = _record_launches(monkeypatch, _logit_losses_sweep)
    assert {spec["name"] for spec in specs} == {"_forward_kernel", "_backward_kernel"}
    assert {spec["constexprs"]["SAME_SCALE"] for spec in specs if spec["name"] == "_forward_kernel"} == {True, False}
    _compile_for_sm90(specs, tmp_path, compiler_python)


@pytest.mark.slow
def test_attention_kl_kernels_compile_for_sm90(monkeypatch, tmp_path, compiler_python):
    specs = _record_launches(monkeypatch, _attention_kl_sweep)
    assert {spec["name"] for spec in specs} == {"_forward_kernel", "_backward_kernel"}
    assert {spec["constexprs"]["BLOCK_K"] for spec in specs} == {256, 1024}
    _compile_for_sm90(specs, tmp_path, compiler_python)


def test_resident_warps_follow_registers_shared_memory_and_the_sm_limits():
    resident_warps = _machinery().resident_warps
    assert resident_warps(255, 8, 0) == 8  # 255 registers a thread: one block of 8 warps fills the registers
    assert resident_warps(148, 4, 0) == 12  # 4864 registers a warp (units of 256): three blocks of 4 warps
    assert resident_warps(32, 4, 0) == 64  # registers to spare: the 64-warp limit
    assert resident_warps(64, 8, 160 * 1024) == 8  # one 160 KB block fits the 228 KB of shared memory
    assert resident_warps(16, 1, 0) == 32  # one-warp blocks: the 32-block limit


def test_launch_specs_carry_the_alignment_triton_specialises_on():
    """Builds without it are other kernels (unvectorised loads, no pipelining): the spec must say which pointers
    and integers a GPU launch with these values would specialise as multiples of 16."""
    from fastmini.kernels import add_layer_norm as kernels

    launch_spec = _machinery().launch_spec
    rows, weight, stats = torch.zeros(130, 768, dtype=torch.bfloat16), torch.zeros(769), torch.zeros(130)
    arguments = {
        "x_ptr": rows, "residual_ptr": rows, "weight_ptr": weight[:768], "bias_ptr": weight[1:], "out_ptr": rows,
        "sum_ptr": rows, "mean_ptr": stats, "rstd_ptr": stats, "n_rows": 130, "hidden": 768, "eps": 1e-12,
        "dropout_p": 0.0, "seed": 7, "HAS_DROPOUT": False, "FOUR_PER_CALL": True, "STORE_SUM": False,
        "BLOCK_ROWS": 4, "BLOCK_H": 1024,
    }  # fmt: skip
    spec = launch_spec(kernels._add_layer_norm_forward_kernel.fn, (), arguments)
    assert spec["alignment"] == 16
    # the bias one fp32 element into its storage and 130 rows are no multiples of 16; the rest are
    expected = {"x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "sum_ptr", "mean_ptr", "rstd_ptr", "hidden"}
    assert set(spec["aligned"]) == expected
