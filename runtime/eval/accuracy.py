"""Preference accuracy exactly as the Pick-a-Pic paper computes it (yuvalkirstain/PickScore,
`trainer/scripts/eval_preference_predictor.py`), on scores the runtime has already produced:

- each pair's two scores -> softmax -> (p0, p1);
- the label is a tie when label_0 == 0.5, "0" when label_0 == 1, else "1";
- the prediction is a tie when |p1 - p0| <= threshold, else the larger probability's side ("1" when equal);
- a pair earns 1 when label and prediction agree, 0.5 when they differ and either is a tie, else 0;
- the threshold is the first best of {0, 0.1, ..., 1} on a validation split (np.argmax), then applied to
  the test split.

Also: the accuracy with tie-labelled pairs left out (threshold 0, as papers that discard ties report it),
counts per label kind, and a bootstrap confidence interval over pairs. Pure numpy: the scoring itself is the
runtime's normal path (eval.preference scores Pick-a-Pic splits and reports with these).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

THRESHOLDS = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)  # the reference's candidates, in its order
LABEL_KINDS = ("0", "1", "tie")
BOOTSTRAP_SAMPLES = 1000


def pair_probs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over each pair's two scores ([N, 2] PickScore scores) -> (p0, p1), computed stably."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != 2:
        raise ValueError(f"pair scores must be [N, 2], got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"pair #{int(np.nonzero(~np.isfinite(scores).all(1))[0][0])} has a non-finite score")
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    probs = shifted / shifted.sum(1, keepdims=True)
    return probs[:, 0], probs[:, 1]


def label_kinds(label_0: Sequence[float]) -> np.ndarray:
    """"0", "1" or "tie" per pair from label_0, as the reference reads it; ValueError naming the first pair
    whose label is not 0, 0.5 or 1 (the reference would silently call it "1")."""
    label_0 = np.asarray(label_0, dtype=np.float64)
    bad = ~np.isin(label_0, (0.0, 0.5, 1.0))
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"pair #{i}: label_0 must be 0, 0.5 or 1, got {float(label_0[i]):g}")
    return np.where(label_0 == 0.5, "tie", np.where(label_0 == 1.0, "0", "1"))


def predictions(p0: np.ndarray, p1: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(np.abs(p1 - p0) <= threshold, "tie", np.where(p0 > p1, "0", "1"))


def pair_credit(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """1 for a match, 0.5 for a mismatch where either side is a tie, else 0 (the reference's calc_score)."""
    return np.where(labels == preds, 1.0, np.where((labels == "tie") | (preds == "tie"), 0.5, 0.0))


def accuracy(p0: np.ndarray, p1: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    if len(labels) == 0:
        raise ValueError("no pairs to evaluate (an empty split)")
    return float(pair_credit(labels, predictions(p0, p1, threshold)).mean())


def choose_threshold(p0: np.ndarray, p1: np.ndarray, labels: np.ndarray,
                     thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, list[float]]:
    """The reference's choice on a validation split: the first threshold with the best accuracy, and every
    candidate's accuracy."""
    accuracies = [accuracy(p0, p1, labels, t) for t in thresholds]
    return thresholds[int(np.argmax(accuracies))], accuracies


def bootstrap_interval(credit: np.ndarray, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over pairs of the mean credit (seeded: the same data gives the same interval)."""
    if len(credit) == 0:
        raise ValueError("no pairs to resample")
    rng = np.random.default_rng(seed)
    means = credit[rng.integers(0, len(credit), (samples, len(credit)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def check_threshold_choice(validation: object, tie_threshold: object) -> None:
    """Exactly one of a validation split and a tie threshold (a number from 0 to 1, not NaN)."""
    if (validation is None) == (tie_threshold is None):
        raise ValueError("give a validation split to choose the tie threshold on, or a tie_threshold, not both")
    if tie_threshold is not None and (isinstance(tie_threshold, bool) or not isinstance(tie_threshold, (int, float))
                                      or not 0 <= tie_threshold <= 1):
        raise ValueError(f"tie_threshold is compared with |p1 - p0|: a number from 0 to 1, got {tie_threshold!r}")


@dataclass(frozen=True)
class PreferenceReport:
    accuracy: float
    accuracy_ties_excluded: float | None  # None when every pair is labelled a tie
    tie_threshold: float
    n_evaluated: int  # pairs in the accuracy
    label_counts: dict[str, int]
    interval: tuple[float, float]  # bootstrap, over pairs, of `accuracy`
    validation_accuracies: list[float] | None  # per THRESHOLDS candidate, when a validation split chose it

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "accuracy_ties_excluded": self.accuracy_ties_excluded,
                "tie_threshold": self.tie_threshold, "n_evaluated": self.n_evaluated, "label_counts": self.label_counts,
                "accuracy_ci95": list(self.interval), "validation_accuracies": self.validation_accuracies}


def preference_report(test_scores: np.ndarray, test_label_0: Sequence[float], *,
                      validation: tuple[np.ndarray, Sequence[float]] | None = None,
                      tie_threshold: float | None = None) -> PreferenceReport:
    """The paper's accuracy on a test split's pair scores ([N, 2]) and labels (label_0), with the tie
    threshold chosen on `validation` (its scores and label_0) or given; exactly one of the two."""
    check_threshold_choice(validation, tie_threshold)
    validation_accuracies = None
    if validation is not None:
        tie_threshold, validation_accuracies = choose_threshold(*pair_probs(validation[0]), label_kinds(validation[1]))
    p0, p1 = pair_probs(test_scores)
    labels = label_kinds(test_label_0)
    if len(labels) != len(p0):
        raise ValueError(f"{len(p0)} pairs of scores but {len(labels)} labels")
    credit = pair_credit(labels, predictions(p0, p1, tie_threshold))
    if len(credit) == 0:
        raise ValueError("no pairs to evaluate (an empty split)")
    decided = labels != "tie"
    excluded = float(pair_credit(labels[decided], predictions(p0[decided], p1[decided], 0)).mean()) if decided.any() else None
    return PreferenceReport(float(credit.mean()), excluded, tie_threshold, len(labels),
                            {kind: int((labels == kind).sum()) for kind in LABEL_KINDS},
                            bootstrap_interval(credit), validation_accuracies)
