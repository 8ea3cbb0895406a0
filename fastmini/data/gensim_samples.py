"""Finding the small data files that the PyPI package ``gensim`` ships in its test data
(DESIGN.md, "Defaults that work offline"): through the installed package, never a machine path."""

from __future__ import annotations

from pathlib import Path

from fastmini.data.corpus import DataError


def gensim_test_file(name: str, description: str) -> Path:
    """Path of ``gensim/test/test_data/<name>``, or one DataError saying what is missing."""
    try:
        import gensim
    except ImportError as error:
        raise DataError(f"the offline {description} needs gensim: pip install 'fastmini[demo]'") from error
    path = Path(gensim.__file__).parent / "test" / "test_data" / name
    if not path.is_file():
        raise DataError(f"gensim is installed but its {description} is missing: {path}")
    return path
