"""Shared tiny configurations (transformers' tester sizes: vocab 99, hidden 36, seq 7).

Helpers are fixtures (factories) because tests run with --import-mode=importlib and cannot
import each other or this file.
"""

from __future__ import annotations

import os
import traceback

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be on before any kernel
# module is imported (they are imported lazily, when a Triton backend is first chosen).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastmini  # noqa: E402, F401  (registers the Auto classes)
from fastmini import FastMiniConfig  # noqa: E402
from fastmini.baselines.original import original_config  # noqa: E402

TINY = dict(
    vocab_size=99,
    embedding_size=16,
    hidden_size=36,
    num_attention_heads=6,
    intermediate_size=37,
    num_hidden_layers=3,
    max_position_embeddings=64,
)


@pytest.fixture(autouse=True)
def torch_backend_by_default(monkeypatch):
    """Model tests exercise the torch reference path; kernel tests name their backend explicitly
    (and model-through-kernels tests set FASTMINI_BACKEND themselves)."""
    monkeypatch.setenv("FASTMINI_BACKEND", "torch")


@pytest.fixture(autouse=True)
def keep_threads():
    """The trainers' --threads sets torch's thread count for the process: give it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere so parity tests see real signal: N(0, std) for embeddings, dense
    weights and biases; LayerNorm gains 1 + N(0, 0.1) and biases N(0, 0.1).

    LayerNorm gains must stay near 1: drawn around 0 (as plain N(0, 0.3) did) every recursion shrinks
    the per-token part of the hidden states towards a shared bias, and after three recursions all
    tokens looked alike (spread ~1e-4), so a model that ignored its inputs passed the parity tests.
    """
    generator = torch.Generator().manual_seed(seed)
    done = set()  # a tied parameter (decoder = word embeddings) is drawn once
    with torch.no_grad():
        for submodule in module.modules():
            for name, parameter in submodule.named_parameters(recurse=False):
                if id(parameter) in done:
                    continue
                done.add(id(parameter))
                noise = torch.randn(parameter.shape, generator=generator)
                if isinstance(submodule, torch.nn.LayerNorm):
                    parameter.copy_(noise * 0.1 + (1.0 if name == "weight" else 0.0))
                else:
                    parameter.copy_(noise * std)
    return module


@pytest.fixture
def tiny_config():
    """Factory: a tiny FastMiniConfig (r=4 so the adapter is 36 -> 9 -> 36)."""
    return lambda **overrides: FastMiniConfig(**{**TINY, "reduction_factor": 4, **overrides})


@pytest.fixture
def tiny_original_config():
    """Factory: a tiny ALBERT config with MiniALBERT's extras, as the original checkpoints carry."""
    return lambda **overrides: original_config(**{**TINY, "reduction_factor": 4, "hidden_act": "gelu", **overrides})


@pytest.fixture
def randomize():
    return _randomize


KERNEL_OPS = ("add_layer_norm", "linear_gelu", "adapter_bottleneck")


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts, per op, the calls of each Triton kernel's forward host launcher
    (``fastmini.kernels.<op>.<op>_forward``, which the op's Triton backend looks up when it runs), so that
    a test that runs a model "through the kernels" can check that they ran and how often. Backward
    launchers are not counted: activation checkpointing's recomputation shows as extra forward calls."""
    import importlib

    counts = dict.fromkeys(KERNEL_OPS, 0)

    def counting(op, launch):
        def launch_and_count(*args, **kwargs):
            counts[op] += 1
            return launch(*args, **kwargs)

        return launch_and_count

    for op in KERNEL_OPS:
        module = importlib.import_module(f"fastmini.kernels.{op}")
        monkeypatch.setattr(module, f"{op}_forward", counting(op, getattr(module, f"{op}_forward")))
    return counts


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's values on the host: on a GPU each waits for all queued work
    (``item``/``int()``/``bool()``, ``nonzero``, boolean indexing, ``masked_select``, ``unique``, ...). Code
    that takes the same path on the CPU as on a GPU dispatches the same ops, so a CPU test shows what a GPU
    run would wait on. Not seen: ``tolist()`` and copies to the host (no aten op on CPU tensors), reads
    inside composite ops (``allclose``), and CPU-only branches are reported like any other code."""

    ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave", "bincount", "histc"}  # fmt: skip
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # only with boolean indices

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, str]] = []  # (op, "file:line" of the innermost caller outside torch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.ALWAYS or (name in self.INDEXING and self._boolean_index(args)):
            if not (name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None):
                self.ops.append((name, self._caller()))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller() -> str:
        frame = [f for f in traceback.extract_stack() if f"{os.sep}torch{os.sep}" not in f.filename][-3]
        # [-1] is _caller itself, [-2] __torch_dispatch__
        return f"{frame.filename}:{frame.lineno}"

    @staticmethod
    def _boolean_index(args) -> bool:
        indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


@pytest.fixture
def host_reads():
    """``with host_reads() as reads: ...`` then ``reads.ops``: see HostReads."""
    return HostReads


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 7 tokens, the second padded after 4, with both token types."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 7), generator=generator)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 0
    token_type_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@pytest.fixture
def gone():
    """``gone(pid)``: whether that process has ended within a few seconds (killed and not yet reaped by init, a
    zombie, counts as ended): for tests that a runner leaves nothing behind."""
    import time
    from pathlib import Path

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    def wait_until_gone(pid: int, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not alive(pid)

    return wait_until_gone
