"""`import fastmini` on a CPU-only machine: no GPU probing, no kernels, no compiler toolchain, no optional extra."""

from __future__ import annotations

import subprocess
import sys

IMPORTS = "import fastmini, fastmini.ops, fastmini.models"
PROBE = f"""
import sys, torch
{IMPORTS}
print(torch.cuda.is_initialized(), "fastmini.kernels" in sys.modules, "torch.utils.cpp_extension" in sys.modules,
      "kernels" in sys.modules)
"""


def test_import_touches_nothing_device_specific(tmp_path):
    # run from a directory outside the checkout, as a user of the installed package would
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.split() == ["False", "False", "False", "False"]


# The demo and bench extras (pyproject.toml): a plain install lacks them, so importing fastmini must not need
# them, and they are slow to import where present.
OPTIONAL_EXTRAS = ("datasets", "gensim", "onnx", "onnxruntime")


def test_import_pulls_in_no_optional_extra(tmp_path):
    code = f"import sys\n{IMPORTS}\nprint([name for name in {OPTIONAL_EXTRAS!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "[]"


def test_importing_from_the_checkout_root_is_harmless():
    """From the repo root, transformers' probe for Hugging Face's `kernels` package sees our
    top-level kernels/ folder; it must be a bare docstring package that the probe rejects."""
    code = (
        "import fastmini, kernels, transformers.utils.import_utils as u;"
        "print(u.is_kernels_available(), [n for n in vars(kernels) if not n.startswith('__')])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False []"


def test_kernels_package_installs_as_fastmini_kernels(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import fastmini.kernels as k; print(k.__doc__.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert result.stdout.strip() == "Triton"
