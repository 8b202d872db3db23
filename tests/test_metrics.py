"""LaMP's metrics against hand-checked cases and against the reference packages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_pllm.tasks import metrics
from edge_pllm.tasks.lamp import task_spec


def test_rouge_hand_checked_and_equal_to_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    preds = ["fix the bug", "Add JSON output!", "", "a b c d"]
    golds = ["Fix a bug", "add json output", "something", "d c b a"]
    got = metrics.rouge_scores(preds, golds)
    assert got["rouge-1"][0] == pytest.approx(2 / 3)  # fix, bug of 3 tokens each side
    assert got["rouge-1"][1] == pytest.approx(1.0)  # lowercased, punctuation dropped
    assert got["rouge-1"][2] == 0.0
    assert got["rouge-1"][3] == pytest.approx(1.0) and got["rouge-L"][3] == pytest.approx(0.25)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    for i, (p, g) in enumerate(zip(preds, golds, strict=True)):
        ref = scorer.score(g, p)
        assert got["rouge-1"][i] == ref["rouge1"].fmeasure
        assert got["rouge-L"][i] == ref["rougeL"].fmeasure


def test_no_stemming_as_lamp():
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    r = metrics.rouge_scores(["fixes"], ["fixed"])
    assert r["rouge-1"][0] == 0.0


def test_lamp3_unparseable_answer_scores_the_farthest_rating():
    assert metrics.rating_value("five", "4") == 1.0  # gold nearer 5: worst is 1
    assert metrics.rating_value("x", "2") == 5.0  # gold nearer 1: worst is 5
    assert metrics.rating_value("x", "3") == 5.0  # tie: LaMP's rule picks 5
    assert metrics.rating_value(" 3 ", "5") == 3.0
    rows = metrics.RATING.per_example(["5", "x"], ["4", "2"])
    mae, rmse = metrics.RATING.statistics(rows)
    assert mae == 2.0 and rmse == pytest.approx(math.sqrt(5))


def test_macro_f1_counts_missing_labels_and_out_of_set_answers_as_wrong():
    spec = metrics.CLASSIFY_LAMP1
    rows = spec.per_example(["[1]", "[1]", "junk"], ["[1]", "[1]", "[1]"])
    accuracy, f1 = spec.statistics(rows)
    assert accuracy == pytest.approx(2 / 3)
    # label [1]: tp 2, fn 1 -> F1 0.8; label [2] never occurs -> 0; macro = 0.4
    assert f1 == pytest.approx(0.4)


def test_macro_f1_equals_sklearn_with_explicit_labels():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = metrics.LAMP2_LABELS
    golds = [labels[i] for i in rng.integers(0, 10, 200)]  # five labels never occur
    preds = [labels[i] if i < 15 else "not a tag" for i in rng.integers(0, 18, 200)]
    rows = metrics.CLASSIFY_LAMP2.per_example(preds, golds)
    _, f1 = metrics.CLASSIFY_LAMP2.statistics(rows)
    expected = sk.f1_score(
        rows[:, 1], rows[:, 0], labels=list(range(len(labels))), average="macro", zero_division=0
    )
    assert f1 == pytest.approx(expected)


def test_bootstrap_interval_and_paired_difference():
    pytest.importorskip("rouge_score", reason="ROUGE needs the [eval] extra")
    rows = metrics.GENERATION.per_example(["a b", "a", "c", "a b c"], ["a b", "b", "c", "a"])
    est = metrics.bootstrap(metrics.GENERATION, rows, n_resamples=200)
    for e in est.values():
        assert e.low <= e.value <= e.high
    same = metrics.paired_difference(metrics.GENERATION, rows, rows, n_resamples=100)
    assert all(e.value == e.low == e.high == 0.0 for e in same.values())
    better = rows + 0.1  # better on every query by the same margin
    diff = metrics.paired_difference(metrics.GENERATION, better, rows, n_resamples=200)
    assert diff["rouge-1"].low == pytest.approx(0.1) == diff["rouge-1"].high


@pytest.mark.parametrize(
    ("task", "raw", "clean"),
    [
        ("commit_subject", 'The subject line for this commit is:\n"fix: x"', "fix: x"),
        ("commit_subject", "Subject line: add y\n\nbody", "add y"),
        ("LaMP_2", "I think the tag is dark comedy.", "dark comedy"),
        ("LaMP_3", "Rating: 4 out of 5", "4"),
        ("LaMP_1", "[2]", "[2]"),
    ],
)
def test_answer_cleaning(task, raw, clean):
    assert task_spec(task).clean(raw) == clean


@pytest.mark.parametrize("name", ["LaMP_4", "LaMP-4", "lamp4", "LaMP_2N", "commit_subjects"])
def test_task_names(name):
    assert task_spec(name).name in {"LaMP_4", "LaMP_2", "commit_subject"}
