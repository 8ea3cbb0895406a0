"""The offline English Wikipedia sample that the PyPI package ``gensim`` ships (DESIGN.md).

~6 MB of bz2 XML, 107 full articles; wiki markup is stripped with gensim's own stripper.
Found through the installed package, never through a machine path.
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Iterator
from pathlib import Path

from fastmini.data.gensim_samples import gensim_test_file

SAMPLE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def sample_path() -> Path:
    return gensim_test_file(SAMPLE_NAME, "Wikipedia sample")


def articles(path: Path | None = None) -> Iterator[tuple[str, str]]:
    """(title, plain text) of every article (namespace 0, redirects skipped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path or sample_path()) as stream:
        for title, markup, _ in extract_pages(stream, filter_namespaces=("0",)):
            text = filter_wiki(markup).strip()
            if text and not text.upper().startswith("#REDIRECT"):
                yield title, text


def sentences(limit: int | None = None, min_chars: int = 20, max_chars: int = 600) -> list[str]:
    """Plain-text sentences of the sample in order (a naive '. ' split, good enough for lengths)."""
    found: list[str] = []
    for _, text in articles():
        for paragraph in text.split("\n"):
            for piece in paragraph.split(". "):
                piece = piece.strip()
                if min_chars <= len(piece) <= max_chars:
                    found.append(piece if piece.endswith(".") else piece + ".")
                    if limit is not None and len(found) >= limit:
                        return found
    return found


_EMPHASIS = re.compile(r"'{2,}")  # ''italic'', '''bold''' quotes that filter_wiki leaves
_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.MULTILINE)  # == Heading == -> Heading
_TABLE_LEFTOVER = re.compile(r"^\s*[|!].*$", re.MULTILINE)  # table rows that survive as "| cell"
_BLANK_LINES = re.compile(r"\n{3,}")


def plain_text(text: str) -> str:
    """What ``articles`` yields, with the markup gensim's stripper leaves removed too:
    emphasis quotes, heading equals signs and table-row leftovers."""
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _TABLE_LEFTOVER.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def documents(path: Path | None = None) -> list[str]:
    """Every article of the sample as plain text, one string per article (the distiller's corpus)."""
    return [text for text in (plain_text(body) for _, body in articles(path)) if text]
