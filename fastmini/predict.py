"""``python -m fastmini.predict --model DIR --input FILE``: label new text with a fine-tuned model.

The model is a directory written by ``python -m fastmini.finetune`` (or any fastmini / MiniALBERT
/ ALBERT sequence- or token-classification checkpoint with its tokenizer); what it predicts
(classes, a number, several labels, BIO tags) is read from its config. Input:
- ``.txt`` (or ``-`` for stdin): one text per line; for a tagger, words separated by spaces (a ``.txt`` whose
  first line of text has a tab, or is a word and a tag such as ``B-PER`` or ``O``, is the two-column training
  format, as the fine-tuner reads it);
- ``.jsonl`` / ``.json``: objects with ``--text-column`` (and ``--text-pair-column`` for pairs);
  for a tagger, ``--tokens-column`` (a list of words) or the text column;
- ``.csv`` / ``.tsv``: a header row naming those columns; for a tagger, ``.tsv`` / ``.conll``
  files in the two-column training format (the tags are ignored, and may be left out: one token
  per line).
Output: one JSON object per input, in input order (``--output FILE`` or stdout), its ``index``
the input's position: of its line in a text file (so that ``paste`` lines them up), of its
record in a JSON / CSV file (header not counted), of its sentence in a two-column file. An
empty line or row still gets its record: ``"prediction": null`` (a tagger: no tokens, no tags). An input
longer than ``--max-length`` tokens is predicted from its start (a tagger's last words are tagged O unread): its
record says ``"truncated": true``, and one warning counts them.
``--output`` is written to a temporary file beside it and renamed at the end: a run that fails
leaves an existing file as it was. Examples are
batched by length and run through the model's unpadded fast path in inference mode, bf16 on a
GPU. The same directory also works in ``transformers.pipeline("text-classification" |
"token-classification", model=DIR)`` after ``import fastmini``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from fastmini.training.checkpoints import METRICS_NAME, TRAIN_CONFIG_NAME
from fastmini.training.cli import quiet_libraries, run_cli, setup_logger
from fastmini.training.errors import UsageError
from fastmini.training.precision import PRECISIONS, WEIGHTS_DTYPE, autocast_dtype

CHUNK = 4096  # examples tokenised and predicted at a time, so that a large file streams
NER_FILE_SUFFIXES = (".tsv", ".conll", ".iob", ".bio")
# Inputs that are not text (any other suffix is read as text lines): compressed files and parquet
UNREADABLE_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".parquet")

log = logging.getLogger("fastmini.predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmini.predict",
        description="Label a text file or a JSONL/CSV batch with a fine-tuned fastmini model, batch-wise.",
        epilog="Writes one JSON object per input line (per record of a JSON/CSV file; a tagger: per sentence of a "
        "two-column file), with its index: the prediction (label and probability, a number, or labels; null for "
        'an empty line), or a tagger\'s tokens, tags and entities (empty for an empty line); "truncated": true '
        "where an input was longer than --max-length (a tagger's words past it are tagged O unread).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a fine-tuned model directory (with tokenizer)")
    parser.add_argument("--input", required=True, metavar="FILE", help="a .txt/.jsonl/.json/.csv/.tsv file, or -")
    parser.add_argument("--output", metavar="FILE", help="where to write the JSON lines (default: stdout)")
    parser.add_argument("--text-column", default="text", metavar="NAME", help="text column (default: text)")
    parser.add_argument("--text-pair-column", metavar="NAME", help="second text of a pair (default: none)")
    parser.add_argument(
        "--tokens-column",
        default="tokens",
        metavar="NAME",
        help="taggers, JSON input: a list of words (default: tokens; else the text column is split)",
    )
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="examples per batch (default: 64)")
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="tokens per example, longer ones are cut (default: the length the model was fine-tuned with, which "
        "python -m fastmini.finetune records in it; for a model from elsewhere, the model's positions)",
    )
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="'auto', 'cpu', 'cuda' (default: auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="'auto': bf16 on GPU, fp32 on CPU (default: auto)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for torch, >= 1 (default: torch's choice)"
    )
    return parser


class Predictor:
    """A fine-tuned model, its tokenizer and what its outputs mean."""

    def __init__(self, directory: str, device: str = "auto", precision: str = "auto"):
        from transformers import AutoTokenizer

        from fastmini.data.ner import TAG_PATTERN
        from fastmini.finetune.models import MAX_LENGTH_FIELD, TEXT_PAIR_FIELD, read_model_config
        from fastmini.finetune.tasks import GENERIC_TASKS, LabelMap
        from fastmini.models import (
            CheckpointError,
            FastMiniForSequenceClassification,
            FastMiniForTokenClassification,
        )
        from fastmini.training.distributed import resolve_device

        self.device = resolve_device(device)  # a bad --device is reported at once, not after loading the model
        path = Path(directory).expanduser()
        saved_config = read_model_config(path, directory)
        architectures = saved_config.get("architectures") or []
        # The second text column the model was fine-tuned with (None: single texts); older models: train_config.json.
        self.text_pair_column = saved_config.get(
            TEXT_PAIR_FIELD, _training_record(path, TRAIN_CONFIG_NAME, "text_pair_column")
        )
        # The tokens per example it was fine-tuned with (older models: metrics.json), so that a long text is cut
        # where the fine-tuning cut it; a model from elsewhere records none.
        recorded_max_length = saved_config.get(MAX_LENGTH_FIELD, _training_record(path, METRICS_NAME, "max_length"))
        if any(name.endswith("ForTokenClassification") for name in architectures):
            model_class = FastMiniForTokenClassification
        elif any(name.endswith("ForSequenceClassification") for name in architectures):
            model_class = FastMiniForSequenceClassification
        else:
            raise UsageError(
                f"--model {directory}: a {', '.join(architectures) or 'model without architectures'}, not a fine-tuned "
                "classifier or tagger (fine-tune it with python -m fastmini.finetune first)"
            )
        try:
            self.model = model_class.from_pretrained(path, dtype=WEIGHTS_DTYPE)
        except CheckpointError as error:
            raise UsageError(f"--model {directory}: {error}") from error
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as error:
            first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise UsageError(
                f"--model {directory}: no usable tokenizer in the directory (tokenizer files missing? {first_line})"
            ) from error
        config = self.model.config
        self.default_max_length = _usable_max_length(recorded_max_length, config.max_position_embeddings)
        self.truncated_sentences = 0  # inputs longer than the tokens it reads (a tagger's last words: "O")
        if model_class is FastMiniForTokenClassification:
            kind = "ner"
        elif config.problem_type == "regression" or config.num_labels == 1:
            kind = "regression"
        elif config.problem_type == "multi_label_classification":
            kind = "multilabel"
        else:
            kind = "classification"
        self.spec = GENERIC_TASKS[kind]
        names = None if kind == "regression" else [config.id2label[i] for i in range(config.num_labels)]
        self.labels = LabelMap(self.spec, names)
        # Entities are read off BIO tags; a tagger from elsewhere may have other labels ("PER", "LABEL_3").
        self.bio_tags = kind == "ner" and all(TAG_PATTERN.match(name) for name in names)
        if kind == "ner" and not self.bio_tags:
            log.warning(
                "--model %s: the tagger's labels (%s) are not BIO tags (O, B-TYPE, I-TYPE): each record has its "
                "tags, and entities null",
                directory,
                ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""),
            )
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.model.to(self.device).eval().optimize_for_inference()

    def predict(self, examples: list[dict[str, Any]], batch_size: int, max_length: int | None) -> list[dict[str, Any]]:
        """One record per example, in order; an empty example (a blank line) gets a record without a prediction."""
        from fastmini.data.labelled import without_text

        filled = [example for example in examples if not without_text(example)]
        predicted = iter(self._predict(filled, batch_size, max_length) if filled else [])
        return [self._empty_record(example) if without_text(example) else next(predicted) for example in examples]

    def _empty_record(self, example: dict[str, Any]) -> dict[str, Any]:
        if self.spec.kind == "ner":
            return {"tokens": example["tokens"], "tags": [], "entities": [] if self.bio_tags else None}
        pair = {"text_pair": example["text_pair"]} if example["text_pair"] is not None else {}
        return {"text": example["text"], **pair, "prediction": None}

    def _predict(self, examples: list[dict[str, Any]], batch_size: int, max_length: int | None) -> list[dict[str, Any]]:
        from fastmini.finetune import inference
        from fastmini.finetune.data import encode
        from fastmini.finetune.metrics import entities

        max_length = max_length or self.default_max_length
        encoded = encode(self.tokenizer, examples, self.spec.kind, max_length)
        logits = inference.predict_logits(self.model, encoded, batch_size, self.device, self.autocast_dtype)
        predictions = inference.decode(self.spec.kind, logits, encoded, self.labels.index.get("O", 0))
        records = []
        self.truncated_sentences += encoded.cut
        for index, (example, prediction, row) in enumerate(zip(examples, predictions, logits, strict=True)):
            record = inference.readable(self.spec, self.labels, prediction, row)
            truncated = {"truncated": True} if index in encoded.cut_rows else {}  # see Encoded.cut_rows
            if self.spec.kind == "ner":
                tokens, tags = example["tokens"], record["prediction"]
                record = {
                    "tokens": tokens,
                    "tags": tags,
                    "entities": [
                        {"type": kind, "start": first, "end": last + 1, "text": " ".join(tokens[first : last + 1])}
                        for kind, first, last in entities(tags)
                    ]
                    if self.bio_tags
                    else None,
                    **truncated,
                }
            else:
                record = {
                    "text": example["text"],
                    **({"text_pair": example["text_pair"]} if example["text_pair"] is not None else {}),
                    **record,
                    **truncated,
                }
            records.append(record)
        return records


def read_inputs(source: str, kind: str, text_column: str, pair_column: str | None, tokens_column: str):
    """The examples of an input file (see the module docstring), in order, one per line / record / sentence."""
    from fastmini.data.corpus import DataError, read_text_file
    from fastmini.data.labelled import Columns, read_labelled_file
    from fastmini.data.ner import read_ner_file
    from fastmini.data.tables import split_lines

    if source == "-":
        examples = _from_lines(split_lines(_read_stdin()), "stdin", kind, pair_column)
        return _refuse_all_empty(examples, "stdin")
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"--input {source}: a directory; give one file (or - for standard input)")
    if not path.is_file():
        raise DataError(f"--input {source}: no such file")
    suffix = path.suffix.lower()
    if suffix in UNREADABLE_SUFFIXES:
        raise DataError(
            f"--input {source}: unsupported file type '{suffix}' (expected text: .txt, .jsonl, .json, .csv, .tsv, "
            "or a two-column NER file; decompress it first)"
        )
    if kind == "ner" and (suffix in NER_FILE_SUFFIXES or (suffix == ".txt" and _token_tag_columns(path))):
        return [{"tokens": s["tokens"], "where": s["where"]} for s in read_ner_file(path, tags_required=False)]
    if kind == "ner" and suffix in (".json", ".jsonl"):
        return _tagger_json(path, text_column, tokens_column)
    if suffix in (".csv", ".tsv", ".json", ".jsonl"):
        columns = Columns(text_column, pair_column, None)
        examples = read_labelled_file(path, columns, labels_required=False, keep_empty_rows=True)
        if kind == "ner":
            examples = [{"tokens": e["text"].split(), "where": e["where"]} for e in examples]
        return _refuse_all_empty(examples, str(path))
    lines = split_lines(read_text_file(path, allow_empty=True))
    return _refuse_all_empty(_from_lines(lines, str(path), kind, pair_column), str(path))


_TAG_OF_A_TAG_FILE = re.compile(r"O|[BIES]-\S+")  # a tag as a second word: "Plan B" stays a sentence


def _token_tag_columns(path: Path) -> bool:
    """Whether a .txt file is a tagger's 'token tag' file (the fine-tuner's .txt format, read as it reads it), not one
    sentence per line: its first line of text (past -DOCSTART-) has a tab, or is two words whose second is a tag
    (B-X, I-X, O; a sentence of two such words is read as a tag file, whose reader then names its first line that
    is not 'token tag'). Reads up to that line only: the file's reader reads it all afterwards (and names an
    encoding problem: undecodable bytes are replaced here)."""
    from fastmini.data.ner import DOCUMENT_START

    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if not fields or fields == [DOCUMENT_START] or fields[0] == DOCUMENT_START:
                continue
            return "\t" in line.strip() or (len(fields) == 2 and _TAG_OF_A_TAG_FILE.fullmatch(fields[1]) is not None)
    return False


def _read_stdin() -> str:
    """Standard input as UTF-8 text (a BOM dropped), or one DataError, as files are read."""
    from fastmini.data.corpus import DataError

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes underneath (tests, notebooks)
        return sys.stdin.read()
    data = stream.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"stdin: not UTF-8 text ({error.reason} at byte {error.start})") from error
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as files are read


def _from_lines(lines: list[str], where: str, kind: str, pair_column: str | None) -> list[dict[str, Any]]:
    """One example per line, blank lines included (as empty examples): the output's index is the line's."""
    from fastmini.data.corpus import DataError

    if pair_column is not None:
        raise DataError(f"{where}: sentence pairs need a .jsonl/.json/.csv/.tsv input with named columns")
    examples = []
    for number, line in enumerate(lines, start=1):
        if kind == "ner":
            examples.append({"tokens": line.split(), "where": f"{where}, line {number}"})
        else:
            examples.append({"text": line.strip(), "text_pair": None, "where": f"{where}, line {number}"})
    return examples


def _refuse_all_empty(examples: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    from fastmini.data.corpus import DataError
    from fastmini.data.labelled import without_text

    if all(without_text(example) for example in examples):
        raise DataError(f"{where}: no text (the input is empty)")
    return examples


def _tagger_json(path: Path, text_column: str, tokens_column: str) -> list[dict[str, Any]]:
    from fastmini.data.corpus import DataError, read_text_file
    from fastmini.data.tables import json_records

    _, records = json_records(path, read_text_file(path))
    examples = []
    for where, record in records:
        if isinstance(record.get(tokens_column), list):
            words = record[tokens_column]
            if not all(isinstance(word, str) for word in words):
                raise DataError(f"{where}: every item of '{tokens_column}' must be a word (a string), got {words!r}")
            examples.append({"tokens": words, "where": where})
        elif isinstance(record.get(text_column), str):
            examples.append({"tokens": record[text_column].split(), "where": where})
        else:
            raise DataError(f"{where}: expected an object with a '{tokens_column}' list or a '{text_column}' text")
    return _refuse_all_empty(examples, str(path))


def _training_record(directory: Path, file_name: str, field: str) -> Any:
    """``field`` of a JSON file that fine-tuning wrote into ``directory`` (train_config.json, metrics.json), or
    None when the file does not say."""
    try:
        saved = json.loads((directory / file_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none there (a model from elsewhere), or unreadable: nothing to go by
        return None
    return saved.get(field) if isinstance(saved, dict) else None


def _usable_max_length(recorded: Any, positions: int) -> int:
    """The recorded fine-tuning length when it is one the model can take, else the model's ``positions``."""
    from fastmini.finetune.config import MIN_MAX_LENGTH

    if isinstance(recorded, int) and not isinstance(recorded, bool) and MIN_MAX_LENGTH <= recorded <= positions:
        return recorded
    return positions


def warn_about_missing_pairs(predictor: Predictor, pair_column: str | None) -> None:
    if predictor.spec.kind != "ner" and predictor.text_pair_column and pair_column is None:
        log.warning(
            "the model was fine-tuned on sentence pairs (second text: column '%s'); without --text-pair-column "
            "every input is read as a single text, which it was not trained on",
            predictor.text_pair_column,
        )


def main(argv: list[str] | None = None) -> int:
    setup_logger("fastmini.predict")

    def body() -> int:
        args = build_parser().parse_args(argv)
        for flag, value in (("--batch-size", args.batch_size), ("--threads", args.threads)):
            if value is not None and value <= 0:
                raise UsageError(f"{flag} must be > 0, got {value}")
        quiet_libraries()
        import torch

        import fastmini  # noqa: F401  (registers the Auto classes)
        from fastmini.finetune.config import check_max_length

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        predictor = Predictor(args.model, args.device, args.precision)
        check_max_length(args.max_length, predictor.model.config.max_position_embeddings)
        examples = read_inputs(
            args.input, predictor.spec.kind, args.text_column, args.text_pair_column, args.tokens_column
        )
        warn_about_missing_pairs(predictor, args.text_pair_column)

        def write(handle) -> None:
            for start in range(0, len(examples), CHUNK):
                records = predictor.predict(examples[start : start + CHUNK], args.batch_size, args.max_length)
                for index, record in enumerate(records, start=start):
                    handle.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")

        if args.output:
            write_output_file(args.output, write)
        else:
            write(sys.stdout)  # a reader that stops early (`| head`) is run_cli's to handle
        if predictor.truncated_sentences:
            tagger = predictor.spec.kind == "ner"
            max_length = args.max_length or predictor.default_max_length
            positions = predictor.model.config.max_position_embeddings
            if max_length < positions:
                more = f"--max-length up to the model's {positions} positions reads more"
            else:
                more = f"the model reads no more than its {positions} positions"
            log.warning(
                '%d %s %d tokens%s: %s (their records say "truncated": true; %s)',
                predictor.truncated_sentences,
                "sentence(s) had more words than" if tagger else "input(s) were longer than",
                max_length,
                " hold" if tagger else "",
                "the words past them are tagged O without being read" if tagger else "predicted from their start",
                more,
            )
        return 0

    return run_cli("fastmini.predict", body)


def write_output_file(name: str, write) -> None:
    """``write(handle)`` into a temporary file beside ``name``, renamed to ``name`` once complete: a run that
    fails half-way leaves an existing file as it was."""
    from fastmini.files import write_file_atomically

    def write_temporary(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            write(handle)

    try:
        write_file_atomically(Path(name).expanduser(), write_temporary)
    except OSError as error:
        raise UsageError(f"--output {name}: cannot be written ({error.strerror or error})") from error


if __name__ == "__main__":
    sys.exit(main())
