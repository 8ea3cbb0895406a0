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
