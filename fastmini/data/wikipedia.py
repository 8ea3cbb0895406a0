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
# [ \t], not \s: a \s* runs across the blank lines around a heading and glues the next heading on.
_HEADING = re.compile(r"^[ \t]*=+[ \t]*(.*?)[ \t]*=+[ \t]*$", re.MULTILINE)  # == Heading == -> Heading
_TABLE_LEFTOVER = re.compile(r"^[ \t]*[|!].*$", re.MULTILINE)  # table rows that survive as "| cell"
# Image markup that survives too: gallery lines "File:x.jpg|Caption" (the caption stays), "alt=..." image
# descriptions (to the end of their line), size and placement options ("|thumb", "30px", "|217x217px")
# and magic words ("__TOC__").
_IMAGE_FILE = re.compile(
    r"^(?:File|Image)(?::[^|\n]*)?(?:\||$)|^[^|\n]*\.(?:jpe?g|png|gif|svg|tiff?|ogv|ogg|webm)\|", re.I | re.MULTILINE
)
_IMAGE_ALT = re.compile(r"\|?\balt=.*$", re.MULTILINE)
_IMAGE_OPTION = re.compile(r"[ \t]*\|?\b(?:\d+x)?\d+px\b|\|(?:thumb|thumbnail|upright|frameless|left|right|center)\b")
# A size glued to the caption after it ("|299x299pxAlbanian art"): \b above cannot end there. A space stays.
_IMAGE_SIZE_BEFORE_CAPTION = re.compile(r"[ \t]*\|?\b(?:\d+x)?\d+px(?=[A-Z])")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_BLANK_LINES = re.compile(r"\n{3,}")


def plain_text(text: str) -> str:
    """What ``articles`` yields, with the markup gensim's stripper leaves removed too:
    emphasis quotes, heading equals signs, table-row leftovers and image markup."""
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _IMAGE_SIZE_BEFORE_CAPTION.sub(" ", text)
    for leftover in (_TABLE_LEFTOVER, _IMAGE_FILE, _IMAGE_ALT, _IMAGE_OPTION, _MAGIC_WORD):
        text = leftover.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def documents(path: Path | None = None) -> list[str]:
    """Every article of the sample as plain text, one string per article (the distiller's corpus)."""
    return [text for text in (plain_text(body) for _, body in articles(path)) if text]
