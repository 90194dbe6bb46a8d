"""Result assembly: scores, preference probabilities, ranks and per-item errors for one prompt.

score = exp(logit_scale) * cos(text_emb, image_emb) and probs = softmax over one prompt's scored images,
exactly as the PickScore model card's `calc_probs`. A failed image keeps its row with its error; the
softmax runs over the others. Results carry the caller's `key` unchanged.

No NaN or Inf leaves as a result: a tower output or a score that is not finite (a broken engine, an
overflow in fp16) makes its item an error naming the tower, checked here for every path that makes
results (the pipeline, the server, the Ray job, the RL reward) with `finite_rows` and `nonfinite_reasons`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ImageError

log = logging.getLogger("pickscore")

RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS: these artifacts were exported from a randomly initialised model; scores are meaningless"
PROMPT_NOT_SCORED = "prompt not scored"
VISION_NONFINITE = "the vision tower returned non-finite values (NaN or Inf) for this image"
TEXT_NONFINITE = "the text tower returned non-finite values (NaN or Inf) for this prompt"
SCORE_NONFINITE = "the score is not finite (NaN or Inf)"


class RandomWeightsWarning(UserWarning):
    """Artifacts built with --random-init: every code path is real, the scores are not."""


@dataclass
class ImageScore:
    image: str
    score: float | None = None
    prob: float | None = None
    rank: int | None = None  # 1 = preferred
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"image": self.image, "score": self.score, "prob": self.prob, "rank": self.rank}
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass
class PromptResult:
    prompt: str
    results: list[ImageScore]  # in input order
    random_weights: bool
    truncated: bool = False  # prompt exceeded 77 tokens and was cut, as the reference does
    error: str | None = None  # the prompt (or the whole item) could not be scored
    backend: str = ""
    precision: str = ""
    key: Any = field(default=None, compare=False)  # the caller's key for this item, returned unchanged

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.score if r.score is not None else np.nan for r in self.results], dtype=np.float64)

    @property
    def probs(self) -> np.ndarray:
        return np.array([r.prob if r.prob is not None else np.nan for r in self.results], dtype=np.float64)

    @property
    def n_failed(self) -> int:
        """Images without a score, or 1 for a failed item that has no images at all."""
        return sum(1 for r in self.results if r.error) or (1 if self.error else 0)

    def ranked(self) -> list[ImageScore]:
        scored = [r for r in self.results if r.rank is not None]
        return sorted(scored, key=lambda r: r.rank) + [r for r in self.results if r.rank is None]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "random_weights": self.random_weights,
                             "backend": self.backend, "precision": self.precision,
                             "results": [r.to_json() for r in self.results]}
        if self.truncated:
            d["truncated"] = True
        if self.error is not None:
            d["error"] = self.error
        return d

    def __repr__(self) -> str:
        flag = " [RANDOM WEIGHTS]" if self.random_weights else ""
        return f"PromptResult(prompt={self.prompt!r}, n_images={len(self.results)}{flag})"


def finite_rows(x: np.ndarray) -> np.ndarray:
    """bool [N]: whether row i of `x` (embeddings [N, D], or scores [N]) holds only finite values."""
    x = np.asarray(x)
    return np.isfinite(x).all(axis=tuple(range(1, x.ndim)))


def first_nonfinite_row(x: np.ndarray) -> int | None:
    """The index of the first row of `x` that is not all finite, or None."""
    bad = np.flatnonzero(~finite_rows(x))
    return int(bad[0]) if len(bad) else None


def nonfinite_reasons(text_embs: np.ndarray, image_embs: np.ndarray, scores: np.ndarray) -> list[str | None]:
    """Why score i (image_embs[i] against text_embs[i], or against text_embs when it is one embedding [D])
    is not a result, naming the tower that failed; None where it stands."""
    text_ok = np.broadcast_to(finite_rows(np.atleast_2d(text_embs)), len(scores))
    return [TEXT_NONFINITE if not text else VISION_NONFINITE if not image else SCORE_NONFINITE if not score else None
            for text, image, score in zip(text_ok, finite_rows(image_embs), finite_rows(scores))]


def prompt_scores(scale: np.float32, text_emb: np.ndarray, image_embs: np.ndarray) -> np.ndarray:
    """float32 scores of one prompt's images: exp(logit_scale) * cosine (the embeddings are unit norm)."""
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite row is reported by nonfinite_reasons
        return (scale * (image_embs @ text_emb)).astype(np.float32)


def scores_and_probs(scale: np.float32, text_emb: np.ndarray, image_embs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model card's calc_probs for one prompt: float32 scores and their softmax."""
    scores = prompt_scores(scale, text_emb, image_embs)
    return scores, softmax(scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max()) if len(scores) else scores
    return (shifted / shifted.sum()).astype(np.float32)


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, best first; ties keep input order."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def ranked_rows(image_names: Sequence[str], scores: np.ndarray, image_errors: Mapping[int, str]) -> list[ImageScore]:
    """One prompt's rows from its scores: probabilities (softmax) and ranks over the scores not listed in
    `image_errors` (index -> reason), which keep their row with that reason; a score that is not finite is
    its image's error. The logit scale is already in the scores: nothing here needs the model."""
    rows = [ImageScore(name) for name in image_names]
    scores = np.asarray(scores, np.float32)
    finite = finite_rows(scores)
    ok = [j for j in range(len(rows)) if j not in image_errors and finite[j]]
    kept = scores[ok]
    for j, s, p, r in zip(ok, kept, softmax(kept), ranks_of(kept)):
        rows[j].score, rows[j].prob, rows[j].rank = float(s), float(p), int(r)
    for j, row in enumerate(rows):
        if j in image_errors:
            row.error = image_errors[j]
        elif not finite[j]:
            row.error = SCORE_NONFINITE
    return rows


def unscored_rows(image_names: Sequence[str]) -> list[ImageScore]:
    """The rows of an item that could not be scored at all (bad prompt, bad input row)."""
    return [ImageScore(name, error=PROMPT_NOT_SCORED) for name in image_names]


@dataclass(frozen=True)
class ResultAssembler:
    """Turns embeddings (or errors) into a PromptResult labelled with the model and backend that made it."""

    logit_scale_exp: np.float32
    random_weights: bool
    backend: str
    precision: str

    def assemble(self, prompt: str, image_names: Sequence[str], image_embs: np.ndarray,
                 image_errors: Mapping[int, ImageError], text_emb: np.ndarray | None, truncated: bool = False,
                 key: Any = None) -> PromptResult:
        """One prompt's result. Rows of `image_embs` listed in `image_errors` are ignored; a non-finite row is
        that image's error, and a non-finite `text_emb` fails the whole item."""
        if text_emb is not None and not finite_rows(np.atleast_2d(text_emb))[0]:
            return self.failed(prompt, image_names, TEXT_NONFINITE, key=key)
        ok = [j for j in range(len(image_names)) if j not in image_errors]
        scores = np.full(len(image_names), np.nan, np.float32)
        scores[ok] = prompt_scores(self.logit_scale_exp, text_emb, image_embs[ok])
        errors = dict(image_errors)
        for j, why in zip(ok, nonfinite_reasons(text_emb, image_embs[ok], scores[ok])):
            if why is not None:
                errors[j] = ImageError(image_names[j], why)
        return self.assemble_scores(prompt, image_names, scores, errors, truncated, key)

    def assemble_scores(self, prompt: str, image_names: Sequence[str], scores: np.ndarray,
                        image_errors: Mapping[int, ImageError], truncated: bool = False, key: Any = None) -> PromptResult:
        """One prompt's result from scores already computed (a distributed job's second pass): probs and ranks
        over the scores not listed in `image_errors`; a score that is not finite is its image's error."""
        rows = ranked_rows(image_names, scores, {j: e.reason for j, e in image_errors.items()})
        return self._result(prompt, rows, truncated=truncated, key=key)

    def paired_scores(self, text_embs: np.ndarray, image_embs: np.ndarray) -> np.ndarray:
        """float32 [N]: image i scored against prompt i (an RL batch: one prompt per generation)."""
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite row is reported by nonfinite_reasons
            return (self.logit_scale_exp * np.einsum("nd,nd->n", image_embs, text_embs)).astype(np.float32)

    def paired_results(self, text_embs: np.ndarray, image_embs: np.ndarray,
                       failed: Mapping[int, str] | None = None) -> tuple[np.ndarray, list[str | None]]:
        """paired_scores, and per item why it has no score (None where it has one): its reason in `failed`
        (an image that could not be prepared), else a non-finite tower output or score. The scores are NaN
        exactly at the items with a reason."""
        failed = failed or {}
        scores = self.paired_scores(text_embs, image_embs)
        reasons = [failed.get(i) or why for i, why in enumerate(nonfinite_reasons(text_embs, image_embs, scores))]
        scores[[i for i, why in enumerate(reasons) if why is not None]] = np.nan
        return scores, reasons

    def failed(self, prompt: Any, image_names: Sequence[str], error: str, key: Any = None) -> PromptResult:
        """A result for an item that could not be scored at all (bad prompt, bad input row)."""
        return self._result(prompt, unscored_rows(image_names), error=error, key=key)

    def _result(self, prompt: str, rows: list[ImageScore], **kw: Any) -> PromptResult:
        return PromptResult(prompt, rows, self.random_weights, backend=self.backend, precision=self.precision, **kw)
