"""One serving process (or Ray Serve replica): the scorer's stages, the micro-batcher over them, the
admission queue and the lifecycle loading -> ready -> draining (or failed).

Loading can run in the background (`start_loading`), so /healthz answers while large artifacts are
hashed and the towers warmed up, and /readyz turns ready only after a first batch has gone through.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import PromptError
from ..results import RandomWeightsWarning
from ..scorer import PickScorer
from .batcher import BatcherClosed, EmbedJob, MicroBatcher
from .config import ServerConfig
from .http_errors import BadRequest, ShuttingDown, TimedOut, Unavailable
from .metrics import ServerMetrics
from .protocols import Context

log = logging.getLogger("pickscore")

WARM_UP_PROMPT = "a warm-up prompt"
WARM_UP_TIMEOUT_S = 600.0


def warm_up_image() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class PickScoreService:
    def __init__(self, config: ServerConfig, on_ready: Callable[["PickScoreService"], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.config = config
        self.metrics = ServerMetrics()
        self.state = "loading"  # loading | ready | draining | failed
        self.error: BaseException | None = None
        self.scorer: PickScorer | None = None
        self.batcher: MicroBatcher | None = None
        self.context: Context | None = None
        self.on_ready, self.on_failure = on_ready, on_failure
        self._pool: ThreadPoolExecutor | None = None
        self._open = 0  # requests admitted and not yet answered
        self.cut_short = 0  # requests still running at the drain deadline, answered 503 instead
        self._lock = threading.Lock()
        self._rate = 0.0  # images/s over recent batches, for Retry-After

    # ---- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the artifacts, start the batcher and push one batch through it. Raises on failure."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)  # said once, by whoever starts the server
                scorer = PickScorer.load(self.config.artifacts, options=self.config.scorer)
            # The context first: /readyz may describe the service from another thread as soon as `scorer` is set.
            self.context = Context(scorer.assembler, scorer.tokenizer, scorer.artifacts.model_name, scorer.embed_dim,
                                   self.config.reward_divide_by)
            self.scorer = scorer
            self._pool = ThreadPoolExecutor(scorer.workers, thread_name_prefix="pickscore-decode")
            self.batcher = MicroBatcher(scorer.text, scorer.images, scorer.backend, self._pool,
                                        max_batch=scorer.backend.batch_size, max_wait_s=self.config.max_wait_ms / 1000,
                                        workers=scorer.workers, on_batch=self._observe_batch).start()
            self.metrics.watch(self.batcher.pending_images, scorer.text_cache)
            sizes = {1, scorer.backend.batch_size} if scorer.backend.device == "cuda" else {1}  # engines: both ends
            for n in sorted(sizes):
                job = self.batcher.submit([WARM_UP_PROMPT], [warm_up_image()] * n)
                # not a request: a short --request-timeout-s must not fail a start on a loaded machine
                job.future.result(timeout=max(self.config.request_timeout_s, WARM_UP_TIMEOUT_S))
                if job.errors:
                    raise RuntimeError(f"warm-up failed: {next(iter(job.errors.values()))}")
        except BaseException as e:
            self.state, self.error = "failed", e
            if self.on_failure is not None:
                self.on_failure(e)
            raise
        self.state = "ready"
        self.metrics.ready.set(1)
        if self.on_ready is not None:
            self.on_ready(self)

    def start_loading(self) -> threading.Thread:
        """load() in a background thread; a failure is recorded (and reported to on_failure)."""

        def run() -> None:
            with contextlib.suppress(BaseException):
                self.load()

        thread = threading.Thread(target=run, name="pickscore-load", daemon=True)
        thread.start()
        return thread

    def begin_drain(self) -> None:
        """Stop admitting requests (readiness turns 503); those admitted are still answered."""
        if self.state == "ready":
            self.state = "draining"
            self.metrics.ready.set(0)

    def close(self) -> None:
        """Answer every admitted request, then release the batcher, decoding threads and backend."""
        self.begin_drain()
        if self.batcher is not None:
            self.batcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.scorer is not None:
            self.scorer.close()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def describe(self) -> dict:
        d = {"status": self.state}
        if self.scorer is not None:
            backend = self.scorer.backend
            d.update(backend=backend.name, precision=backend.precision, device=backend.device,
                     max_batch=backend.batch_size, random_weights=self.scorer.random_weights, model=self.context.model)
        if self.error is not None:
            d["error"] = f"{type(self.error).__name__}: {self.error}"
        return d

    # ---- requests --------------------------------------------------------------------------------
    def check_open(self) -> None:
        """503 now, before the body is read, if the request could not be admitted anyway."""
        with self._lock:
            self._refuse_unless_room(arrived_ready=False)

    def _refuse_unless_room(self, arrived_ready: bool) -> None:
        if self.state != "ready" and not (arrived_ready and self.state == "draining"):
            raise Unavailable(f"not ready: {self.state}", retry_after_s=5 if self.state == "loading" else 1)
        if self._open >= self.config.max_queue:
            raise Unavailable(f"queue full ({self._open} requests in flight); retry later", self._retry_after())

    @contextlib.contextmanager
    def admitted(self, arrived_ready: bool = False) -> Iterator[None]:
        """Hold one place in the bounded queue for the duration of a request, or raise 503. arrived_ready: the
        request arrived (check_open passed) before a drain began, so a drain does not refuse it."""
        with self._lock:
            self._refuse_unless_room(arrived_ready)
            self._open += 1
            self.metrics.queue_depth.set(self._open)
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self.metrics.queue_depth.set(self._open)

    async def embed(self, prompts: Sequence[str], images: Sequence[bytes], image_index: Sequence[int]) -> EmbedJob:
        """Run a request's prompts and images through the batcher; 504 after the request timeout, 400 for
        a prompt the tokenizer refuses (tokenised in a worker thread: only this request waits for it)."""
        loop = asyncio.get_running_loop()
        try:
            job = await loop.run_in_executor(None, self.batcher.submit, prompts, images, image_index)
        except PromptError as e:
            raise BadRequest(str(e)) from None
        except BatcherClosed:
            raise ShuttingDown("the server is shutting down; send the request again") from None
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            self.batcher.cancel(job)
            raise TimedOut(f"not answered within the request timeout ({self.config.request_timeout_s:g} s)") from None
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        scored = len(images) - len(job.errors)
        self.metrics.images.labels("scored").inc(scored)
        self.metrics.images.labels("failed").inc(len(job.errors))
        return job

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.observe_batch(size, seconds)
        if seconds > 0:
            self._rate = 0.8 * self._rate + 0.2 * size / seconds if self._rate else size / seconds

    def _retry_after(self) -> int:
        """Seconds until the backlog is likely worked off, from the recent throughput (1 to 60)."""
        backlog = self.batcher.pending_images() if self.batcher is not None else 0
        return int(min(60, max(1, round(backlog / self._rate)) if self._rate else 1))

