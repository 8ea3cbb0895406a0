"""Both trainers end to end in bf16: through CPU autocast here, and on CUDA where there is one.

The CPU runs check the bf16 plumbing (teacher cast, student autocast, losses in fp32, a loadable
fp32 model at the end); the ``gpu`` runs are the same commands with ``--device cuda``, once through torch's
ops and once through the Triton kernels (FASTMINI_BACKEND=triton), which CUDA will pick by itself once
their GPU tests pass: bf16 autocast training through them must work before that switch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fastmini.distill.__main__ import main as distill_main
from fastmini.distill.testing import make_tiny_teacher
from fastmini.finetune.__main__ import main as finetune_main
from fastmini.finetune.testing import make_tiny_model, write_task_data
from fastmini.models import FastMiniForMaskedLM, FastMiniForSequenceClassification
from fastmini.training.testing import run_module

ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# (device, FASTMINI_BACKEND): the kernels run on the CPU only through the Triton interpreter, far too slow for
# whole training runs, so the CPU runs torch's ops only.
RUNS = [
    pytest.param("cpu", "torch", id="cpu"),
    pytest.param("cuda", "torch", id="cuda-torch", marks=ON_GPU),
    pytest.param("cuda", "triton", id="cuda-triton", marks=ON_GPU),
]


QUERY = "fastmini.encoder.shared_layer.query"  # a GEMM of every recursion: bf16 out under bf16 autocast


def record_query_dtypes(monkeypatch, module, builder: str) -> set[torch.dtype]:
    """The dtypes the student's query projection gives while the trainer runs (``module.builder`` builds it)."""
    seen: set[torch.dtype] = set()
    build = getattr(module, builder)

    def spied(*arguments, **keywords):
        built = build(*arguments, **keywords)
        model = built[0] if isinstance(built, tuple) else built
        model.get_submodule(QUERY).register_forward_hook(lambda layer, inputs, output: seen.add(output.dtype))
        return built

    monkeypatch.setattr(module, builder, spied)
    return seen


def check_launches(launches: dict[str, int], backend: str) -> None:
    """Under "triton" every kernel ran (the student has adapters); under "torch" none did."""
    if backend == "triton":
        assert all(launches.values()), launches
    else:
        assert not any(launches.values()), launches


def _finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize("device, backend", RUNS)
def test_distillation_in_bf16(device, backend, tmp_path, monkeypatch, triton_launches):
    from fastmini.distill import models

    monkeypatch.setenv("FASTMINI_BACKEND", backend)
    seen = record_query_dtypes(monkeypatch, models, "build_student")
    teacher = make_tiny_teacher(tmp_path / "teacher")
    output = tmp_path / "student"
    argv = [
        "--teacher", str(teacher), "--data", str(teacher / "corpus.txt"), "--output-dir", str(output),
        "--window-length", "32", "--window-stride", "8", "--recursions", "2", "--embedding-size", "16",
        "--reduction-factor", "4", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1",
        "--eval-documents", "3", "--eval-windows", "8", "--no-progress", "--threads", "1",
        "--device", device, "--precision", "bf16",
    ]  # fmt: skip
    assert distill_main(argv) == 0
    check_launches(triton_launches, backend)
    assert torch.bfloat16 in seen  # the student trained under bf16 autocast (evaluation runs it in fp32)
    metrics = json.loads((output / "metrics.json").read_text())
    assert _finite_numbers(metrics)
    student = FastMiniForMaskedLM.from_pretrained(output)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.parametrize("device, backend", RUNS)
def test_fine_tuning_in_bf16(device, backend, tmp_path, monkeypatch, triton_launches):
    from fastmini.finetune import grid_run

    monkeypatch.setenv("FASTMINI_BACKEND", backend)
    seen = record_query_dtypes(monkeypatch, grid_run, "load_task_model")
    model = make_tiny_model(tmp_path / "model")
    data = write_task_data(tmp_path / "data", "classification")
    output = tmp_path / "run"
    argv = [
        "--model", str(model), "--data", str(data), "--output-dir", str(output), "--lr", "5e-3", "--seed", "1",
        "--epochs", "2", "--batch-size", "8", "--no-progress", "--threads", "1",
        "--device", device, "--precision", "bf16",
    ]  # fmt: skip
    assert finetune_main(argv) == 0
    check_launches(triton_launches, backend)
    assert seen == {torch.bfloat16}  # training and evaluation both under bf16 autocast
    metrics = json.loads((output / "metrics.json").read_text())
    assert _finite_numbers(metrics)
    best = next(Path(output).rglob("config.json")).parent
    classifier = FastMiniForSequenceClassification.from_pretrained(best)
    assert all(torch.isfinite(p).all() for p in classifier.parameters())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_subprocess_runs_get_the_backend_the_test_names(backend, tmp_path, monkeypatch):
    """run_module (the DDP and resume tests' launcher) passes its ``backend`` to the child as FASTMINI_BACKEND."""
    (tmp_path / "print_backend.py").write_text("import os\nprint(os.environ['FASTMINI_BACKEND'])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert run_module("print_backend", [], backend=backend).stdout == f"{backend}\n"
