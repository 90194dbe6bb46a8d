"""PickScorer: the friendly facade over the stages. Prompts + images -> scores, preference
probabilities and ranks, exactly as the PickScore model card computes them.

    artifacts -> backend (backends.registry)
    prompts   -> TextEncoder (tokenise, cache, text tower)          } ScoringPipeline -> ResultAssembler
    images    -> ImagePreparer (decode, preprocess, per-item errors) }

A bad image or prompt is reported in its result; the rest is still scored. One scorer may be used
from several threads at once.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .artifacts import Artifacts
from .backends import Backend, open_backend, runnable_backend, select_backend
from .errors import ImageError, NonFiniteError, PromptError
from .image_preparer import ImagePreparer
from .images import ImageInput, image_name
from .inflight import embed_in_flight
from .options import ScorerOptions
from .pipeline import ScoringPipeline, WorkItem, default_workers
from .preprocess import Preprocessor
from .results import (RANDOM_WEIGHTS_BANNER, TEXT_NONFINITE, VISION_NONFINITE, PromptResult, RandomWeightsWarning,
                      ResultAssembler, first_nonfinite_row)
from .tensor_images import TensorPreparer, batch_length, is_tensor_batch
from .text_cache import TextEmbeddingCache
from .text_encoder import TextEncoder
from .tokenizer import ClipTokenizer, check_prompt

log = logging.getLogger("pickscore")
DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"


class PickScorer:
    def __init__(self, artifacts: Artifacts, backend: Backend, text: TextEncoder, images: ImagePreparer,
                 workers: int | None = None, backend_choice: str = ""):
        self.artifacts, self.backend, self.text, self.images = artifacts, backend, text, images
        self.workers = workers or default_workers()
        self.backend_choice = backend_choice  # why this backend/precision (e.g. what `auto` skipped)
        self.assembler = ResultAssembler(artifacts.logit_scale_exp, artifacts.random_weights, backend.name, backend.precision)
        self.tensors = TensorPreparer(images.preprocessor.config)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike, backend: str | None = None, precision: str | None = None, *,
             options: ScorerOptions | None = None, **settings: Any) -> "PickScorer":
        """Open an exported artifacts directory on a backend ("auto", the default: the fastest that can run
        here). `options`: a ScorerOptions; `settings`: any of its fields by name, flat (batch_size,
        threads, workers, hash_check, text_cache_file, text_cache_size, max_image_pixels, jpeg_draft,
        reducing_gap, apply_exif_orientation, and the backend's declared options), applied over `options`.
        Every setting is checked before the artifacts are read; an option no backend declares is refused."""
        options = cls._options(options, backend, precision, settings)
        artifacts = Artifacts.load(artifacts_dir, hash_check=options.hash_check)
        info, chosen, why = select_backend(artifacts, options.backend, options.precision)
        engine = open_backend(info, artifacts, chosen, **options.backend_kwargs())
        try:
            scorer = cls.from_backend(artifacts, engine, options, backend_choice=why)
        except BaseException:  # a tokenizer file that cannot be used, say: the sessions must not outlive the failure
            engine.close()
            raise
        if artifacts.random_weights:
            warnings.warn(f"{RANDOM_WEIGHTS_BANNER} ({artifacts.root})", RandomWeightsWarning, stacklevel=2)
        log.info("loaded %s on %s/%s (%s)", artifacts.root, engine.name, engine.precision, why)
        return scorer

    @staticmethod
    def _options(options: ScorerOptions | None, backend: str | None, precision: str | None,
                 settings: dict[str, Any]) -> ScorerOptions:
        named = {k: v for k, v in (("backend", backend), ("precision", precision)) if v is not None}
        return (options or ScorerOptions()).replace(**named, **settings)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, revision: str | None = None,
                        random_init: bool = False, seed: int = 0, stress: bool = False, backend: str | None = None,
                        precision: str | None = None, verify: bool = True,
                        progress: Callable[[str], None] | None = None, options: ScorerOptions | None = None,
                        **settings: Any) -> "PickScorer":
        """What `pickscore score --model` does: export `model` (a hub id, pinned to the commit `revision`
        resolves to, or a local folder) on first use into the user cache, with what the backend runs fast
        (CPU: fp32 + int8; GPU: fp32 + fp16), gate the fast precision against the PyTorch reference
        (verify=False skips it: auto then serves fp32), and open it with `load`. Later calls reuse the
        export; changed weights or a moved revision export again. Settings as `load` takes them, checked
        before the export. Needs the [export] extra."""
        from .export_cache import cached_artifacts, first_use_plan

        options = cls._options(options, backend, precision, settings)
        if options.backend != "auto":
            runnable_backend(options.backend)  # before minutes of export, not after
        precisions, gate_backend = first_use_plan(options.backend, options.precision)
        root = cached_artifacts(model, precisions, random_init=random_init, seed=seed, stress=stress, revision=revision,
                                gate=verify, gate_backend=gate_backend, progress=progress or log.warning)
        return cls.load(root, options=options)

    @classmethod
    def from_backend(cls, artifacts: Artifacts, backend: Backend, options: ScorerOptions | None = None, *,
                     backend_choice: str = "", **settings: Any) -> "PickScorer":
        """A scorer around an already opened backend (its backend, precision, batch and threads are the
        backend's own; the text cache, decoding and workers come from `options` / `settings`)."""
        options = cls._options(options, None, None, settings)
        dim, tokenizer = artifacts.embed_dim, artifacts.open_tokenizer()  # before the cache file opens
        cache = TextEmbeddingCache(f"{artifacts.fingerprint}:{backend.precision}", dim, capacity=options.text_cache_size,
                                   path=options.text_cache_file)
        text = TextEncoder(tokenizer, backend, cache, dim)
        images = ImagePreparer(Preprocessor(artifacts.preprocessing), **options.decode.preparer_options())
        return cls(artifacts, backend, text, images, options.workers, backend_choice)

    # ---- the stages, for callers that compose their own --------------------------------------
    @property
    def tokenizer(self) -> ClipTokenizer:
        return self.text.tokenizer

    @property
    def preprocessor(self) -> Preprocessor:
        return self.images.preprocessor

    @property
    def text_cache(self) -> TextEmbeddingCache:
        return self.text.cache

    @property
    def random_weights(self) -> bool:
        return self.artifacts.random_weights

    @property
    def embed_dim(self) -> int:
        return self.text.embed_dim

    def pipeline(self, batch_size: int | None = None, workers: int | None = None,
                 on_images_done: Callable[[int], None] | None = None, pool: ThreadPoolExecutor | None = None) -> ScoringPipeline:
        """A pipeline over this scorer's stages, on its shared decoding pool unless `pool` is given."""
        return ScoringPipeline(self.text, self.images, self.backend, self.assembler, pool or self._shared_pool(),
                               workers or self.workers, batch_size, on_images_done)

    def _shared_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pickscore-prepare")
            return self._pool

    # ---- embeddings ---------------------------------------------------------------------------
    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, D]; raises PromptError for an invalid prompt, or one the text
        tower returned non-finite."""
        prompts = list(prompts)
        embs = self.text.encode(prompts).embeddings
        bad = first_nonfinite_row(embs)
        if bad is not None:
            raise PromptError(f"prompt #{bad} ({prompts[bad][:60]!r}): {TEXT_NONFINITE}")
        return embs

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """L2-normalised image embeddings [N, D]; raises ImageError (naming the item) for a bad image, or
        one the vision tower returned non-finite."""
        images = list(images)
        embs, errors = self.pipeline().embed(images)
        if errors:
            raise next(iter(errors.values()))
        bad = first_nonfinite_row(embs)
        if bad is not None:
            raise ImageError(image_name(images[bad], bad), VISION_NONFINITE)
        return embs

    def embed_tensors(self, images: Any, mode: str = "exact", layout: str = "auto", quantize: str = "round") -> np.ndarray:
        """L2-normalised embeddings [N, D] of a batch that is already an array or tensor (see score_tensors);
        raises ImageError naming an item the vision tower returned non-finite. On a GPU backend a batch on
        the GPU stays there: preprocessing and the vision engine read it in place."""
        embs = self._tensor_embeddings(images, mode, layout, quantize)
        bad = first_nonfinite_row(embs)
        if bad is not None:
            raise ImageError(f"#{bad} (tensor)", VISION_NONFINITE)
        return embs

    def _tensor_embeddings(self, images: Any, mode: str = "exact", layout: str = "auto",
                           quantize: str = "round") -> np.ndarray:
        """embed_tensors without its check: rows the vision tower returned non-finite stay in, for callers
        that make them per-item errors (score_tensors, score)."""
        pixels = self.tensors(images, mode, layout, quantize)
        if not isinstance(pixels, np.ndarray) and not (self.backend.device == "cuda" and pixels.is_cuda):
            pixels = pixels.cpu().numpy()  # a CPU backend, or a CPU tensor
        return self.embed_pixels(pixels)

    def embed_pixels(self, pixels: Any) -> np.ndarray:
        """Embeddings [N, D] of preprocessed pixels [N, 3, S, S] (numpy, or a device array the backend
        binds), in the backend's batches; the next batch is submitted before the last is collected
        where the backend overlaps copies with compute (queue_depth 2 on GPUs). A stage, like the backend
        it drives: rows the vision tower returned non-finite are returned as they are, for the caller to
        make errors of (results.nonfinite_reasons)."""
        step = max(1, self.backend.batch_size)
        return np.concatenate(list(embed_in_flight(self.backend, (pixels[start:start + step]
                                                                  for start in range(0, len(pixels), step)))))

    # ---- scoring ------------------------------------------------------------------------------
    def score_tensors(self, prompts: str | Sequence[str], images: Any, mode: str = "exact",
                      layout: str = "auto", quantize: str = "round") -> np.ndarray:
        """The RL reward: per-image scores, float32 [N], for a batch that is already an array or tensor
        (numpy, torch on the CPU or a GPU, anything with DLPack; uint8 or float in [0, 1]; NCHW or NHWC;
        any size). `prompts`: one per image, or one for all. mode "exact" follows PIL's arithmetic (equal
        to scoring the same pixels from a PNG file); "fast" resizes with the device's bicubic + antialias.
        quantize: exact mode's float -> uint8 step in the batch's own dtype, "round" ((x * 255).round(), as
        saving an image) or "truncate" ((x * 255).to(uint8), as some trainers write it).
        Where a tower returns NaN or Inf for some items, raises NonFiniteError naming them; its `scores`
        holds the others' scores (NaN at its `failed` indices)."""
        n = batch_length(images) if hasattr(images, "shape") else len(images)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"one prompt per image (or one for all): {n} images but {len(prompts)} prompts")
        text = self.text.encode(prompts).embeddings  # first: a bad prompt fails before any image work
        scores, reasons = self.assembler.paired_results(text, self._tensor_embeddings(images, mode, layout, quantize))
        failed = {i: why for i, why in enumerate(reasons) if why is not None}
        if failed:
            raise NonFiniteError(failed, scores)
        return scores

    def score(self, prompt: str, images: Sequence[ImageInput] | Any, tensor_mode: str = "exact") -> PromptResult:
        """Score one prompt against its images. A bad prompt raises; a bad image is kept as an error row.
        `images` may also be one batch array or tensor (see score_tensors; tensor_mode is its mode)."""
        check_prompt(prompt)
        if is_tensor_batch(images):
            embs = self._tensor_embeddings(images, tensor_mode)
            encoded = self.text.encode([prompt])
            return self.assembler.assemble(prompt, [f"#{i} (tensor)" for i in range(len(embs))], embs, {},
                                           encoded.embeddings[0], encoded.truncated[0])
        return next(self.score_many([WorkItem(prompt, images)]))

    def score_batch(self, prompts: Sequence[str], image_lists: Iterable[Sequence[ImageInput]]) -> list[PromptResult]:
        """Score each prompt against its own list of images; errors are kept per prompt and per image."""
        image_lists = list(image_lists)
        if len(image_lists) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(image_lists)} image lists")
        return list(self.score_many(WorkItem(p, imgs) for p, imgs in zip(prompts, image_lists)))

    def score_many(self, items: Iterable[WorkItem | tuple], batch_size: int | None = None, workers: int | None = None,
                   on_images_done: Callable[[int], None] | None = None) -> Iterator[PromptResult]:
        """Stream work through the pipelined scorer; yields results in input order. Items are WorkItem or
        (prompt, images[, key]) tuples; each result carries its item's key. workers other than the
        scorer's own run on a pool made for this call."""
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if workers is None or workers == self.workers:
            yield from self.pipeline(batch_size, on_images_done=on_images_done).run(items)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="pickscore-prepare") as pool:
            yield from self.pipeline(batch_size, workers, on_images_done, pool).run(items)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the backend, the decoding threads and the text cache file. Idempotent."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.text.cache.close()
        self.backend.close()

    def __enter__(self) -> "PickScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        flag = " RANDOM WEIGHTS" if self.random_weights else ""
        return f"<PickScorer {self.artifacts.root} on {self.backend.name}/{self.backend.precision}{flag}>"
