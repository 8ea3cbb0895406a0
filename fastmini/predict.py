"""``python -m fastmini.predict --model DIR --input FILE``: label new text with a fine-tuned model.

The model is a directory written by ``python -m fastmini.finetune`` (or any fastmini / MiniALBERT
/ ALBERT sequence- or token-classification checkpoint with its tokenizer); what it predicts
(classes, a number, several labels, BIO tags) is read from its config. Input:
- ``.txt`` (or ``-`` for stdin): one text per line; for a tagger, words separated by spaces;
- ``.jsonl`` / ``.json``: objects with ``--text-column`` (and ``--text-pair-column`` for pairs);
  for a tagger, ``--tokens-column`` (a list of words) or the text column;
- ``.csv`` / ``.tsv``: a header row naming those columns; for a tagger, ``.tsv`` / ``.conll``
  files in the two-column training format (the tags are ignored).
Output: one JSON object per input, in input order (``--output FILE`` or stdout). Examples are
batched by length and run through the model's unpadded fast path in inference mode, bf16 on a
GPU. The same directory also works in ``transformers.pipeline("text-classification" |
"token-classification", model=DIR)`` after ``import fastmini``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastmini.training.cli import quiet_libraries, run_cli, setup_logger
from fastmini.training.errors import UsageError
from fastmini.training.precision import PRECISIONS, autocast_dtype

CHUNK = 4096  # examples tokenised and predicted at a time, so that a large file streams
NER_FILE_SUFFIXES = (".tsv", ".conll", ".iob", ".bio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmini.predict",
        description="Label a text file or a JSONL/CSV batch with a fine-tuned fastmini model, batch-wise.",
        epilog="Writes one JSON object per input line: the prediction (label and probability, a number, labels, or "
        "tags with their entities).",
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
        help="tokens per example, longer ones are cut (default: the model's positions)",
    )
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="'auto', 'cpu', 'cuda' (default: auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="'auto': bf16 on GPU, fp32 on CPU (default: auto)",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    return parser


class Predictor:
    """A fine-tuned model, its tokenizer and what its outputs mean."""

    def __init__(self, directory: str, device: str = "auto", precision: str = "auto"):
        from transformers import AutoTokenizer

        from fastmini.finetune.tasks import GENERIC_TASKS, LabelMap
        from fastmini.models import (
            CheckpointError,
            FastMiniForSequenceClassification,
            FastMiniForTokenClassification,
        )
        from fastmini.training.distributed import resolve_device

        path = Path(directory).expanduser()
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UsageError(f"--model {directory}: no config.json (expected a directory written by fastmini.finetune)")
        try:
            architectures = json.loads(config_path.read_text()).get("architectures") or []
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise UsageError(f"--model {directory}: config.json is not readable JSON ({error})") from error
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
            self.model = model_class.from_pretrained(path)
        except CheckpointError as error:
            raise UsageError(f"--model {directory}: {error}") from error
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as error:
            raise UsageError(f"--model {directory}: no usable tokenizer in the directory ({error})") from error
        config = self.model.config
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
        self.device = resolve_device(device)
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.model.to(self.device).eval().optimize_for_inference()

    def predict(self, examples: list[dict[str, Any]], batch_size: int, max_length: int | None) -> list[dict[str, Any]]:
        from fastmini.finetune import inference
        from fastmini.finetune.data import encode
        from fastmini.finetune.metrics import entities

        max_length = max_length or self.model.config.max_position_embeddings
        encoded = encode(self.tokenizer, examples, self.spec.kind, max_length)
        logits = inference.predict_logits(self.model, encoded, batch_size, self.device, self.autocast_dtype)
        predictions = inference.decode(self.spec.kind, logits, encoded, self.labels.index.get("O", 0))
        records = []
        for example, prediction, row in zip(examples, predictions, logits, strict=True):
            record = inference.readable(self.spec, self.labels, prediction, row)
            if self.spec.kind == "ner":
                tokens, tags = example["tokens"], record["prediction"]
                record = {
                    "tokens": tokens,
                    "tags": tags,
                    "entities": [
                        {"type": kind, "start": first, "end": last + 1, "text": " ".join(tokens[first : last + 1])}
                        for kind, first, last in entities(tags)
                    ],
                }
            else:
                record = {
                    "text": example["text"],
                    **({"text_pair": example["text_pair"]} if example["text_pair"] is not None else {}),
                    **record,
                }
            records.append(record)
        return records


def read_inputs(source: str, kind: str, text_column: str, pair_column: str | None, tokens_column: str):
    """The examples of an input file (see the module docstring), in order."""
    from fastmini.data.corpus import DataError, read_text_file
    from fastmini.data.labelled import Columns, read_labelled_file
    from fastmini.data.ner import read_ner_file

    if source == "-":
        return _from_lines(sys.stdin.read().splitlines(), "stdin", kind, pair_column)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"--input {source}: no such file")
    suffix = path.suffix.lower()
    if kind == "ner" and suffix in NER_FILE_SUFFIXES:
        return [{"tokens": s["tokens"], "where": s["where"]} for s in read_ner_file(path)]
    if kind == "ner" and suffix in (".json", ".jsonl"):
        return _tagger_json(path, text_column, tokens_column)
    if suffix in (".csv", ".tsv", ".json", ".jsonl"):
        examples = read_labelled_file(path, Columns(text_column, pair_column, None), labels_required=False)
        if kind == "ner":
            return [{"tokens": e["text"].split(), "where": e["where"]} for e in examples]
        return examples
    lines = read_text_file(path, allow_empty=True).splitlines()
    return _from_lines(lines, str(path), kind, pair_column)


def _from_lines(lines: list[str], where: str, kind: str, pair_column: str | None) -> list[dict[str, Any]]:
    from fastmini.data.corpus import DataError

    if pair_column is not None:
        raise DataError(f"{where}: sentence pairs need a .jsonl/.json/.csv/.tsv input with named columns")
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if kind == "ner":
            examples.append({"tokens": line.split(), "where": f"{where}, line {number}"})
        else:
            examples.append({"text": line.strip(), "text_pair": None, "where": f"{where}, line {number}"})
    if not examples:
        raise DataError(f"{where}: no text (the input is empty)")
    return examples


def _tagger_json(path: Path, text_column: str, tokens_column: str) -> list[dict[str, Any]]:
    from fastmini.data.corpus import DataError

    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = [(f"{path}, item {i}", r) for i, r in enumerate(json.loads(text))]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}, line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    examples = []
    for where, record in records:
        if isinstance(record, dict) and isinstance(record.get(tokens_column), list):
            examples.append({"tokens": [str(t) for t in record[tokens_column]], "where": where})
        elif isinstance(record, dict) and isinstance(record.get(text_column), str):
            examples.append({"tokens": record[text_column].split(), "where": where})
        else:
            raise DataError(f"{where}: expected an object with a '{tokens_column}' list or a '{text_column}' text")
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def main(argv: list[str] | None = None) -> int:
    setup_logger("fastmini.predict")

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.batch_size <= 0:
            raise UsageError(f"--batch-size must be > 0, got {args.batch_size}")
        quiet_libraries()
        import torch

        import fastmini  # noqa: F401  (registers the Auto classes)

        if args.threads:
            torch.set_num_threads(args.threads)
        predictor = Predictor(args.model, args.device, args.precision)
        examples = read_inputs(
            args.input, predictor.spec.kind, args.text_column, args.text_pair_column, args.tokens_column
        )
        try:
            output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
        except OSError as error:
            raise UsageError(f"--output {args.output}: cannot be written ({error.strerror or error})") from error
        try:
            index = 0
            for chunk in _chunks(examples, CHUNK):
                for record in predictor.predict(chunk, args.batch_size, args.max_length):
                    output.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")
                    index += 1
        finally:
            if output is not sys.stdout:
                output.close()
        return 0

    return run_cli("fastmini.predict", body)


if __name__ == "__main__":
    sys.exit(main())
