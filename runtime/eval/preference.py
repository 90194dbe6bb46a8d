"""`pickscore eval preference` and its Python API: the Pick-a-Pic paper's preference accuracy of a scorer
on a test split, with the tie threshold chosen on a validation split (or given), from pair scores made by
the normal scoring path into resumable scores files (eval.scoring).

Every row of a split is accounted for: a pair that could not be scored (a broken image, no caption) or
judged (a bad label) is listed by row with its reason, counted in `n_errors`, and left out of the accuracy,
which says over how many pairs it is (`n_evaluated` of `n_pairs`). With several precisions, the pairs whose
prediction differs from the first precision's are listed (`flipped`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import InputError
from ..pipeline import WorkItem
from .accuracy import PreferenceReport, check_threshold_choice, label_kinds, pair_probs, predictions, preference_report
from .pickapic import Split
from .scoring import read_scores, score_work

@dataclass
class SplitScores:
    """A split's pairs after scoring: per row its caption, two scores (NaN where it has none) and label_0
    (NaN where it has none), and why each row left out of the accuracy is."""

    name: str
    rows: np.ndarray  # int [N], 1-based
    captions: list[Any]
    scores: np.ndarray  # float64 [N, 2]
    label_0: np.ndarray  # float64 [N]
    errors: dict[int, str]  # row -> reason (scoring or label)
    precision: str = ""  # as the scores file records it
    random_weights: bool = False

    @property
    def usable(self) -> np.ndarray:
        return np.array([int(r) not in self.errors for r in self.rows], dtype=bool)


def split_work(split: Split) -> Callable[[], Iterator[WorkItem]]:
    """The split's pairs as work items: one comparison of two images per row (a row that cannot be scored is
    an item with its error)."""
    def items() -> Iterator[WorkItem]:
        for pair in split.pairs():
            yield WorkItem(pair.row.prompt, pair.row.images if pair.row.error else pair.images, key=[pair.row],
                           error=pair.row.error)
    return items


def read_split_scores(path: Path, split: Split) -> SplitScores:
    """A finished scores file joined with the split's labels by row."""
    by_row: dict[int, list[dict]] = {}
    every = read_scores(path)
    for r in every:
        by_row.setdefault(int(r["row"]), []).append(r)
    labels = list(split.labels())
    n = len(labels)
    scores, label_0 = np.full((n, 2), np.nan), np.full(n, np.nan)
    captions: list[Any] = [None] * n
    errors: dict[int, str] = {}
    for i, label in enumerate(labels):
        row = label.row
        rows = by_row.get(row, [])
        captions[i] = rows[0]["prompt"] if rows else None
        scored = [r["score"] for r in rows]
        why = pair_error(row, rows)
        if why is None and (len(scored) != 2 or any(s is None for s in scored)):
            why = f"row {row}: not in the scores file {path} (it does not match the split)"
        elif why is None and not all(math.isfinite(s) for s in scored):
            why = f"row {row}: the scores file {path} holds a non-finite score for it (edited by hand?)"
        if why is not None:
            errors[row] = why
        else:
            scores[i] = scored
        if label.error is not None:
            errors[row] = label.error if row not in errors else f"{errors[row]}; {label.error.split(': ', 1)[1]}"
        else:
            label_0[i] = label.label_0
    first = next((r for r in every if r["precision"]), every[0] if every else {})
    return SplitScores(split.name, np.arange(1, n + 1), captions, scores, label_0, errors, first.get("precision") or "",
                       bool(first.get("random_weights")))


def pair_error(row: int, rows: list[dict]) -> str | None:
    """Why a pair has no scores, from its rows in a scores file: the pair's own error (both rows carry it),
    else the first image's that failed, naming its column."""
    errors = [r["error"] for r in rows]
    if not any(errors):
        return None
    if len(set(errors)) == 1:
        return errors[0] if errors[0].startswith(f"row {row}:") else f"row {row}: {errors[0]}"
    j, r = next((j, r) for j, r in enumerate(rows) if r["error"])
    return f"row {row}: jpg_{j} ({r['image']}): {r['error']}"


@dataclass
class PreferenceResult:
    """One scorer's evaluation: the paper's report over the usable pairs, and every pair left out."""

    backend: str
    precision: str
    random_weights: bool
    report: PreferenceReport
    test: SplitScores
    validation: SplitScores | None
    predictions: np.ndarray  # per usable test pair: "0", "1" or "tie" at the report's threshold
    p0: np.ndarray  # per usable test pair

    def errors(self) -> list[dict[str, Any]]:
        out = []
        for split in (self.test, self.validation):
            if split is not None:
                out += [{"split": split.name, "row": row, "error": why} for row, why in sorted(split.errors.items())]
        return out

    def to_json(self) -> dict[str, Any]:
        n_pairs = len(self.test.rows)
        return {"backend": self.backend, "precision": self.precision, "random_weights": self.random_weights,
                **self.report.to_json(), "n_pairs": n_pairs, "n_errors": len(self.test.errors),
                "validation_n_errors": len(self.validation.errors) if self.validation is not None else None,
                "errors": self.errors()}


def evaluate_scores(test: SplitScores, validation: SplitScores | None, tie_threshold: float | None, *,
                    backend: str = "") -> PreferenceResult:
    """The paper's accuracy over the usable pairs of `test` (threshold from `validation`'s usable pairs, or given)."""
    ok = test.usable
    if not ok.any():
        raise_no_pairs(test)
    valid = None
    if validation is not None:
        if not validation.usable.any():
            raise_no_pairs(validation)
        valid = (validation.scores[validation.usable], validation.label_0[validation.usable])
    report = preference_report(test.scores[ok], test.label_0[ok], validation=valid, tie_threshold=tie_threshold)
    p0, p1 = pair_probs(test.scores[ok])
    return PreferenceResult(backend, test.precision, test.random_weights, report, test, validation,
                            predictions(p0, p1, report.tie_threshold), p0)


def as_split(data: str | Path | Split, name: str) -> Split:
    return data if isinstance(data, Split) else Split(data, name)


def raise_no_pairs(split: SplitScores) -> None:
    first = next(iter(split.errors.values()), "")
    raise InputError(f"none of the {len(split.rows)} pair(s) of the {split.name} split could be evaluated "
                     f"(e.g. {first})")


def flipped_pairs(base: PreferenceResult, other: PreferenceResult) -> list[dict[str, Any]]:
    """Test pairs usable under both whose prediction differs (each at its own reported threshold)."""
    rows_base = base.test.rows[base.test.usable]
    rows_other = other.test.rows[other.test.usable]
    at_other = {int(r): i for i, r in enumerate(rows_other)}
    labels = label_kinds(base.test.label_0[base.test.usable])
    out = []
    for i, row in enumerate(rows_base):
        j = at_other.get(int(row))
        if j is not None and base.predictions[i] != other.predictions[j]:
            out.append({"row": int(row), "caption": base.test.captions[int(row) - 1], "label": str(labels[i]),
                        "prediction": {base.precision: str(base.predictions[i]), other.precision: str(other.predictions[j])},
                        "p0": {base.precision: float(base.p0[i]), other.precision: float(other.p0[j])}})
    return out


def preference_json(results: list[PreferenceResult], data: str, validation: str | None) -> dict[str, Any]:
    """The report: the first precision's figures at the top level (accuracy, accuracy_ties_excluded,
    tie_threshold, n_pairs, ...), every precision's in `by_precision`, with the pairs each flips against
    the first."""
    per = []
    for k, result in enumerate(results):
        doc = result.to_json()
        if k:
            doc["flipped"] = flipped_pairs(results[0], result)
            doc["accuracy_change"] = result.report.accuracy - results[0].report.accuracy
        per.append(doc)
    return {"data": data, "validation": validation, **per[0], "by_precision": per if len(per) > 1 else None}


def evaluate_preference(scorer: Any, data: str | Path | Split, *, validation: str | Path | Split | None = None,
                        tie_threshold: float | None = None, options: Any = None, work_dir: str | Path | None = None,
                        resume: bool = False, overwrite: bool = False, commit_rows: int = 2000,
                        until: Callable[[Iterable[WorkItem]], Iterator[WorkItem]] = iter,
                        progress: Callable[[str], None] = lambda message: None) -> PreferenceResult | None:
    """The paper's accuracy of an open `scorer` on Pick-a-Pic data (a Parquet file, folder or glob, or a
    datasets folder), with the tie threshold chosen on `validation` or given. `work_dir` keeps the per-pair
    scores (`<split>-<precision>.parquet`, resumable with resume=True); without it they are temporary.
    `options`: the ScorerOptions the scorer was opened with (recorded for --resume; default ScorerOptions()).
    None when `until` stopped it early (the committed scores are kept in work_dir)."""
    from ..options import ScorerOptions

    check_threshold_choice(validation, tie_threshold)
    splits = [as_split(data, "test")] + ([as_split(validation, "validation")] if validation is not None else [])
    for split in splits:
        split.check_labels()
    options = options or ScorerOptions()
    with tempfile.TemporaryDirectory(prefix="pickscore-eval-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        scored = []
        for split in splits:
            path = root / f"{split.name}-{scorer.backend.precision}.parquet"
            progress(f"scoring the {split.name} split ({split.n_rows} pairs) with {scorer.backend.name}/{scorer.backend.precision}")
            if not score_work(scorer, options, split_work(split), split.identity(), path, resume=resume, overwrite=overwrite,
                              commit_rows=commit_rows, total_images=2 * split.n_rows, until=until, progress=progress):
                return None
            scored.append(read_split_scores(path, split))
    return evaluate_scores(scored[0], scored[1] if len(scored) > 1 else None, tie_threshold, backend=scorer.backend.name)
