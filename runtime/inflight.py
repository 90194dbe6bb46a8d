"""Batches kept in flight on a backend: the one loop behind the pipeline, the server's batcher and
`PickScorer.embed_pixels`.

A backend says how many batches are worth keeping submitted at once (`queue_depth`): 2 on the GPU
backends, whose `submit_images` copies the next batch to the device while the previous one computes; 1
where `submit_images` computes before it returns. Callers submit a batch, then collect the oldest ones
while `queue_depth` are in flight, and collect the rest at the end; results come back in submission order.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, Iterable, Iterator, TypeVar

import numpy as np

from .backends.base import Backend, PendingEmbeddings

T = TypeVar("T")


class InFlight(Generic[T]):
    """Submitted batches not collected yet, oldest first, each with the caller's tag (what the batch holds).
    `due()` takes out the batches that must be collected before the next submission; `drain()` all of them.
    Taking one out is the caller's cue to call its `result()` (and handle its failure, if it has a policy)."""

    def __init__(self, queue_depth: int):
        self.depth = max(1, int(queue_depth))
        self._batches: deque[tuple[T, PendingEmbeddings]] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    def put(self, tag: T, pending: PendingEmbeddings) -> None:
        self._batches.append((tag, pending))

    def due(self) -> Iterator[tuple[T, PendingEmbeddings]]:
        """The oldest batches, taken out while `depth` are in flight: with depth 2 one stays submitted (its
        copy and compute overlap the caller's next batch); with depth 1 none does."""
        while len(self._batches) >= self.depth:
            yield self._batches.popleft()

    def drain(self) -> Iterator[tuple[T, PendingEmbeddings]]:
        """Every batch still in flight, oldest first."""
        while self._batches:
            yield self._batches.popleft()


def embed_in_flight(backend: Backend, batches: Iterable[Any]) -> Iterator[np.ndarray]:
    """Embeddings of each of `batches` (pixels [B, 3, S, S]: numpy, or a device array the backend binds), in
    order, keeping the backend's `queue_depth` batches submitted."""
    flight: InFlight[None] = InFlight(backend.queue_depth)
    for pixels in batches:
        flight.put(None, backend.submit_images(pixels))
        yield from (pending.result() for _, pending in flight.due())
    yield from (pending.result() for _, pending in flight.drain())
