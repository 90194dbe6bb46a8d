"""Dynamic batching across requests, composed from the runtime's stages.

Each request becomes a job: its prompts, tokenised on the submitting thread (so the batcher thread
never meets raw text), and its encoded images. Images are prepared (decoded, preprocessed) by the
ImagePreparer in a thread pool, a bounded number ahead of the backend, taken round-robin across jobs
so that a request of a thousand images cannot starve a request of one. One batcher thread owns the
backend, so there is one backend call at a time: it embeds the prompts of newly admitted jobs together
(the TextEncoder deduplicates and caches them across requests), and fills image batches from every
job's prepared images, again round-robin, up to `max_batch`, waiting at most `max_wait_s` after the
first one is ready for images still being prepared. A job is done when its prompts and all its images
are.

One bad item never fails another: an image that cannot be prepared is an error of its own job; a
backend call that fails is re-run one item at a time (prompts job by job, images one by one), so only
the item that fails it is failed. Backends that keep two batches in flight (the GPU ones) get the next
batch submitted before the previous one is collected.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..backends.base import Backend, PendingEmbeddings
from ..errors import ImageError
from ..image_preparer import ImagePreparer, PreparedImage
from ..images import image_name
from ..inflight import InFlight
from ..text_encoder import EncodedPrompts, TextEncoder, TokenizedPrompts


@dataclass(eq=False)
class EmbedJob:
    """One request's work. When `future` resolves (to the job itself), `text` holds its prompts'
    embeddings and `image_embs` its images' (NaN rows where `errors` says why not)."""

    prompts: list[str]
    images: list[bytes | np.ndarray]  # encoded, or uint8 pixels
    image_index: list[int]  # how each image is named in errors: its position in the caller's item
    image_embs: np.ndarray
    tokens: TokenizedPrompts
    future: Future = field(default_factory=Future)
    text: EncodedPrompts | None = None
    errors: dict[int, ImageError] = field(default_factory=dict)
    remaining: int = 0
    handed_out: int = 0  # images given to the preparation pool so far
    cancelled: bool = False
    done: bool = False


@dataclass
class _Ready:
    job: EmbedJob
    j: int
    pixels: np.ndarray
    at: float


class BatcherClosed(RuntimeError):
    pass


class MicroBatcher:
    def __init__(self, text: TextEncoder, images: ImagePreparer, backend: Backend, pool: Executor, *,
                 max_batch: int, max_wait_s: float, workers: int, on_batch: Callable[[int, float], None] | None = None):
        self.text, self.images, self.backend, self.pool = text, images, backend, pool
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        # Images being prepared or prepared and waiting: two batches ahead plus one per worker, as the
        # pipeline does, so the backend never waits on decoding and memory stays bounded.
        self.max_prepared = 2 * max_batch + workers
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._cond = threading.Condition(threading.RLock())  # re-entrant: a finished future's callback may run inline
        self._new: list[EmbedJob] = []  # admitted; prompts not embedded yet
        self._to_prepare: deque[EmbedJob] = deque()  # jobs with images not handed out yet, served in turn
        self._preparing = 0
        self._ready: deque[_Ready] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pickscore-batcher", daemon=True)

    # ---- the caller's side ----------------------------------------------------------------------
    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    def submit(self, prompts: Sequence[str], images: Sequence[bytes | np.ndarray], image_index: Sequence[int] | None = None) -> EmbedJob:
        """Queue a job. Images are encoded bytes or uint8 arrays (cosmos-rl sends pixels) only: nothing here
        ever opens a path. The prompts are tokenised here, on the caller's thread: PromptError (naming the
        prompt) before anything is queued."""
        if not all(isinstance(x, (bytes, bytearray)) or (isinstance(x, np.ndarray) and x.dtype == np.uint8) for x in images):
            raise TypeError("the batcher takes encoded image bytes or uint8 arrays only")
        tokens = self.text.tokenize(prompts)
        job = EmbedJob(list(prompts), list(images), list(image_index if image_index is not None else range(len(images))),
                       np.full((len(images), self.text.embed_dim), np.nan, np.float32), tokens, remaining=len(images))
        job.future.set_running_or_notify_cancel()  # admitted work is always answered: it cannot be cancelled away
        with self._cond:
            if self._stopping:
                raise BatcherClosed("the server is shutting down")
            self._new.append(job)
            if job.images:
                self._to_prepare.append(job)
            self._top_up()
            self._cond.notify_all()
        return job

    def cancel(self, job: EmbedJob) -> None:
        """Drop a job's work not started yet (its caller gave up on it)."""
        with self._cond:
            job.cancelled = True
            self._forget(job)

    def pending_images(self) -> int:
        with self._cond:
            waiting = sum(len(job.images) - job.handed_out for job in self._to_prepare)
            return waiting + self._preparing + len(self._ready)

    def close(self) -> None:
        """Finish every job submitted so far, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # ---- preparation (pool threads) ------------------------------------------------------------
    def _top_up(self) -> None:
        while self._to_prepare and self._preparing + len(self._ready) < self.max_prepared:
            job = self._to_prepare.popleft()
            j, job.handed_out = job.handed_out, job.handed_out + 1
            if job.handed_out < len(job.images):
                self._to_prepare.append(job)  # to the back: the next image is the next job's
            self._preparing += 1
            future = self.pool.submit(self.images.prepare, job.images[j], job.image_index[j])
            future.add_done_callback(lambda f, job=job, j=j: self._prepared(job, j, f))

    def _prepared(self, job: EmbedJob, j: int, future: Future) -> None:
        try:
            prepared: PreparedImage = future.result()
        except Exception as e:  # noqa: BLE001 - prepare reports per-item errors; anything else is still this image's
            name = image_name(job.images[j], job.image_index[j])
            prepared = PreparedImage(name, None, ImageError(name, f"unexpected {type(e).__name__}: {e}"))
        with self._cond:
            self._preparing -= 1
            if not job.cancelled and not job.done:
                if prepared.error is None:
                    self._ready.append(_Ready(job, j, prepared.pixels, time.monotonic()))
                else:
                    job.errors[j] = prepared.error
                    job.remaining -= 1
                    self._finish_if_complete(job)
            self._top_up()
            self._cond.notify_all()

    # ---- the batcher thread: the only one that calls the backend -------------------------------
    def _run(self) -> None:
        submitted: InFlight[tuple[list[_Ready], float]] = InFlight(self.backend.queue_depth)
        while True:
            with self._cond:
                while not (self._new or self._ready or submitted or (self._stopping and self._idle())):
                    self._cond.wait()
                if self._stopping and self._idle() and not submitted:
                    return
                new, self._new = self._new, []
            if new:
                self._embed_prompts(new)
            with self._cond:
                batch = self._take_batch(wait=not submitted) if self._ready else []
            if batch:
                started = time.perf_counter()
                try:
                    submitted.put((batch, started), self.backend.submit_images(np.stack([r.pixels for r in batch])))
                except Exception as e:  # noqa: BLE001 - one image may have failed the call: find it
                    self._one_by_one(batch, e)
            # a new batch leaves the older ones the backend overlaps with it in flight; no new batch: collect all
            for (done, started), handle in (submitted.due() if batch else submitted.drain()):
                self._collect(done, handle, started)

    def _idle(self) -> bool:
        return not (self._new or self._to_prepare or self._preparing or self._ready)

    def _take_batch(self, wait: bool) -> list[_Ready]:
        """Up to max_batch prepared images, one per job in turn (each job's oldest first). While images admitted are still being prepared,
        waits for them up to max_wait_s after the oldest ready one; it never waits on requests that have
        not arrived (a lone client's request goes at once; under load, images pile up while a batch runs)."""
        if wait:
            deadline = self._ready[0].at + self.max_wait_s
            while (len(self._ready) < self.max_batch and (self._to_prepare or self._preparing)
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
        by_job: dict[EmbedJob, deque[_Ready]] = {}
        for r in self._ready:
            by_job.setdefault(r.job, deque()).append(r)
        batch: list[_Ready] = []
        while len(batch) < self.max_batch and by_job:
            for job in list(by_job):
                batch.append(by_job[job].popleft())
                if not by_job[job]:
                    del by_job[job]
                if len(batch) == self.max_batch:
                    break
        taken = {id(r) for r in batch}
        self._ready = deque(r for r in self._ready if id(r) not in taken)
        self._top_up()  # room for the next images to be prepared while this batch runs
        return batch

    def _collect(self, batch: list[_Ready], handle: PendingEmbeddings, started: float) -> None:
        try:
            embs = handle.result()
        except Exception as e:  # noqa: BLE001 - one image may have failed the call: find it
            self._one_by_one(batch, e)
            return
        self.on_batch(len(batch), time.perf_counter() - started)
        with self._cond:
            for r, emb in zip(batch, embs):
                self._image_done(r, emb)

    def _one_by_one(self, batch: list[_Ready], error: Exception) -> None:
        """Re-run a failed image batch one image at a time: the images that fail alone are errors of their
        own jobs (with what the backend said), and every other image in the batch is embedded as usual."""
        for r in batch:
            try:
                emb = self.backend.embed_images(r.pixels[None])[0]
            except Exception as e:  # noqa: BLE001 - whatever the backend raises is this image's error
                name = image_name(r.job.images[r.j], r.job.image_index[r.j])
                emb, failure = None, ImageError(name, f"the vision tower failed on it ({type(e).__name__}: {e})")
            with self._cond:
                if emb is None:
                    if not r.job.done:
                        r.job.errors[r.j] = failure
                        r.job.remaining -= 1
                        self._finish_if_complete(r.job)
                else:
                    self._image_done(r, emb)

    def _image_done(self, r: _Ready, emb: np.ndarray) -> None:
        if r.job.done:
            return
        r.job.image_embs[r.j] = emb
        r.job.remaining -= 1
        self._finish_if_complete(r.job)

    def _embed_prompts(self, jobs: list[EmbedJob]) -> None:
        live = [job for job in jobs if not job.cancelled]
        if not live:
            return
        try:
            encoded = self.text.embed(TokenizedPrompts.concat([job.tokens for job in live]))
        except Exception as e:  # noqa: BLE001 - re-run job by job: only the jobs that fail alone are failed
            if len(live) == 1:
                self._fail(set(live), e)
            else:
                for job in live:
                    self._embed_prompts([job])
            return
        with self._cond:
            at = 0
            for job in live:
                n = len(job.tokens.keys)
                job.text = EncodedPrompts(encoded.embeddings[at : at + n], encoded.truncated[at : at + n])
                at += n
                self._finish_if_complete(job)

    def _finish_if_complete(self, job: EmbedJob) -> None:
        if not job.done and job.text is not None and job.remaining == 0:
            job.done = True
            job.future.set_result(job)

    def _fail(self, jobs: set[EmbedJob], error: Exception) -> None:
        with self._cond:
            for job in jobs:
                if not job.done:
                    job.done = True
                    self._forget(job)
                    job.future.set_exception(error)

    def _forget(self, job: EmbedJob) -> None:
        self._ready = deque(r for r in self._ready if r.job is not job)
        self._to_prepare = deque(t for t in self._to_prepare if t is not job)
        if job in self._new:
            self._new.remove(job)
        self._cond.notify_all()
