"""csrc/ compiles here, without a GPU: a C++ syntax and type check of every source against the CUDA
driver header (from the ``nvidia-cuda-runtime-cu12`` wheel of the dev extra), pybind11 (torch's
bundled copy) and Python's headers. The GPU machine builds and links them for real on first use
(fastmini/runtime/extension.py); this catches what would otherwise fail only there."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "csrc").glob("*.cpp"))


def _cuda_include() -> Path | None:
    try:
        import nvidia.cuda_runtime
    except ImportError:
        return None
    for root in nvidia.cuda_runtime.__path__:
        if (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    return None


def test_csrc_has_sources():
    assert SOURCES, "csrc/ holds no .cpp file"


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_source_compiles(source):
    compiler = shutil.which("c++") or shutil.which("g++")
    cuda_include = _cuda_include()
    if compiler is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the nvidia-cuda-runtime-cu12 wheel (dev extra) for cuda.h")
    torch_include = Path(torch.utils.__file__).resolve().parent.parent / "include"
    command = [
        compiler, "-fsyntax-only", "-std=c++17", "-Wall", "-Werror",
        f"-I{cuda_include}", f"-I{torch_include}", f"-I{sysconfig.get_paths()['include']}", str(source),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
