"""Reading data files safely: UTF-8 text, lines, CSV/TSV rows and JSON records, each failure one DataError.

The low-level readers every data source shares (distillation corpora, fine-tuning tables, NER records,
prediction inputs), so that a file means the same to each of them.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from itertools import zip_longest
from pathlib import Path
from typing import Any

from fastmini.training.errors import UsageError


class DataError(UsageError):
    """Data that cannot be read or holds no text; the message names the source."""


def read_text_file(path: Path, allow_empty: bool = False) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped), or one DataError saying why not."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not allow_empty and not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, cut at "\\n" only (a trailing "\\r" dropped), no empty piece after a final newline.

    Not ``str.splitlines``: it also cuts at U+2028, U+0085, form feeds and other characters that are text inside
    a JSON string or a sentence, which would break a valid JSON line or shift every later line number."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def allow_long_csv_fields() -> None:
    """Lift the csv module's default limit of 131072 characters per field (process-wide): a document may be a
    whole article, a fine-tuning example a long review, and csv would call either malformed."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(max(limit, csv.field_size_limit()))
            return
        except OverflowError:  # a C long narrower than sys.maxsize (Windows)
            limit //= 2


def csv_rows(
    path: Path, text: str, delimiter: str, keep_empty_rows: bool = False
) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """(header names, [(where, {name: cell})]); a short row's missing cells are None. Rows of empty cells and
    blank lines are skipped, or with ``keep_empty_rows`` kept as rows of empty cells (in a one-column file a
    blank line is an empty cell)."""
    allow_long_csv_fields()
    # TSV (GLUE's files among them) is not quoted: a sentence that starts with a quote mark is text, not a
    # quoted field that would swallow the tabs and lines up to the next quote mark.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # newline="": the csv module finds the line ends itself (only \n, \r\n and \r, and never inside quotes).
    # strict: an unclosed quote is an error, not a field that swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    kind = "TSV" if delimiter == "\t" else "CSV"
    rows = []
    try:
        names = next(reader, [])
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DataError(f"{path}: the header names column(s) {', '.join(map(repr, repeated))} more than once")
        for cells in reader:
            if len(cells) > len(names):
                raise DataError(f"{path}, line {reader.line_num}: {len(cells)} cells, the header has {len(names)}")
            if not any(cells):
                if not keep_empty_rows:
                    continue
                cells = [""] * len(names)  # a blank line is one row of empty cells, not a row of missing ones
            row = dict(zip_longest(names, cells))
            rows.append((f"{path}, line {reader.line_num}", row))
    except csv.Error as error:
        raise DataError(f"{path}: malformed {kind} at line {reader.line_num}: {error}") from error
    return names, rows


class _RepeatedKey(ValueError):
    """A JSON object naming one key twice (json.loads would keep the last value silently)."""


def _object_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def _loads(text: str, where: str) -> Any:
    """json.loads, refusing an object that names a key twice (as a CSV header naming a column twice is refused)."""
    try:
        return json.loads(text, object_pairs_hook=_object_of)
    except _RepeatedKey as error:
        raise DataError(f"{where}: an object names the key {error.args[0]!r} twice") from None


def json_records(path: Path, text: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """(the first record's field names, [(where, record)]) of a JSON array of objects or of JSON lines."""
    if text.lstrip().startswith("["):
        try:
            records = _loads(text, str(path))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error
        rows = [(f"{path}, item {index}", record) for index, record in enumerate(records)]
    else:
        rows = []
        for number, line in enumerate(split_lines(text), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}, line {number}", _loads(line, f"{path}, line {number}")))
            except json.JSONDecodeError as error:
                if not rows and _one_json_value(text):
                    raise DataError(
                        f"{path}: one JSON value over several lines; expected JSON lines (one object a line) or a "
                        "JSON array of objects"
                    ) from error
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    for where, record in rows:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return (list(rows[0][1]) if rows else []), rows


def _one_json_value(text: str) -> bool:
    """Whether ``text`` as a whole is one JSON value (a pretty-printed object, say)."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
