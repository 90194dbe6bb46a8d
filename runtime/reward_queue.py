"""A reward that does not block the training step: `submit(images, prompts) -> Future`, scored in the
background while the trainer goes on with its next rollout.

One worker thread takes the submitted batches first in, first out, so futures finish in the order they
were submitted, each exactly once. The queue is bounded: `submit` blocks (back-pressure) while
`max_pending` batches are submitted and not yet finished, or raises `QueueFull` after `timeout`
seconds. A batch is copied when it is submitted (a torch tensor is detached and cloned on its own device,
a numpy array copied, a list's items kept), so a trainer may reuse or update its buffers at once.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from .device_arrays import is_torch_tensor
from .errors import PickScoreError

DEFAULT_MAX_PENDING = 4


class QueueFull(PickScoreError):
    """`submit(..., timeout=T)` found the queue still full after T seconds."""


class QueueClosed(PickScoreError):
    """`submit` after `close()`."""


def snapshot(images: Any) -> Any:
    """The batch as it is now, safe from the caller's later writes. On a GPU the clone is queued on the
    caller's current stream; the worker waits for it with an event (`SubmittedBatch.ready`), not the host."""
    if isinstance(images, np.ndarray):
        return images.copy()
    if is_torch_tensor(images):
        return images.detach().clone()
    if hasattr(images, "__dlpack__"):
        return images  # a foreign device array: read when scored (documented: do not overwrite it before)
    return list(images)


class SubmittedBatch:
    def __init__(self, images: Any, prompts: Any, metadata: Any):
        self.images, self.prompts, self.metadata = snapshot(images), prompts if isinstance(prompts, str) else list(prompts), metadata
        self.submitted_at = time.perf_counter()
        self._event = None
        if is_torch_tensor(self.images) and self.images.is_cuda:
            import torch

            self._event = torch.cuda.Event()
            self._event.record()  # on the caller's current stream, after the clone

    def ready(self) -> None:
        """Make the worker's stream wait for the clone (GPU batches)."""
        if self._event is not None:
            import torch

            torch.cuda.current_stream(self.images.device).wait_event(self._event)


class SubmitQueue:
    """Runs `compute(images, prompts, metadata) -> (rewards, info)` on a worker thread, in submission order.
    info gains "queued_s": how long the batch waited before scoring began."""

    def __init__(self, compute: Callable[[Any, Any, Any], tuple[np.ndarray, dict]], max_pending: int = DEFAULT_MAX_PENDING,
                 name: str = "pickscore-reward-queue"):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a whole number of at least 1, got {max_pending!r}")
        self.compute, self.max_pending, self.name = compute, max_pending, name
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._unfinished = 0

    def submit(self, images: Any, prompts: Any, metadata: Any = None, *, timeout: float | None = None) -> Future:
        """A Future of (rewards, info). Blocks while `max_pending` batches are unfinished; QueueFull after
        `timeout` seconds (None: wait as long as it takes)."""
        if self._closed:
            raise QueueClosed("this reward was closed; make a new one")
        if not self._slots.acquire(timeout=timeout):
            raise QueueFull(f"{self.max_pending} batches are still being scored (max_pending); none finished "
                            f"within {timeout:g} s")
        try:
            batch = SubmittedBatch(images, prompts, metadata)
        except BaseException:
            self._slots.release()
            raise
        future: Future = Future()
        with self._lock:
            if self._closed:
                self._slots.release()
                raise QueueClosed("this reward was closed; make a new one")
            self._unfinished += 1
            self._queue.put((future, batch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
        return future

    def pending(self) -> int:
        """Batches submitted and not yet finished."""
        return self._unfinished

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, batch = item
            try:
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                try:
                    batch.ready()
                    started = time.perf_counter()
                    rewards, info = self.compute(batch.images, batch.prompts, batch.metadata)
                    info = dict(info, queued_s=started - batch.submitted_at)
                except BaseException as e:  # noqa: BLE001 - the caller sees it through the future
                    future.set_exception(e)
                else:
                    future.set_result((rewards, info))
            finally:
                with self._lock:
                    self._unfinished -= 1
                self._slots.release()

    def close(self, wait: bool = True) -> None:
        """No more submits; with wait, every submitted batch is finished first."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if wait and thread is not None:
            thread.join()
