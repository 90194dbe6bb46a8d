"""CUDA through cuda-python's runtime bindings (`cuda.bindings.runtime`), without torch: device and
pinned host buffers, streams, events and CUDA graphs, each a small object with an idempotent `free()`.

Imported only by the GPU code that needs it (the tensorrt backend and engine builds); a missing
cuda-python raises MissingExtraError naming the [tensorrt] extra, and a machine without a usable
NVIDIA driver or device raises BackendUnavailableError saying so.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, PickScoreError
from .optional import require

# cudaError_t names that mean "no usable GPU here" rather than a failure of the work itself
NO_DEVICE = {"cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorInvalidDevice", "cudaErrorDevicesUnavailable",
             "cudaErrorSystemDriverMismatch", "cudaErrorCompatNotSupportedOnDevice", "cudaErrorStubLibrary",
             "cudaErrorCallRequiresNewerDriver", "cudaErrorSystemNotReady"}


class CudaError(PickScoreError):
    """A CUDA call failed (out of memory, an illegal access, ...)."""


_RUNTIME: ModuleType | None = None


def cudart() -> ModuleType:
    """cuda-python's runtime API module."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = require("cuda.bindings.runtime", "CUDA buffers for the GPU backends (cuda-python)", extra="tensorrt")
    return _RUNTIME


def call(fn: Any, *args: Any) -> Any:
    """Call a cuda.bindings function (they return (error, *values)); raise on error, return the values."""
    err, *values = fn(*args)
    if int(err) != 0:
        rt = cudart()
        name = getattr(err, "name", str(err))
        text = rt.cudaGetErrorString(err)[1]
        text = text.decode() if isinstance(text, bytes) else str(text)
        message = f"{fn.__name__}: {name} ({text})"
        if name in NO_DEVICE:
            raise BackendUnavailableError(f"CUDA cannot run here: {message}")
        raise CudaError(message)
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str
    total_memory: int


def current_device() -> DeviceInfo:
    """The device this process's CUDA work goes to (the first visible one unless set otherwise)."""
    rt = cudart()
    index = call(rt.cudaGetDevice)
    props = call(rt.cudaGetDeviceProperties, index)
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(index, name.split("\x00")[0].strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def memory_in_use_mb() -> float:
    """Device memory in use on the current device (every process's), in MiB."""
    free, total = call(cudart().cudaMemGetInfo)
    return (total - free) / 2**20


class DeviceBuffer:
    """`nbytes` of device memory."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr: int = int(call(cudart().cudaMalloc, self.nbytes))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            call(cudart().cudaFree, ptr)


class PinnedArray:
    """A numpy array in page-locked host memory, which the GPU copies from and to asynchronously."""

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr: int = int(call(cudart().cudaMallocHost, self.nbytes))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first prod(shape) elements as an array of `shape` (contiguous, for a smaller batch)."""
        return self.array.reshape(-1)[: int(np.prod(shape))].reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = np.empty(0, self.array.dtype)  # no view may outlive the memory
            call(cudart().cudaFreeHost, ptr)


class Stream:
    def __init__(self) -> None:
        rt = cudart()
        self._stream = call(rt.cudaStreamCreateWithFlags, rt.cudaStreamNonBlocking)
        self.handle: int = int(self._stream)

    def wait(self, event: "Event") -> None:
        call(cudart().cudaStreamWaitEvent, self._stream, event.event, 0)

    def wait_for_stream(self, handle: int) -> None:
        """Order this stream after the work queued so far on another stream (given by its handle; 1 and 2
        are CUDA's legacy and per-thread default streams)."""
        rt = cudart()
        event = Event()
        try:
            call(rt.cudaEventRecord, event.event, handle)
            self.wait(event)
        finally:
            event.free()  # safe: the wait is already queued

    def synchronize(self) -> None:
        if self.handle:
            call(cudart().cudaStreamSynchronize, self._stream)

    def copy_to_device(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        call(rt.cudaMemcpyAsync, dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)

    def copy_to_host(self, dst: int, src: int, nbytes: int) -> None:
        rt = cudart()
        call(rt.cudaMemcpyAsync, dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)

    def free(self) -> None:
        if self.handle:
            self.handle = 0
            call(cudart().cudaStreamDestroy, self._stream)


class Event:
    def __init__(self, timing: bool = False) -> None:
        rt = cudart()
        self.event = call(rt.cudaEventCreateWithFlags, rt.cudaEventDefault if timing else rt.cudaEventDisableTiming)
        self._live = True

    def record(self, stream: Stream) -> None:
        call(cudart().cudaEventRecord, self.event, stream._stream)

    def synchronize(self) -> None:
        call(cudart().cudaEventSynchronize, self.event)

    def seconds_since(self, start: "Event") -> float:
        return call(cudart().cudaEventElapsedTime, start.event, self.event) / 1000

    def free(self) -> None:
        if self._live:
            self._live = False
            call(cudart().cudaEventDestroy, self.event)


class Graph:
    """A CUDA graph captured from the work `enqueue(stream)` puts on `stream`, replayed by `launch`:
    one launch instead of one per kernel, for small batches whose launches cost more than their math.
    The captured work keeps the shapes and addresses it was captured with."""

    def __init__(self, stream: Stream, enqueue: Any):
        rt = cudart()
        self._exec = None
        call(rt.cudaStreamBeginCapture, stream._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue(stream)
        finally:
            graph = call(rt.cudaStreamEndCapture, stream._stream)  # ends capture mode even when enqueue failed
        try:
            self._exec = call(rt.cudaGraphInstantiate, graph, 0)
        finally:
            call(rt.cudaGraphDestroy, graph)

    def launch(self, stream: Stream) -> None:
        call(cudart().cudaGraphLaunch, self._exec, stream._stream)

    def free(self) -> None:
        if self._exec is not None:
            exec_, self._exec = self._exec, None
            call(cudart().cudaGraphExecDestroy, exec_)
