"""LaMP's metrics, computed as LaMP's own evaluation code does, with bootstrap intervals.

- LaMP-1/2 (classification): accuracy and macro-F1 over the task's label set; an answer
  outside the set counts as wrong (it matches no label), and every label of the set is in
  the macro average even if it never occurs (F1 0 then, as sklearn with `labels=` gives).
- LaMP-3 (rating): MAE and RMSE; an unparseable answer is scored as the rating farthest
  from the gold one (1 if the gold is nearer 5, else 5), LaMP's rule.
- Generation tasks: ROUGE-1 and ROUGE-L F-measure from the `rouge-score` package, no
  stemmer (lowercased alphanumeric tokens), averaged over examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MissingDependencyError

LAMP1_LABELS = ("[1]", "[2]")
LAMP2_LABELS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
    "dark comedy", "classic", "psychology", "fantasy", "romance", "thought-provoking",
    "social commentary", "violence", "true story",
)  # fmt: skip
LAMP3_LABELS = ("1", "2", "3", "4", "5")


# --- per-example scores ---------------------------------------------------------------------


def require_rouge() -> None:
    """MissingDependencyError naming the extra if `rouge-score` is not installed (an
    evaluation asks before it answers, not after)."""
    try:
        from rouge_score import rouge_scorer  # noqa: F401  (it needs nltk and absl too)
    except ImportError as exc:
        raise MissingDependencyError("rouge-score", "eval", "Computing ROUGE") from exc


def rouge_scores(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE-1 and ROUGE-L F-measures."""
    require_rouge()
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1, rl = [], []
    for pred, gold in zip(predictions, golds, strict=True):
        s = scorer.score(gold, pred)
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return {"rouge-1": np.array(r1), "rouge-L": np.array(rl)}


def rating_value(prediction: str, gold: str) -> float:
    """LaMP-3's reading of a prediction: the number, or the worst rating if unparseable."""
    try:
        return float(prediction.strip())
    except ValueError:
        y = float(gold)
        return 1.0 if abs(1 - y) > abs(5 - y) else 5.0


def label_index(answer: str, labels: Sequence[str]) -> int:
    """Index of `answer` in `labels` (after stripping), -1 when outside the set."""
    answer = answer.strip()
    return labels.index(answer) if answer in labels else -1


def macro_f1(pred_idx: np.ndarray, gold_idx: np.ndarray, n_labels: int) -> float:
    """Macro-F1 over all `n_labels` labels; a label never predicted nor present scores 0."""
    scores = []
    for label in range(n_labels):
        tp = int(np.sum((pred_idx == label) & (gold_idx == label)))
        fp = int(np.sum((pred_idx == label) & (gold_idx != label)))
        fn = int(np.sum((pred_idx != label) & (gold_idx == label)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


# --- task-level metrics with intervals --------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """How a task is scored: statistics over per-example data, higher-is-better or not."""

    names: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    # Per-example data (one row per example) and the statistics computed from a sample of rows.
    per_example: Callable[[Sequence[str], Sequence[str]], np.ndarray]
    statistics: Callable[[np.ndarray], tuple[float, ...]]


def _generation_rows(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    s = rouge_scores(preds, golds)
    return np.stack([s["rouge-1"], s["rouge-L"]], axis=1)


def _classification(labels: Sequence[str]) -> MetricSpec:
    def rows(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
        return np.array(
            [
                [label_index(p, labels), label_index(g, labels)]
                for p, g in zip(preds, golds, strict=True)
            ]
        )

    def stats(r: np.ndarray) -> tuple[float, ...]:
        return float(np.mean(r[:, 0] == r[:, 1])), macro_f1(r[:, 0], r[:, 1], len(labels))

    return MetricSpec(("accuracy", "f1"), (True, True), rows, stats)


def _rating_rows(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    return np.array([rating_value(p, g) - float(g) for p, g in zip(preds, golds, strict=True)])[
        :, None
    ]


GENERATION = MetricSpec(
    ("rouge-1", "rouge-L"), (True, True), _generation_rows, lambda r: tuple(map(float, r.mean(0)))
)
RATING = MetricSpec(
    ("mae", "rmse"),
    (False, False),
    _rating_rows,
    lambda r: (float(np.abs(r).mean()), float(math.sqrt(np.square(r).mean()))),
)
CLASSIFY_LAMP1 = _classification(LAMP1_LABELS)
CLASSIFY_LAMP2 = _classification(LAMP2_LABELS)


def mean_of(name: str, higher_is_better: bool) -> MetricSpec:
    """A statistic that is the mean of one number per example that the caller computed
    (a loss, a latency): rows are (n, 1) arrays, there is no text to score."""

    def from_text(preds: Sequence[str], golds: Sequence[str]) -> np.ndarray:
        raise TypeError(f"{name!r} is computed per example by its caller, not from text.")

    return MetricSpec((name,), (higher_is_better,), from_text, lambda r: (float(r.mean()),))


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


def bootstrap(
    spec: MetricSpec, rows: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """Each statistic with a percentile 95 % bootstrap interval over examples."""
    rng = np.random.default_rng(seed)
    point = spec.statistics(rows)
    samples = np.array(
        [spec.statistics(rows[rng.integers(0, len(rows), len(rows))]) for _ in range(n_resamples)]
    )
    return {
        name: Estimate(point[i], *map(float, np.percentile(samples[:, i], [2.5, 97.5])))
        for i, name in enumerate(spec.names)
    }


def paired_difference(
    spec: MetricSpec, rows_a: np.ndarray, rows_b: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Estimate]:
    """a − b for each statistic on the same examples, with a paired bootstrap interval."""
    if len(rows_a) != len(rows_b):
        raise ValueError("paired differences need the same examples on both sides")
    rng = np.random.default_rng(seed)
    point = np.subtract(spec.statistics(rows_a), spec.statistics(rows_b))
    diffs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(rows_a), len(rows_a))
        diffs.append(np.subtract(spec.statistics(rows_a[idx]), spec.statistics(rows_b[idx])))
    samples = np.array(diffs)
    return {
        name: Estimate(float(point[i]), *map(float, np.percentile(samples[:, i], [2.5, 97.5])))
        for i, name in enumerate(spec.names)
    }
