"""``torchrun --nproc_per_node=2 -m fastmini.distill`` on CPU (gloo): same global batch semantics.

Two processes with one micro-batch each must follow the loss trajectory of one process that
accumulates the same two micro-batches (dropout off, so only summation order differs), log from
rank 0 only, and resume exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmini.distill.testing import make_tiny_teacher
from fastmini.training import checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def run(teacher: Path, output: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    args = [
        "-m", "fastmini.distill", "--teacher", str(teacher), "--data", str(teacher / "corpus.txt"),
        "--output-dir", str(output), "--window-length", "32", "--window-stride", "8", "--recursions", "2",
        "--embedding-size", "16", "--reduction-factor", "4", "--batch-size", "8", "--max-steps", "4",
        "--warmup-steps", "1", "--eval-documents", "2", "--eval-windows", "4", "--dropout", "0", "--lr", "2e-3",
        "--no-progress", "--threads", "1", "--log-every", "1", "--save-every", "2", "--keep-last", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "FASTMINI_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    # A session of its own, so that a hang kills torchrun's workers too, not only torchrun.
    process = subprocess.Popen(
        [*launcher, *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_two_processes_match_one_process_with_the_same_global_batch(teacher_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(teacher_dir, one, 1, "--grad-accumulation", "2")
    result = run(teacher_dir, two, 2)
    assert result.stderr.count("held-out after") == 1  # rank 0 speaks, rank 1 does not
    single, double = train_records(one), train_records(two)
    assert [r["step"] for r in double] == [1, 2, 3, 4]  # one log line per step: rank 0 writes alone
    for a, b in zip(single, double, strict=True):
        for term in ("loss", "mlm", "attention", "hidden", "output", "grad_norm"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-7), (a["step"], term)
    assert single[-1]["loss"] != single[0]["loss"]
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-6, msg=name)

    # The checkpoint holds both processes' RNG states; resuming under torchrun ends where the run ended.
    state = checkpoints.load_state(two / "checkpoints" / "step-00000002" / "trainer_state.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    (two / "model.safetensors").unlink()
    run(teacher_dir, two, 2, "--resume", str(two / "checkpoints" / "step-00000002"))
    resumed = load_file(str(two / "model.safetensors"))
    assert all(torch.equal(resumed[name], weights_two[name]) for name in weights_two)
