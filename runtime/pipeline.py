"""Pipelined scoring for a stream of (prompt, images) work.

Images are decoded and preprocessed in a thread pool while the previous batch runs on the backend
(PIL and ONNX Runtime release the GIL). At most `max_in_flight` images are held, so memory is
bounded whatever the input size. Batches may span items; results come out in input order, each with
its own per-image errors.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import ImageError, PickScoreError
from .images import ImageInput, image_name
from .tokenizer import check_prompt

if TYPE_CHECKING:
    from .scorer import PickScorer, PromptResult

TEXT_BLOCK = 32  # items whose prompts are embedded together


@dataclass
class _Item:
    prompt: str
    images: Sequence[ImageInput]
    embs: np.ndarray
    remaining: int
    errors: dict[int, ImageError] = field(default_factory=dict)
    text_emb: np.ndarray | None = None
    truncated: bool = False
    error: str | None = None


class ScoringPipeline:
    def __init__(self, scorer: "PickScorer", batch_size: int | None = None, workers: int | None = None,
                 on_images_done: Callable[[int], None] | None = None):
        self.scorer = scorer
        self.batch_size = batch_size or scorer.backend.max_batch
        self.workers = workers or min(4, os.cpu_count() or 1)
        # Images queued or being prepared ahead of the batch that is running: the next two batches plus
        # one per worker, so the backend never waits on decoding. At most max_in_flight are held.
        self.max_pending = 2 * self.batch_size + self.workers
        self.max_in_flight = self.max_pending + self.batch_size
        self.on_images_done = on_images_done or (lambda n: None)

    def run(self, items: Iterable[tuple[str, Sequence[ImageInput]]]) -> Iterator["PromptResult"]:
        open_items: deque[_Item] = deque()
        for _ in self._drive(self._image_tasks(items, open_items)):
            yield from self._ready(open_items)
        yield from self._ready(open_items)

    def embed(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, dict[int, ImageError]]:
        """Embeddings [N, D] of `images` (rows of failed images are NaN) and each failure by index."""
        item = _Item("", list(images), np.full((len(images), self.scorer.embed_dim), np.nan, np.float32), len(images))
        for _ in self._drive((item, j) for j in range(len(item.images))):
            pass
        return item.embs, item.errors

    def _drive(self, tasks: Iterator[tuple[_Item, int]]) -> Iterator[None]:
        """Preprocess `tasks` in the pool and run them in batches; yields after each batch."""
        pending: deque[tuple[_Item, int, Future]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="pickscore-preprocess") as pool:
            def refill() -> None:
                while len(pending) < self.max_pending:
                    task = next(tasks, None)
                    if task is None:
                        return
                    item, j = task
                    pending.append((item, j, pool.submit(self.scorer._pixels, item.images[j], image_name(item.images[j], j))))

            refill()
            while pending:
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                refill()  # workers prepare the next batch while this one runs
                self._run_batch(batch)
                yield
            for _ in tasks:  # drain: registers trailing items that have no images
                pass

    def _image_tasks(self, items: Iterable, open_items: deque) -> Iterator[tuple[_Item, int]]:
        """Read items lazily, a block at a time: embed their prompts, register them, yield their images."""
        dim = self.scorer.embed_dim
        numbered = enumerate(items)
        while block := [x for x in (next(numbered, None) for _ in range(TEXT_BLOCK)) if x is not None]:
            made = [_Item(prompt, list(images), np.full((len(images), dim), np.nan, np.float32), len(images))
                    for _, (prompt, images) in block]
            valid = []
            for (index, _), item in zip(block, made):
                try:
                    valid.append(check_prompt(item.prompt, index))
                except PickScoreError as e:
                    item.error, item.remaining = str(e), 0
            embs, cut = self.scorer._embed_text_and_truncation(valid)
            by_prompt = dict(zip(valid, zip(embs, cut)))
            for item in made:
                if item.error is None:
                    item.text_emb, item.truncated = by_prompt[item.prompt]
                open_items.append(item)
                if item.error is None:
                    yield from ((item, j) for j in range(len(item.images)))

    def _run_batch(self, batch: list[tuple[_Item, int, Future]]) -> None:
        good, pixels = [], []
        for item, j, future in batch:
            try:
                pixels.append(future.result())
                good.append((item, j))
            except ImageError as e:
                item.errors[j] = e
                item.remaining -= 1
            except Exception as e:  # noqa: BLE001 - an unforeseen decoder failure is still one bad image
                item.errors[j] = ImageError(image_name(item.images[j], j), f"unexpected {type(e).__name__}: {e}")
                item.remaining -= 1
        if good:
            embs = self.scorer.backend.embed_images(np.stack(pixels))
            for (item, j), emb in zip(good, embs):
                item.embs[j] = emb
                item.remaining -= 1
        self.on_images_done(len(batch))

    def _ready(self, open_items: deque) -> Iterator["PromptResult"]:
        while open_items and open_items[0].remaining == 0:
            item = open_items.popleft()
            yield self.scorer._result_for(item.prompt, item.images, item.embs, item.errors, item.text_emb,
                                          item.truncated, item.error)
