"""The one interface every inference engine implements, with a lifecycle and a seam for overlapping
host->device copies with compute."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class PendingEmbeddings(Protocol):
    def result(self) -> np.ndarray:
        """Block until the submitted batch is done; L2-normalised float32 [B, D] on the host."""


class Backend(Protocol):
    name: str  # a key of the registry: "onnx-cpu", "onnx-cuda", "tensorrt", "torch", "torch-cuda"
    precision: str  # "fp32" | "fp16" | "int8" | "bf16" (torch)
    device: str  # "cpu" | "cuda"
    batch_size: int  # images per vision call; callers split larger work
    queue_depth: int  # batches worth keeping submitted at once (1: submit_images computes before returning)

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 [B, T] -> L2-normalised float32 [B, D]."""

    def embed_images(self, pixel_values: Any) -> np.ndarray:
        """float32 [B, 3, S, S] (numpy; GPU backends also take an array on their device) -> float32 [B, D]."""

    def submit_images(self, pixel_values: Any) -> PendingEmbeddings:
        """Start embedding a batch and return at once where the device allows: a GPU backend copies this
        batch to the device while the previous one computes. `result()` waits for it."""

    def synchronize(self) -> None:
        """Wait for all work queued on the device (a no-op on the CPU): benchmarks' clocks call it."""

    def close(self) -> None:
        """Release sessions, engines and device memory. Idempotent."""

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc: object) -> None: ...


class Done:
    """A PendingEmbeddings that is already finished."""

    def __init__(self, value: np.ndarray):
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


class BackendBase:
    """Lifecycle and a synchronous `submit_images` for backends that compute on the calling thread."""

    name: str
    precision: str
    device = "cpu"
    batch_size: int
    queue_depth = 1

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_images(self, pixel_values: Any) -> np.ndarray:
        raise NotImplementedError

    def submit_images(self, pixel_values: Any) -> PendingEmbeddings:
        return Done(self.embed_images(pixel_values))

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "BackendBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}/{self.precision} on {self.device}, batch {self.batch_size}>"
