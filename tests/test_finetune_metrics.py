"""fastmini.finetune.metrics against values worked out by hand (and, where installed, scikit-learn/scipy)."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from fastmini.finetune import metrics


def test_accuracy_and_f1_by_hand():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp = 2 (rows 0, 3), fp = 1 (row 1), fn = 1 (row 2): F1 = 2*2 / (2*2 + 1 + 1)
    assert metrics.f1_binary([1, 0, 1, 1, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)
    # class 0: F1 1; class 1: tp 0 -> 0; class 2: tp 1, fp 1, fn 1 -> 1/2; macro = 1/2
    assert metrics.f1_macro([0, 1, 2, 2], [0, 2, 2, 1]) == pytest.approx(0.5)
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0  # no positive anywhere: 0, not NaN


def test_matthews_correlation_by_hand():
    # tp 2, tn 2, fp 1, fn 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert metrics.matthews_correlation([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]) == pytest.approx(1 / 3)
    # scikit-learn's documented example: -1/3
    assert metrics.matthews_correlation([1, 1, 1, -1], [1, -1, 1, 1]) == pytest.approx(-1 / 3)
    # three classes: c = 3, s = 6, t = (2, 2, 2), p = (3, 1, 2): (18 - 12) / sqrt((36 - 14)(36 - 12))
    value = metrics.matthews_correlation([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 2])
    assert value == pytest.approx(6 / math.sqrt(22 * 24))
    assert metrics.matthews_correlation([1, 1, 1], [1, 1, 1]) == 0.0  # constant: zero denominator


def test_correlations_and_mse_by_hand():
    assert metrics.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # cov 1 / sqrt(2 * 2)
    assert metrics.ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert metrics.mean_squared_error([1, 2], [2, 4]) == 2.5


def test_huge_finite_values_are_scored_not_an_overflow_error():
    """Squares past ~1e154 raise OverflowError on Python floats: a regression label of 1e200 stopped the job."""
    labels, predictions = [1e200, 1.0, 2.0, 3.0], [0.5, 1.0, 2.0, 3.0]
    # by hand: the deviations scaled by 1e200 are ~(0.75, -0.25, -0.25, -0.25) against (-1.125, -0.625, 0.375, 1.375)
    x = [0.75, -0.25, -0.25, -0.25]
    y = [-1.125, -0.625, 0.375, 1.375]
    expected = sum(a * b for a, b in zip(x, y, strict=True)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
    assert metrics.pearson(labels, predictions) == pytest.approx(expected, rel=1e-12)
    assert metrics.mean_squared_error(labels, predictions) == sys.float_info.max


def test_non_finite_predictions_never_score_well():
    labels = [1.0, 2.0, 3.0, 4.0]
    for bad in ([math.nan] * 4, [1.0, math.nan, 3.0, 4.0], [1.0, 2.0, math.inf, 4.0]):
        assert metrics.pearson(labels, bad) == 0.0 and metrics.pearson(bad, labels) == 0.0
        assert metrics.spearman(labels, bad) == 0.0
        mse = metrics.mean_squared_error(labels, bad)
        assert math.isfinite(mse) and mse > 1e300  # the worst score, and one that JSON can hold
    scores = metrics.regression_scores(labels, [math.nan] * 4)
    assert scores["pearson"] == scores["spearman"] == 0.0
    assert "NaN" not in json.dumps(scores) and "Infinity" not in json.dumps(scores)


def test_multilabel_scores_by_hand():
    labels = [[1, 0], [1, 1], [0, 0]]
    predictions = [[1, 1], [1, 0], [0, 0]]
    scores = metrics.multilabel_scores(labels, predictions)
    # label 0: tp 2 -> F1 1; label 1: tp 0, fp 1, fn 1 -> 0; micro: tp 2, fp 1, fn 1 -> 4/6
    assert scores["f1_micro"] == pytest.approx(2 / 3)
    assert scores["f1_macro"] == pytest.approx(0.5)
    assert scores["exact_match"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        (["O", "I-PER", "I-PER"], [("PER", 1, 2)]),  # an entity may start with I (conlleval)
        (["B-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),  # a type change ends one and starts another
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
        (["B", "I", "O", "I"], [("_", 0, 1), ("_", 3, 3)]),  # BioBERT's bare tags
        (["S-PER", "B-LOC", "E-LOC", "O"], [("PER", 0, 0), ("LOC", 1, 2)]),  # IOBES
        (["O", "O"], []),
        (["B-GENE-X", "I-GENE-X"], [("GENE-X", 0, 1)]),
    ],
)
def test_entities_follow_seqeval(tags, expected):
    assert metrics.entities(tags) == expected


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    guess = [["B-PER", "O", "O", "O"], ["B-ORG", "O"]]
    scores = metrics.entity_scores(gold, guess)
    # gold: PER(0-1), LOC(3), ORG; predicted: PER(0) (wrong span), ORG -> 1 hit of 2 predicted, 3 true
    assert scores["precision"] == pytest.approx(1 / 2)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert metrics.entity_scores([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="labels but"):
        metrics.entity_scores([["O", "O"]], [["O"]])


def test_glue_metrics_by_task_name():
    labels, predictions = [1, 0, 1, 1], [1, 0, 0, 1]
    assert metrics.glue_metrics("mrpc", labels, predictions) == {"f1": pytest.approx(0.8), "accuracy": 0.75}
    assert set(metrics.glue_metrics("cola", labels, predictions)) == {"matthews_correlation"}
    assert set(metrics.glue_metrics("stsb", [0.0, 1.0, 2.0], [0.1, 1.1, 1.9])) == {"pearson", "spearman"}
    assert metrics.glue_metrics("mnli", [0, 1, 2], [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="unknown GLUE task"):
        metrics.glue_metrics("squad", [1], [1])


def test_agree_with_scikit_learn_and_scipy_on_random_data():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    generator = random.Random(0)
    for _ in range(20):
        n = generator.randint(5, 40)
        labels = [generator.randrange(3) for _ in range(n)]
        predictions = [generator.randrange(3) for _ in range(n)]
        assert metrics.matthews_correlation(labels, predictions) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12
        )
        assert metrics.f1_macro(labels, predictions) == pytest.approx(
            sklearn_metrics.f1_score(labels, predictions, average="macro"), abs=1e-12
        )
        binary = [min(1, v) for v in labels], [min(1, v) for v in predictions]
        assert metrics.f1_binary(*binary) == pytest.approx(sklearn_metrics.f1_score(*binary), abs=1e-12)
        x = [generator.randint(0, 5) for _ in range(n)]  # integers: plenty of ties
        y = [generator.gauss(0, 1) + v for v in x]
        assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)
        assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)
