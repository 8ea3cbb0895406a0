"""Find and build fastmini's C++ sources (csrc/ at the repository root) on first use.

csrc/ is not inside the ``fastmini`` package, so it exists only in a source checkout (an editable
install, ``pip install -e .``); ``FASTMINI_CSRC_DIR`` points elsewhere. The build goes through
``torch.utils.cpp_extension.load`` (ninja + a C++ compiler; cached under TORCH_EXTENSIONS_DIR or
torch's default, under a name that carries a hash of the source and flags: another source, even one with an
older file time, or another checkout's, builds apart). The first build holds a lock that the OS releases when
its process dies, so a build killed half-way (torchrun's SIGTERM) does not leave later ones waiting forever on
torch's own lock file. Nothing here runs at import: importing torch.utils.cpp_extension alone takes a while and
probes for compilers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

CSRC_ENV_VAR = "FASTMINI_CSRC_DIR"
L2_SOURCE = "l2_persistence.cpp"


def csrc_directory(source: str = L2_SOURCE) -> Path:
    """The directory holding ``source``: $FASTMINI_CSRC_DIR, else <checkout>/csrc next to the package."""
    override = os.environ.get(CSRC_ENV_VAR)
    directory = Path(override) if override else Path(__file__).resolve().parents[2] / "csrc"
    if not (directory / source).is_file():
        where = f"${CSRC_ENV_VAR}={override}" if override else "the repository's csrc/ next to the fastmini package"
        raise RuntimeError(
            f"fastmini: C++ source {source} not found in {directory} ({where}). The CUDA runtime helpers are "
            f"built from a source checkout: install fastmini with `pip install -e .`, or set {CSRC_ENV_VAR}"
        )
    return directory


def require_cuda(feature: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"fastmini: {feature} needs a CUDA device; torch sees none on this machine")


# Where the toolkit usually is when torch's guess misses it: torch derives CUDA_HOME from `which nvcc`, and
# an nvcc that is a wrapper script in /usr/local/bin (as on this project's machines) gives /usr/local.
FALLBACK_CUDA_HOMES = ("/usr/local/cuda",)


def _driver_flags(cuda_home: str | None) -> tuple[list[str], list[str]]:
    """Include path for cuda.h and link flags for libcuda (the driver; the toolkit's stub at link
    time, the system's libcuda.so.1 at run time). ``cuda_home`` is torch's guess; the first of it and
    FALLBACK_CUDA_HOMES that holds include/cuda.h is used."""
    candidates = [Path(home) for home in (cuda_home, *FALLBACK_CUDA_HOMES) if home]
    home = next((candidate for candidate in candidates if (candidate / "include" / "cuda.h").is_file()), None)
    if home is None:
        tried = ", ".join(str(candidate / "include" / "cuda.h") for candidate in candidates) or "nothing"
        raise RuntimeError(
            "fastmini: building the L2-persistence extension needs the CUDA toolkit's headers (cuda.h), not "
            f"found (tried {tried}); set CUDA_HOME to the toolkit (the directory holding include/cuda.h)"
        )
    stubs = [home / sub / "stubs" for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")]
    ldflags = [f"-L{path}" for path in stubs if (path / "libcuda.so").is_file()]
    return [str(home / "include")], [*ldflags, "-lcuda"]


@functools.cache
def load_l2_extension(verbose: bool = False) -> ModuleType:
    """The compiled ``fastmini_l2_persistence`` module, built on first call (seconds: no torch headers)."""
    require_cuda("L2 persistence")
    source = csrc_directory(L2_SOURCE) / L2_SOURCE
    from torch.utils import cpp_extension  # deferred: slow to import, probes compilers

    includes, ldflags = _driver_flags(cpp_extension.CUDA_HOME)
    cflags = ["-O2"]
    name = build_name("fastmini_l2_persistence", source, cflags, includes, ldflags)
    build_directory = Path(cpp_extension._get_build_directory(name, verbose))
    try:
        with _exclusive_build(build_directory):
            return cpp_extension.load(
                name=name,
                sources=[str(source)],
                extra_cflags=cflags,
                extra_include_paths=includes,
                extra_ldflags=ldflags,
                build_directory=str(build_directory),
                with_cuda=False,  # we link the driver ourselves; no libcudart, no nvcc needed
                verbose=verbose,
            )
    except Exception as error:  # compiler, ninja or linker missing or failing
        raise RuntimeError(f"fastmini: building the L2-persistence extension from {source} failed: {error}") from error


def build_name(stem: str, source: Path, *flags: list[str]) -> str:
    """``stem`` and a hash of the source's bytes and the build flags: torch decides to rebuild across processes
    by file times alone (ninja), so a changed source with an older time, or another checkout's, would load the
    cached build of another source under one fixed name."""
    digest = hashlib.sha256(source.read_bytes() + repr(flags).encode()).hexdigest()[:12]
    return f"{stem}_{digest}"


@contextlib.contextmanager
def _exclusive_build(build_directory: Path) -> Iterator[None]:
    """One builder at a time under an flock the OS releases when its holder dies. torch's own lock is a file
    made with O_EXCL and removed in a `finally`: a builder killed by a signal leaves it, and every later first
    use waits on it silently; held here, no live builder can own a leftover one, so it goes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory.parent / f"{build_directory.name}.fastmini-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
