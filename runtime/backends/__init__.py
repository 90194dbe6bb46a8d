"""Backend registry and `auto` selection."""

from __future__ import annotations

import logging

from ..artifacts import Artifacts
from ..errors import BackendUnavailableError
from .base import Backend

log = logging.getLogger("pickscore")

BACKENDS = ("onnx-cpu", "onnx-cuda")


def resolve_precision(artifacts: Artifacts, precision: str | None, backend: str, auto: bool = False) -> str:
    """The requested precision, else: GPU backends fp16 when exported; `auto` on a CPU int8 when exported
    (the fast path, within its gate); otherwise the most accurate one present (fp32 is exact)."""
    have = artifacts.precisions
    if precision is not None:
        if precision not in have:
            raise BackendUnavailableError(
                f"{artifacts.root} has no {precision} towers (has: {', '.join(have)}); "
                f"export them with `pickscore export --precision {precision}`"
            )
        return precision
    if backend != "onnx-cpu" and "fp16" in have:
        return "fp16"
    if backend == "onnx-cpu" and auto and "int8" in have:
        log.info("auto: the artifacts carry int8, the fastest CPU precision; pass --precision fp32 for exact scores")
        return "int8"
    # fp16 on the CPU provider is slow and not what it was exported for; prefer anything else there.
    return next((p for p in have if p != "fp16"), have[0])


def create_backend(artifacts: Artifacts, backend: str = "auto", precision: str | None = None,
                   threads: int | None = None, max_batch: int | None = None) -> Backend:
    """Open the towers on `backend` ("auto" picks the fastest available here and logs which)."""
    from .onnxruntime import OnnxRuntimeBackend, available_providers

    auto = backend == "auto"
    if auto:
        gpu = "CUDAExecutionProvider" in available_providers()
        backend = "onnx-cuda" if gpu else "onnx-cpu"
        log.info("backend auto -> %s (%s)", backend, "CUDA execution provider found" if gpu else "no GPU provider")
    if backend not in BACKENDS:
        if backend == "tensorrt":
            raise BackendUnavailableError("the tensorrt backend is not part of this release yet; use onnx-cuda or onnx-cpu")
        raise BackendUnavailableError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    precision = resolve_precision(artifacts, precision, backend, auto)
    return OnnxRuntimeBackend(artifacts, backend, precision, threads=threads, max_batch=max_batch)


__all__ = ["BACKENDS", "Backend", "create_backend", "resolve_precision"]
