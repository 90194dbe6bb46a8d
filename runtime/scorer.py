"""PickScorer: prompts + images -> scores, preference probabilities and ranks.

score = exp(logit_scale) * cos(text_emb, image_emb) and probs = softmax over one prompt's images,
exactly as the PickScore model card's `calc_probs`. A bad image or prompt is reported in its result;
the rest of the batch is still scored.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .artifacts import Artifacts
from .backends import Backend, create_backend
from .errors import ImageError
from .images import ImageInput, image_name, open_image
from .preprocess import PreprocessConfig, Preprocessor
from .text_cache import TextEmbeddingCache, token_key
from .tokenizer import ClipTokenizer, check_prompt

log = logging.getLogger("pickscore")

RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS: these artifacts were exported from a randomly initialised model; scores are meaningless"


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
    error: str | None = None  # the prompt itself could not be scored
    backend: str = ""
    precision: str = ""

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.score if r.score is not None else np.nan for r in self.results], dtype=np.float64)

    @property
    def probs(self) -> np.ndarray:
        return np.array([r.prob if r.prob is not None else np.nan for r in self.results], dtype=np.float64)

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
    shifted = np.exp(scores - scores.max()) if len(scores) else scores
    return scores, (shifted / shifted.sum()).astype(np.float32)


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, best first; ties keep input order."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


@dataclass
class PickScorer:
    artifacts: Artifacts
    backend: Backend
    tokenizer: ClipTokenizer
    preprocessor: Preprocessor
    text_cache: TextEmbeddingCache
    apply_exif_orientation: bool = False

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike, backend: str = "auto", precision: str | None = None,
             hash_check: str = "full", threads: int | None = None, batch_size: int | None = None,
             apply_exif_orientation: bool = False, text_cache: str | os.PathLike | None = None,
             text_cache_size: int = 4096) -> "PickScorer":
        """Open an exported artifacts directory.

        hash_check="size" skips SHA-256 (existence and sizes are still checked). text_cache: a SQLite file
        that keeps text embeddings across runs and processes (an in-memory LRU of text_cache_size is always on).
        """
        artifacts = Artifacts.load(artifacts_dir, hash_check=hash_check)
        engine = create_backend(artifacts, backend, precision, threads=threads, max_batch=batch_size)
        scorer = cls.from_backend(artifacts, engine, text_cache, text_cache_size, apply_exif_orientation)
        if artifacts.random_weights:
            warnings.warn(f"{RANDOM_WEIGHTS_BANNER} ({artifacts.root})", RandomWeightsWarning, stacklevel=2)
        log.info("loaded %s on %s/%s", artifacts.root, scorer.backend.name, scorer.backend.precision)
        return scorer

    @classmethod
    def from_backend(cls, artifacts: Artifacts, backend: Backend, text_cache: str | os.PathLike | None = None,
                     text_cache_size: int = 4096, apply_exif_orientation: bool = False) -> "PickScorer":
        """A scorer around an already opened backend (benchmarks use this for the torch reference)."""
        tok = artifacts.manifest["tokenizer"]
        return cls(
            artifacts=artifacts,
            backend=backend,
            tokenizer=ClipTokenizer(artifacts.tokenizer_file, tok["max_length"], tok["pad_token"]),
            preprocessor=Preprocessor(PreprocessConfig.from_json(artifacts.manifest["preprocessing"])),
            text_cache=TextEmbeddingCache(f"{artifacts.fingerprint}:{backend.precision}", artifacts.manifest["dims"]["embed_dim"],
                                          capacity=text_cache_size, path=text_cache),
            apply_exif_orientation=apply_exif_orientation,
        )

    @property
    def random_weights(self) -> bool:
        return self.artifacts.random_weights

    # ---- embeddings ---------------------------------------------------------------------------
    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, D]; raises PromptError for an invalid prompt."""
        return self._embed_text_and_truncation(prompts)[0]

    def _embed_text_and_truncation(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Embeddings through the cache: only prompts whose token ids were never seen reach the tower."""
        prompts = [check_prompt(p, i) for i, p in enumerate(prompts)]
        embs, truncated = np.empty((len(prompts), self.embed_dim), np.float32), []
        for start in range(0, len(prompts), 256):
            batch = self.tokenizer(prompts[start : start + 256])
            keys = [token_key(row) for row in batch.input_ids]
            found = self.text_cache.get_many(keys)
            first_row = {k: i for i, k in reversed(list(enumerate(keys))) if k not in found}
            for rows in _chunks(list(first_row.values()), self.backend.max_batch):
                width = max(len(keys[i]) // 4 for i in rows)  # trailing columns are padding for every row
                computed = self.backend.embed_text(np.ascontiguousarray(batch.input_ids[rows, :width]))
                fresh = {keys[i]: emb for i, emb in zip(rows, computed)}
                self.text_cache.put_many(fresh)
                found.update(fresh)
            embs[start : start + len(keys)] = [found[k] for k in keys]
            truncated += batch.truncated
        return embs, truncated

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """L2-normalised image embeddings [N, D]; raises ImageError (naming the item) for a bad image."""
        from .pipeline import ScoringPipeline

        embs, errors = ScoringPipeline(self).embed(images)
        if errors:
            raise next(iter(errors.values()))
        return embs

    @property
    def embed_dim(self) -> int:
        return int(self.artifacts.manifest["dims"]["embed_dim"])

    def _pixels(self, item: ImageInput, name: str) -> np.ndarray:
        return self.preprocessor(open_image(item, name, self.apply_exif_orientation), name)

    # ---- scoring ------------------------------------------------------------------------------
    def score(self, prompt: str, images: Sequence[ImageInput]) -> PromptResult:
        """Score one prompt against its images. A bad prompt raises; a bad image is kept as an error row."""
        check_prompt(prompt)
        return self.score_batch([prompt], [images])[0]

    def score_batch(self, prompts: Sequence[str], image_lists: Iterable[Sequence[ImageInput]]) -> list[PromptResult]:
        """Score each prompt against its own list of images; errors are kept per prompt and per image."""
        image_lists = list(image_lists)
        if len(image_lists) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(image_lists)} image lists")
        return list(self.score_many(zip(prompts, image_lists)))

    def score_many(self, items: Iterable[tuple[str, Sequence[ImageInput]]], batch_size: int | None = None,
                   workers: int | None = None, on_images_done: Callable[[int], None] | None = None) -> Iterator[PromptResult]:
        """Stream (prompt, images) work through the pipelined scorer; yields results in input order."""
        from .pipeline import ScoringPipeline

        return ScoringPipeline(self, batch_size, workers, on_images_done).run(items)

    def _result_for(self, prompt: str, images: Sequence[ImageInput], embs: np.ndarray, errors: dict[int, ImageError],
                    text_emb: np.ndarray | None, truncated: bool, prompt_error: str | None) -> PromptResult:
        rows = [ImageScore(image_name(x, j)) for j, x in enumerate(images)]
        if prompt_error is not None:
            for row in rows:
                row.error = "prompt not scored"
            return self._result(prompt, rows, error=prompt_error)
        ok = [j for j in range(len(images)) if j not in errors]
        scores, probs = scores_and_probs(self.artifacts.logit_scale_exp, text_emb, embs[ok])
        for j, s, p, r in zip(ok, scores, probs, ranks_of(scores)):
            rows[j].score, rows[j].prob, rows[j].rank = float(s), float(p), int(r)
        for j, e in errors.items():
            rows[j].error = e.reason
        if truncated:
            log.warning("prompt %r is longer than %d tokens and was truncated (as the reference does)",
                        prompt[:60], self.tokenizer.max_length)
        return self._result(prompt, rows, truncated=truncated)

    def _result(self, prompt: str, rows: list[ImageScore], **kw: Any) -> PromptResult:
        return PromptResult(prompt, rows, self.random_weights, backend=self.backend.name,
                            precision=self.backend.precision, **kw)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]
