"""Running a fine-tuned model over encoded examples, and reading its outputs as labels.

Batches are formed from examples sorted by length, so that little padding is computed at
all, and the model unpads what remains (fastmini's fast path); results come back in the
examples' own order. Used by the trainer's evaluation, its predictions files and
``python -m fastmini.predict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastmini.finetune import metrics
from fastmini.finetune.data import Encoded
from fastmini.finetune.tasks import LabelMap, TaskSpec
from fastmini.training.precision import autocast

MULTILABEL_THRESHOLD = 0.5


def length_sorted_batches(encoded: Encoded, batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def predict_logits(
    model, encoded: Encoded, batch_size: int, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Per example: its logits (num_labels,), or (tokens, num_labels) for token classification; fp32, CPU. A model in
    train() mode is switched to eval() for the call and back; one in eval() is left untouched (threads may share
    it: switching modes back and forth under them raced)."""
    if encoded.kind == "regression":
        # A regression head's output is the prediction itself: under bf16 autocast it came rounded to 8 bits of
        # mantissa (steps of 0.0078 near 1), which merged close predictions and could wreck a correlation metric and
        # the choice of epoch and learning rate made on it. Its evaluation computes in fp32.
        autocast_dtype = None
    was_training = model.training
    if was_training:
        model.eval()
    results: list[torch.Tensor | None] = [None] * len(encoded)
    try:
        for indices in length_sorted_batches(encoded, batch_size):
            batch = encoded.batch(indices)
            batch.pop("labels", None)
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            with autocast(device, autocast_dtype):
                logits = model(**batch).logits.float().cpu()
            for row, index in enumerate(indices):
                results[index] = logits[row, : len(encoded.input_ids[index])] if encoded.kind == "ner" else logits[row]
    finally:
        if was_training:
            model.train()
    return results


def decode(kind: str, logits: Sequence[torch.Tensor], encoded: Encoded, outside_index: int = 0) -> list[Any]:
    """Predictions in the targets' form: class index, number, multi-hot row, or one tag index per word.

    A word cut off by truncation is predicted ``outside_index`` (the "O" tag)."""
    if kind == "classification":
        return [int(row.argmax()) for row in logits]
    if kind == "regression":
        return [float(row[0]) for row in logits]
    if kind == "multilabel":
        return [[int(p > MULTILABEL_THRESHOLD) for p in torch.sigmoid(row).tolist()] for row in logits]
    predictions = []
    for row, positions in zip(logits, encoded.word_positions, strict=True):
        best = row.argmax(-1).tolist()
        predictions.append([outside_index if p is None else best[p] for p in positions])
    return predictions


def scores(
    spec: TaskSpec, labels: LabelMap, examples: list[dict[str, Any]], predictions: list[Any]
) -> dict[str, float]:
    """The task's metrics (``spec.metrics``, rounded to 6 digits) of ``predictions`` against the examples' targets."""
    gold = [example["target"] for example in examples]
    if spec.kind == "classification":
        computed = metrics.classification_scores(gold, predictions, labels.num_labels)
    elif spec.kind == "regression":
        computed = metrics.regression_scores(gold, predictions)
    elif spec.kind == "multilabel":
        computed = metrics.multilabel_scores([[int(v) for v in row] for row in gold], predictions)
    else:
        names = labels.names
        computed = metrics.entity_scores(
            [[names[i] for i in row] for row in gold], [[names[i] for i in row] for row in predictions]
        )
    return {name: round(computed[name], 6) for name in spec.metrics}


def _json_number(value: float) -> float | None:
    """``value`` rounded to 6 digits; None (JSON null) for NaN or infinity, which JSON has no word for (a
    diverged model's outputs): json.dumps would write a bare NaN that strict parsers refuse."""
    return round(value, 6) if math.isfinite(value) else None


def readable(spec: TaskSpec, labels: LabelMap, prediction: Any, row_logits: torch.Tensor) -> dict[str, Any]:
    """One prediction as JSON: label name(s) and probabilities, a number, or tags."""
    names = labels.names
    if spec.kind == "classification":
        probabilities = torch.softmax(row_logits, -1)
        return {"prediction": names[prediction], "score": _json_number(float(probabilities[prediction]))}
    if spec.kind == "regression":
        return {"prediction": _json_number(prediction)}
    if spec.kind == "multilabel":
        probabilities = torch.sigmoid(row_logits).tolist()
        return {
            "prediction": [names[k] for k, on in enumerate(prediction) if on],
            "scores": {names[k]: _json_number(p) for k, p in enumerate(probabilities)},
        }
    return {"prediction": [names[i] for i in prediction]}


def gold_readable(spec: TaskSpec, labels: LabelMap, example: dict[str, Any]) -> Any:
    if "target" not in example:
        return None
    target = example["target"]
    if spec.kind == "classification":
        return labels.names[target]
    if spec.kind == "regression":
        return target
    if spec.kind == "multilabel":
        return [labels.names[k] for k, on in enumerate(target) if on]
    return [labels.names[i] for i in target]
