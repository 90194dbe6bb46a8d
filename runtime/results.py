"""Result assembly: scores, preference probabilities, ranks and per-item errors for one prompt.

score = exp(logit_scale) * cos(text_emb, image_emb) and probs = softmax over one prompt's scored images,
exactly as the PickScore model card's `calc_probs`. A failed image keeps its row with its error; the
softmax runs over the others. Results carry the caller's `key` unchanged.
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


def scores_and_probs(scale: np.float32, text_emb: np.ndarray, image_embs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model card's calc_probs for one prompt: float32 scores and their softmax."""
    scores = (scale * (image_embs @ text_emb)).astype(np.float32)
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
        """One prompt's result. Rows of `image_embs` listed in `image_errors` are ignored."""
        ok = [j for j in range(len(image_names)) if j not in image_errors]
        scores = np.full(len(image_names), np.nan, np.float32)
        scores[ok] = scores_and_probs(self.logit_scale_exp, text_emb, image_embs[ok])[0]
        return self.assemble_scores(prompt, image_names, scores, image_errors, truncated, key)

    def assemble_scores(self, prompt: str, image_names: Sequence[str], scores: np.ndarray,
                        image_errors: Mapping[int, ImageError], truncated: bool = False, key: Any = None) -> PromptResult:
        """One prompt's result from scores already computed (a distributed job's second pass): probs and ranks
        over the scores not listed in `image_errors`."""
        rows = [ImageScore(name) for name in image_names]
        ok = [j for j in range(len(rows)) if j not in image_errors]
        kept = np.asarray(scores, np.float32)[ok]
        for j, s, p, r in zip(ok, kept, softmax(kept), ranks_of(kept)):
            rows[j].score, rows[j].prob, rows[j].rank = float(s), float(p), int(r)
        for j, e in image_errors.items():
            rows[j].error = e.reason
        return self._result(prompt, rows, truncated=truncated, key=key)

    def paired_scores(self, text_embs: np.ndarray, image_embs: np.ndarray) -> np.ndarray:
        """float32 [N]: image i scored against prompt i (an RL batch: one prompt per generation)."""
        return (self.logit_scale_exp * np.einsum("nd,nd->n", image_embs, text_embs)).astype(np.float32)

    def failed(self, prompt: Any, image_names: Sequence[str], error: str, key: Any = None) -> PromptResult:
        """A result for an item that could not be scored at all (bad prompt, bad input row)."""
        rows = [ImageScore(name, error=PROMPT_NOT_SCORED) for name in image_names]
        return self._result(prompt, rows, error=error, key=key)

    def _result(self, prompt: str, rows: list[ImageScore], **kw: Any) -> PromptResult:
        return PromptResult(prompt, rows, self.random_weights, backend=self.backend, precision=self.precision, **kw)
