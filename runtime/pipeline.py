"""Pipelined scoring of a stream of work items, composed from the stages.

Images are prepared (decoded, preprocessed) in a thread pool while earlier batches run on the backend
(PIL and ONNX Runtime release the GIL). A backend with `queue_depth` 2 (the GPU ones) gets the next
batch submitted before the previous one is collected, so its host->device copy overlaps compute. At
most `max_pending + batch_size * queue_depth` images are held, whatever the input size, and the pixels
being decoded at once are bounded by the image preparer's pixel budget. Batches may span items;
results come out in input order, each carrying its item's key and its own per-image errors.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .backends.base import Backend, PendingEmbeddings
from .errors import ImageError, PickScoreError
from .image_preparer import ImagePreparer, PreparedImage
from .images import ImageInput, image_name
from .inflight import InFlight
from .results import PromptResult, ResultAssembler
from .text_encoder import TextEncoder
from .tokenizer import check_prompt

TEXT_BLOCK = 32  # items whose prompts are embedded together


@dataclass
class WorkItem:
    """One comparison: a prompt and its images. `key` comes back on the result unchanged. An item with
    `error` set (a bad input row) is not scored; its result carries the error."""

    prompt: Any
    images: Sequence[ImageInput]
    key: Any = None
    error: str | None = None


def as_work_item(item: WorkItem | tuple) -> WorkItem:
    if isinstance(item, WorkItem):
        return item
    if isinstance(item, tuple) and len(item) in (2, 3):
        return WorkItem(*item)
    raise TypeError(f"work items are WorkItem or (prompt, images[, key]) tuples, got {type(item).__name__}")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class _Open:
    """An item whose images are in flight."""

    work: WorkItem
    images: list[ImageInput]
    embs: np.ndarray
    remaining: int
    errors: dict[int, ImageError] = field(default_factory=dict)
    text_emb: np.ndarray | None = None
    truncated: bool = False
    error: str | None = None

    @classmethod
    def of(cls, work: WorkItem, dim: int) -> "_Open":
        images = list(work.images)
        return cls(work, images, np.full((len(images), dim), np.nan, np.float32), len(images), error=work.error)


class ScoringPipeline:
    def __init__(self, text: TextEncoder, images: ImagePreparer, backend: Backend, assembler: ResultAssembler,
                 pool: Executor, workers: int, batch_size: int | None = None,
                 on_images_done: Callable[[int], None] | None = None):
        self.text, self.images, self.backend, self.assembler, self.pool = text, images, backend, assembler, pool
        self.batch_size = batch_size or backend.batch_size
        if self.batch_size < 1:
            raise PickScoreError(f"batch size must be at least 1, got {self.batch_size}")
        # Images queued or being prepared ahead of the batches on the backend: the next two batches plus
        # one per worker, so the backend never waits on decoding.
        self.max_pending = 2 * self.batch_size + workers
        self.max_in_flight = self.max_pending + self.batch_size * max(1, backend.queue_depth)
        self.on_images_done = on_images_done or (lambda n: None)

    def run(self, items: Iterable[WorkItem | tuple]) -> Iterator[PromptResult]:
        open_items: deque[_Open] = deque()
        for _ in self._drive(self._image_tasks(items, open_items)):
            yield from self._ready(open_items)
        yield from self._ready(open_items)

    def embed(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, dict[int, ImageError]]:
        """Embeddings [N, D] of `images` (rows of failed images are NaN) and each failure by index."""
        item = _Open.of(WorkItem("", images), self.text.embed_dim)
        for _ in self._drive((item, j) for j in range(len(item.images))):
            pass
        return item.embs, item.errors

    def _drive(self, tasks: Iterator[tuple[_Open, int]]) -> Iterator[None]:
        """Prepare `tasks` in the pool and run them in batches; yields after each finished batch."""
        pending: deque[tuple[_Open, int, Future]] = deque()
        submitted: InFlight[list[tuple[_Open, int]]] = InFlight(self.backend.queue_depth)

        def refill() -> None:
            while len(pending) < self.max_pending:
                task = next(tasks, None)
                if task is None:
                    return
                item, j = task
                pending.append((item, j, self.pool.submit(self.images.prepare, item.images[j], j)))

        refill()
        while pending:
            batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
            refill()  # workers prepare the next batches while this one runs
            good, pixels = [], []
            for item, j, future in batch:
                prepared: PreparedImage = future.result()
                if prepared.error is None:
                    good.append((item, j))
                    pixels.append(prepared.pixels)
                else:
                    item.errors[j] = prepared.error
                    item.remaining -= 1
            if len(good) < len(batch):
                self.on_images_done(len(batch) - len(good))
            if good:
                submitted.put(good, self.backend.submit_images(np.stack(pixels)))
            for done in submitted.due():
                self._finish(*done)
                yield
            if not good:
                yield  # items whose images all failed may be complete now
        for done in submitted.drain():
            self._finish(*done)
            yield
        for _ in tasks:  # drain: registers trailing items that have no images
            pass

    def _finish(self, good: list[tuple[_Open, int]], handle: PendingEmbeddings) -> None:
        for (item, j), emb in zip(good, handle.result()):
            item.embs[j] = emb
            item.remaining -= 1
        self.on_images_done(len(good))

    def _image_tasks(self, items: Iterable[WorkItem | tuple], open_items: deque) -> Iterator[tuple[_Open, int]]:
        """Read items lazily, a block at a time: embed their prompts, register them, yield their images."""
        numbered = enumerate(items)
        while block := [x for x in (next(numbered, None) for _ in range(TEXT_BLOCK)) if x is not None]:
            made = [_Open.of(as_work_item(work), self.text.embed_dim) for _, work in block]
            valid = []
            for (index, _), item in zip(block, made):
                if item.error is not None:
                    item.remaining = 0
                    continue
                try:
                    valid.append(check_prompt(item.work.prompt, index))
                except PickScoreError as e:
                    item.error, item.remaining = str(e), 0
            encoded = self.text.encode(valid)
            by_prompt = dict(zip(valid, zip(encoded.embeddings, encoded.truncated)))
            for item in made:
                if item.error is None:
                    item.text_emb, item.truncated = by_prompt[item.work.prompt]
                open_items.append(item)
                if item.error is None:
                    yield from ((item, j) for j in range(len(item.images)))

    def _ready(self, open_items: deque[_Open]) -> Iterator[PromptResult]:
        while open_items and open_items[0].remaining == 0:
            item = open_items.popleft()
            work = item.work
            names = [image_name(x, j) for j, x in enumerate(item.images)]
            if item.error is not None:
                yield self.assembler.failed(work.prompt, names, item.error, key=work.key)
            else:
                yield self.assembler.assemble(work.prompt, names, item.embs, item.errors, item.text_emb,
                                              item.truncated, key=work.key)
