"""Evaluation metrics, written out (no scikit-learn / seqeval dependency) and tested by hand.

- classification: accuracy, F1 (binary: of class 1; more classes: macro), Matthews correlation
  (the multi-class R_K form that scikit-learn computes);
- regression: Pearson and Spearman correlation (average ranks for ties), mean squared error;
- multi-label: micro and macro F1 over (example, label) decisions, exact-match accuracy;
- BIO tagging: entity-level precision / recall / F1 with seqeval's default (conlleval) rules:
  an entity starts at B, or at I after O or after another type; it ends before O, B, or a
  change of type; E and S tags (IOBES) are read the same way seqeval reads them;
- each GLUE task's official metrics by name (``glue_metrics``).
Degenerate inputs follow scikit-learn: a zero denominator gives 0.0 (never NaN, which JSON and
model selection cannot use). Non-finite values (NaN predictions of a diverged model) never score
well: Pearson and Spearman give 0.0 (no correlation), the mean squared error gives the largest
float (JSON has no infinity).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence

GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def accuracy(labels: Sequence, predictions: Sequence) -> float:
    _same_length(labels, predictions)
    return _ratio(sum(a == b for a, b in zip(labels, predictions, strict=True)), len(labels))


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
    return _ratio(2 * true_positives, 2 * true_positives + false_positives + false_negatives)


def f1_binary(labels: Sequence[int], predictions: Sequence[int], positive: int = 1) -> float:
    _same_length(labels, predictions)
    pairs = list(zip(labels, predictions, strict=True))
    tp = sum(a == positive and b == positive for a, b in pairs)
    fp = sum(a != positive and b == positive for a, b in pairs)
    fn = sum(a == positive and b != positive for a, b in pairs)
    return _f1(tp, fp, fn)


def f1_macro(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Mean of per-class F1 over the classes present in labels or predictions."""
    classes = sorted(set(labels) | set(predictions))
    return _ratio(sum(f1_binary(labels, predictions, c) for c in classes), len(classes))


def matthews_correlation(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """(c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)); the binary MCC for two classes."""
    _same_length(labels, predictions)
    s = len(labels)
    c = sum(a == b for a, b in zip(labels, predictions, strict=True))
    t, p = Counter(labels), Counter(predictions)
    classes = set(t) | set(p)
    covariance = c * s - sum(t[k] * p[k] for k in classes)
    denominator = math.sqrt((s * s - sum(v * v for v in p.values())) * (s * s - sum(v * v for v in t.values())))
    return _ratio(covariance, denominator)


def _all_finite(*values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for sequence in values for v in sequence)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y)
    n = len(x)
    if n < 2 or not _all_finite(x, y):  # NaN would pass the clamp below as 1.0: a perfect score
        return 0.0
    mean_x, mean_y = sum(x) / n, sum(y) / n
    if not math.isfinite(mean_x) or not math.isfinite(mean_y):  # the sum of huge values overflowed
        return 0.0
    # deviations scaled by the largest of each (as scipy does): squares of values past ~1e154 would overflow
    # (a Python float's ** raises OverflowError there), and the ratio is the same
    scale_x = max(abs(a - mean_x) for a in x) or 1.0
    scale_y = max(abs(b - mean_y) for b in y) or 1.0
    dx = [(a - mean_x) / scale_x for a in x]
    dy = [(b - mean_y) / scale_y for b in y]
    covariance = sum(a * b for a, b in zip(dx, dy, strict=True))
    spread = math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))
    value = _ratio(covariance, spread)
    return max(-1.0, min(1.0, value)) if math.isfinite(value) else 0.0


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the average of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y)
    if not _all_finite(x, y):  # NaN sorts nowhere in particular: its ranks would be an arbitrary order
        return 0.0
    return pearson(ranks(x), ranks(y))


def mean_squared_error(labels: Sequence[float], predictions: Sequence[float]) -> float:
    _same_length(labels, predictions)
    # (a - b) * (a - b) overflows to inf, which the line below catches; (a - b) ** 2 raises OverflowError
    value = _ratio(sum((a - b) * (a - b) for a, b in zip(labels, predictions, strict=True)), len(labels))
    return value if math.isfinite(value) else sys.float_info.max  # the worst score that JSON can hold


def multilabel_scores(labels: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]]) -> dict[str, float]:
    """Multi-hot rows (one 0/1 per label): micro F1, macro F1 (over labels) and exact-match accuracy."""
    _same_length(labels, predictions)
    width = len(labels[0]) if labels else 0
    counts = [[0, 0, 0] for _ in range(width)]  # tp, fp, fn per label
    for row, predicted in zip(labels, predictions, strict=True):
        for k, (a, b) in enumerate(zip(row, predicted, strict=True)):
            counts[k][0] += a and b
            counts[k][1] += (not a) and b
            counts[k][2] += a and not b
    total = [sum(c[i] for c in counts) for i in range(3)]
    return {
        "f1_micro": _f1(*total),
        "f1_macro": _ratio(sum(_f1(*c) for c in counts), width),
        "exact_match": accuracy([tuple(r) for r in labels], [tuple(p) for p in predictions]),
    }


# --------------------------------------------------------------------------------- entities
def _split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("B", "_") from a bare "B" (seqeval's placeholder type)."""
    if tag in ("O", "."):
        return tag, ""
    return tag[0], tag[2:] or "_"


def _ends(previous: str, tag: str, previous_type: str, tag_type: str) -> bool:
    if previous in ("E", "S"):
        return True
    if previous in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return previous not in ("O", ".") and previous_type != tag_type


def _starts(previous: str, tag: str, previous_type: str, tag_type: str) -> bool:
    if tag in ("B", "S"):
        return True
    if previous in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and previous_type != tag_type


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity in one tag sequence, seqeval's default rules."""
    found = []
    previous, previous_type, begin = "O", "", 0
    for position, tag in enumerate([*tags, "O"]):
        kind, tag_type = _split_tag(tag)
        if _ends(previous, kind, previous_type, tag_type):
            found.append((previous_type, begin, position - 1))
        if _starts(previous, kind, previous_type, tag_type):
            begin = position
        previous, previous_type = kind, tag_type
    return found


def entity_scores(labels: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over entities (exact type and span), plus token accuracy."""
    _same_length(labels, predictions)
    true, predicted = set(), set()
    tokens = correct = 0
    for sentence, (gold, guess) in enumerate(zip(labels, predictions, strict=True)):
        _same_length(gold, guess)
        true |= {(sentence, *entity) for entity in entities(gold)}
        predicted |= {(sentence, *entity) for entity in entities(guess)}
        tokens += len(gold)
        correct += sum(a == b for a, b in zip(gold, guess, strict=True))
    hits = len(true & predicted)
    precision, recall = _ratio(hits, len(predicted)), _ratio(hits, len(true))
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "accuracy": _ratio(correct, tokens),
    }


# ------------------------------------------------------------------------------- by task kind
def classification_scores(labels: Sequence[int], predictions: Sequence[int], num_labels: int) -> dict[str, float]:
    f1 = f1_binary(labels, predictions) if num_labels == 2 else f1_macro(labels, predictions)
    return {
        "accuracy": accuracy(labels, predictions),
        "f1": f1,
        "matthews_correlation": matthews_correlation(labels, predictions),
    }


def regression_scores(labels: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    return {
        "pearson": pearson(labels, predictions),
        "spearman": spearman(labels, predictions),
        "mse": mean_squared_error(labels, predictions),
    }


def glue_metrics(task: str, labels: Sequence, predictions: Sequence) -> dict[str, float]:
    """A GLUE task's official metrics on its validation set (F1 of class 1 for MRPC and QQP)."""
    if task not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task '{task}' (known: {', '.join(GLUE_METRICS)})")
    if task == "stsb":
        scores = regression_scores(labels, predictions)
    else:
        scores = classification_scores(labels, predictions, 3 if task == "mnli" else 2)
    return {name: scores[name] for name in GLUE_METRICS[task]}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"metrics: {len(a)} labels but {len(b)} predictions")
