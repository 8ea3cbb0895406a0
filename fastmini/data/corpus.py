"""Documents to distil on: the offline Wikipedia sample, local files, or a ``datasets`` name.

Every source becomes a ``datasets.Dataset`` with one column, ``text``, one row per document
(windows are cut per document and at most k are kept per document, so "document" matters).
- ``DEFAULT_DATA``: the ~6 MB English Wikipedia sample that gensim ships, markup stripped.
- a local file, a directory (every supported file in it, sorted) or a glob pattern:
  .txt/.text (one document per line, per blank-line-separated paragraph, or per file),
  .json/.jsonl (objects with a text field; JSON lines or one JSON array), .csv/.tsv (a header
  row with a text column), .parquet (a text column).
- anything else is a ``datasets`` name (with an optional config and split): loaded with
  ``datasets.load_dataset``, so downloads and later tokenisation are cached by datasets.
Every failure is a DataError naming the file or dataset and what was wrong.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastmini.data.tables import DataError, csv_rows, json_records, read_text_file, split_lines
from fastmini.files import looks_like_local_path

DEFAULT_DATA = "gensim-wikipedia-sample"
TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
TEXT_UNITS = ("line", "paragraph", "file")
GLOB_CHARACTERS = "*?["  # a source holding one is a pattern of local files


def load_documents(
    source: str,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    text_unit: str = "line",
    cache_dir: str | None = None,
):
    """A ``datasets.Dataset`` with a single ``text`` column of non-empty documents."""
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text unit must be one of {TEXT_UNITS}, got '{text_unit}'")
    if source == DEFAULT_DATA:
        from fastmini.data import wikipedia

        try:
            return _as_dataset(wikipedia.documents(), f"the {DEFAULT_DATA}")
        except RuntimeError as error:  # gensim missing or its sample missing
            raise DataError(str(error)) from error
    paths = local_files(source)
    if paths is not None:
        texts: list[str] = []
        for path in paths:
            texts.extend(read_file(path, text_field=text_field, text_unit=text_unit))
        return _as_dataset(texts, source)
    return _load_named_dataset(source, dataset_config, split, text_field, cache_dir)


def looks_like_path(source: str) -> bool:
    """Whether ``source``, which names nothing on this machine, was meant as local data rather than a datasets
    name. The rule for model names (files.looks_like_local_path), widened because a corpus may be files: a glob
    pattern or a data file's suffix too ("corpus.txt" is a missing file, not a datasets name)."""
    return looks_like_local_path(source) or is_pattern(source) or Path(source).suffix.lower() in SUPPORTED_SUFFIXES


def is_pattern(text: str) -> bool:
    """Whether ``text`` (a source, or one component of it) is a glob pattern."""
    return any(ch in text for ch in GLOB_CHARACTERS)


def _hidden_name(name: str) -> bool:
    return name.startswith(".")


def _hidden(relative: Path) -> bool:
    """Whether a path below a corpus directory is in a hidden folder or is a hidden file: no corpus there
    (.ipynb_checkpoints/, .git/, editors' copies)."""
    return any(_hidden_name(part) for part in relative.parts)


def reads_below(source: str | None, directory: Path) -> bool:
    """Whether files written into ``directory`` could be read as part of the corpus ``source`` next time: it names a
    local directory (read whole, every file below it) that holds ``directory``, outside its hidden folders, or a
    glob pattern that reaches into ``directory`` (see _pattern_reaches)."""
    root = Path(source).expanduser() if source else None
    if root is None or root.is_file():
        return False
    if not root.is_dir():
        return is_pattern(source) and _pattern_reaches(root, directory)
    root, directory = root.resolve(), directory.expanduser().resolve()
    return (directory == root or root in directory.parents) and not _hidden(directory.relative_to(root))


def _pattern_reaches(pattern: Path, directory: Path) -> bool:
    """Whether the glob ``pattern`` (as local_files expands it: recursive ``**``, hidden names matched only by
    patterns that start with a dot) walks through ``directory``'s folders with components left over for what is
    inside it. Conservative: those components might not match the files a run writes (``*.parquet`` never
    matches its vocab.txt or log.jsonl); a run is then refused where it would have been harmless."""
    parts = pattern.parts
    first_magic = next((i for i, part in enumerate(parts) if is_pattern(part)), len(parts))
    root = Path(*parts[:first_magic]) if first_magic else Path()
    try:
        folders = directory.expanduser().resolve().relative_to(root.resolve()).parts
    except ValueError:  # not below the pattern's literal folder
        return False
    return _leaves_components(parts[first_magic:], folders)


def _leaves_components(pattern: Sequence[str], folders: Sequence[str]) -> bool:
    if not folders:
        return bool(pattern)
    if not pattern:
        return False
    head, folder = pattern[0], folders[0]
    if head == "**":  # none or any number of (visible) folders
        skip_folder = not _hidden_name(folder) and _leaves_components(pattern, folders[1:])
        return skip_folder or _leaves_components(pattern[1:], folders)
    if _hidden_name(folder) and not _hidden_name(head):  # glob: hidden names only for patterns with the dot
        return False
    return fnmatch.fnmatchcase(folder, head) and _leaves_components(pattern[1:], folders[1:])


def local_files(source: str) -> list[Path] | None:
    """The files ``source`` names on this machine, or None when it is not a local path (a datasets name)."""
    expanded = Path(source).expanduser()
    if expanded.is_file():
        return [expanded]
    if expanded.is_dir():
        files = sorted(
            p
            for p in expanded.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not _hidden(p.relative_to(expanded))
        )
        if not files:
            raise DataError(f"{source}: the directory holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    if is_pattern(source):
        matches, seen = [], set()
        # glob's ** follows symlinked folders: a link back up (a loop) matched every file once a level, ~40 times
        for match in sorted(Path(p) for p in glob.glob(str(expanded), recursive=True)):
            if match.is_file() and (real := match.resolve()) not in seen:
                seen.add(real)
                matches.append(match)
        if not matches:
            raise DataError(f"{source}: the pattern matches no files")
        return matches
    if looks_like_path(source):
        raise DataError(f"{source}: no such file or directory")
    return None


def read_file(path: Path, *, text_field: str = "text", text_unit: str = "line") -> list[str]:
    """The documents of one local file, by its suffix."""
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            return _read_text(path, text_unit)
        if suffix in JSON_SUFFIXES:
            return _read_json(path, text_field)
        if suffix in CSV_SUFFIXES:
            return _read_csv(path, text_field, delimiter="\t" if suffix == ".tsv" else ",")
        if suffix in PARQUET_SUFFIXES:
            return _read_parquet(path, text_field)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from error
    raise DataError(f"{path}: unsupported file type '{suffix}'; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def _read_text(path: Path, text_unit: str) -> list[str]:
    text = read_text_file(path, allow_empty=True)
    if text_unit == "file":
        pieces: Iterable[str] = [text]
    elif text_unit == "paragraph":  # paragraphs end at a blank line: nothing but whitespace (NBSP, U+3000 too)
        pieces = _paragraphs(split_lines(text))
    else:
        pieces = split_lines(text)
    return [piece.strip() for piece in pieces if piece.strip()]


def _paragraphs(lines: list[str]) -> list[str]:
    """The lines joined into paragraphs, cut at each blank line (as line mode, whitespace of any kind is blank)."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _field(record: dict, text_field: str, where: str) -> str:
    """The text of one JSON record (tables.json_records has checked it is an object)."""
    if text_field not in record:
        raise DataError(f"{where}: no '{text_field}' field (fields: {', '.join(map(str, record)) or 'none'})")
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{text_field}' holds {type(value).__name__}, expected text")
    return value or ""


def _read_json(path: Path, text_field: str) -> list[str]:
    _, records = json_records(path, read_text_file(path, allow_empty=True))
    texts = [_field(record, text_field, where) for where, record in records]
    return [text.strip() for text in texts if text.strip()]


def _read_csv(path: Path, text_field: str, delimiter: str) -> list[str]:
    """The text column of a CSV/TSV corpus, read as the fine-tuner reads tables (tables.csv_rows: TSV unquoted,
    strict quotes, no repeated column names, no row longer than the header)."""
    names, rows = csv_rows(path, read_text_file(path, allow_empty=True), delimiter)
    if names and text_field not in names:
        raise DataError(f"{path}: no '{text_field}' column (columns: {', '.join(names)})")
    texts = [row.get(text_field) or "" for _, row in rows]
    return [text.strip() for text in texts if text.strip()]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow
    import pyarrow.parquet as parquet

    try:
        schema = parquet.read_schema(path)
        if text_field not in schema.names:
            raise DataError(f"{path}: no '{text_field}' column (columns: {', '.join(schema.names)})")
        column = parquet.read_table(path, columns=[text_field]).column(text_field)
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    if not _holds_text(column.type):
        raise DataError(f"{path}: column '{text_field}' holds {column.type}, expected text")
    return [text.strip() for text in column.to_pylist() if text and text.strip()]


def _holds_text(kind) -> bool:
    """Strings in any of Arrow's layouts: plain, large, views, and dictionary-encoded (pandas' category columns)."""
    import pyarrow

    if pyarrow.types.is_dictionary(kind):
        kind = kind.value_type
    is_string_view = getattr(pyarrow.types, "is_string_view", None)  # pyarrow >= 16
    return (
        pyarrow.types.is_string(kind)
        or pyarrow.types.is_large_string(kind)
        or (is_string_view is not None and is_string_view(kind))
    )


def _as_dataset(texts: list[str], source: str):
    import datasets

    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise DataError(f"{source}: no text found (every document is empty)")
    return datasets.Dataset.from_dict({"text": texts})


def _load_named_dataset(name: str, config: str | None, split: str, text_field: str, cache_dir: str | None):
    import datasets

    from fastmini.training.cli import use_cache_if_hub_unreachable

    use_cache_if_hub_unreachable()
    try:
        dataset = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as error:  # datasets raises many kinds (offline, not found, bad config, bad split)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"'{name}' is not a local file or directory, and datasets could not load it "
            f"(config {config!r}, split '{split}'): {first_line}"
        ) from error
    if text_field not in dataset.column_names:
        raise DataError(f"dataset '{name}': no '{text_field}' column (columns: {', '.join(dataset.column_names)})")
    dataset = dataset.select_columns([text_field])
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    dataset = dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(dataset) == 0:
        raise DataError(f"dataset '{name}' (split '{split}'): no text found (every document is empty)")
    return dataset
